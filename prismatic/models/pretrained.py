"""Build a trainable MergeVLA on a base VLM; save and load its trainable weights (HF-style API)."""

from __future__ import annotations

from pathlib import Path

import torch

from prismatic import __version__
from prismatic.checkpoint import CHECKPOINT_KIND, MANIFEST_FILE, CheckpointError, load_checkpoint, save_checkpoint
from prismatic.io import state_dict_sha256
from prismatic.models.configuration import VLAConfig, get_config
from prismatic.models.loading import (
    BaseModelConfig,
    BaseModelError,
    base_config_from_ref,
    load_vlm_weights,
    resolve_base,
)
from prismatic.models.lora import apply_lora, init_trainable
from prismatic.models.modeling import MergeVLA, is_trainable_name
from prismatic.models.processing import VLAProcessor, load_tokenizer
from prismatic.vla.normalization import check_norm_stats


def build_vla(cfg: VLAConfig | str, base: BaseModelConfig, seed: int = 0) -> MergeVLA:
    """A MergeVLA whose VLM holds the base weights, with LoRA injected and trainable parts seeded.

    The returned model carries `.processor` (tokenizer + image preprocessing), `.base_ref` (identity of θ0)
    and `.norm_stats` (None until set by the data pipeline).
    """
    cfg = get_config(cfg) if isinstance(cfg, str) else cfg
    # a missing tokenizer is found before the (for the full model, slow) weights are read
    tokenizer = load_tokenizer(cfg.tokenizer, base.tokenizer_dir(), BaseModelError)
    base_sd, base_ref, _ = resolve_base(cfg, base)
    model = MergeVLA(cfg)
    load_vlm_weights(model.vlm, base_sd, base.describe(), cfg.name)
    apply_lora(model, cfg.lora)
    init_trainable(model, seed)
    model.base_ref = base_ref
    model.norm_stats = None
    model.init_seed = seed
    model.processor = VLAProcessor(tokenizer, cfg.image_size, cfg.llm.vocab_size)
    return model


def save_pretrained(model: MergeVLA, directory: Path | str, overwrite: bool = False, **extra) -> Path:
    """Trainable weights (LoRA, action queries, proprio projector, action expert) + manifest, atomically."""
    cfg = model.config
    manifest = {
        "config_name": cfg.name,
        "config": cfg.to_dict(),
        "lora": {"r": cfg.lora.r, "alpha": cfg.lora.alpha, "dropout": cfg.lora.dropout, "scale": cfg.lora.scale},
        "base": model.base_ref,
        "norm_stats": model.norm_stats,
        "init_seed": getattr(model, "init_seed", None),
        "mergevla_version": __version__,
        **extra,
    }
    return save_checkpoint(directory, model.trainable_state_dict(), manifest, CHECKPOINT_KIND, overwrite=overwrite)


def from_pretrained(directory: Path | str, base: BaseModelConfig | None = None) -> MergeVLA:
    """Rebuild the model a checkpoint was trained from and load its trainable weights.

    `base` defaults to the base recorded in the manifest; whichever is used must hash to the recorded θ0.
    """
    tensors, manifest = load_checkpoint(directory, CHECKPOINT_KIND)
    try:
        cfg = VLAConfig.from_dict(manifest["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{directory}/manifest.json: field 'config' is invalid ({e})") from e
    if not isinstance(manifest.get("base"), dict) or "sha256" not in manifest["base"]:
        raise CheckpointError(f"{directory}/manifest.json: field 'base' is {manifest.get('base')!r}, expected the "
                              "reference of the base it was trained on (an object with its sha256)")
    base = base or base_config_from_ref(manifest["base"])
    model = build_vla(cfg, base, seed=manifest.get("init_seed") or 0)
    if model.base_ref["sha256"] != manifest["base"]["sha256"]:
        raise CheckpointError(
            f"{directory} was trained on base {manifest['base']['sha256'][:12]}…, but {base.describe()} hashes "
            f"to {model.base_ref['sha256'][:12]}…"
        )
    expected = set(model.trainable_state_dict())
    if set(tensors) != expected:
        raise CheckpointError(
            f"{directory}/model.safetensors: tensor names differ from config {cfg.name!r} "
            f"(missing {sorted(expected - set(tensors))[:3]}, unexpected {sorted(set(tensors) - expected)[:3]})"
        )
    model.load_state_dict(tensors, strict=False)
    if manifest.get("norm_stats") is not None:
        try:
            check_norm_stats(manifest["norm_stats"], {"action": cfg.action_dim, "proprio": cfg.proprio_dim})
        except ValueError as e:
            raise CheckpointError(f"{directory}/{MANIFEST_FILE} field {e}") from e
    model.norm_stats = manifest.get("norm_stats")
    model.manifest = manifest
    return model


def trainable_sha256(model: MergeVLA) -> str:
    return state_dict_sha256(model.trainable_state_dict())


def count_parameters(module: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for n, p in module.named_parameters() if not trainable_only or is_trainable_name(n))
