"""Synthetic expert checkpoints, for tests, demos and the merge benchmark.

`save_perturbed_experts` goes through the real model and `save_pretrained` (what training writes);
`write_synthetic_expert` writes a checkpoint of the same format straight from the layout of a config,
with random LoRA factors, without building the model, so real-size experts cost only their file size.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from model_merging.layout import LORA_A, LORA_B, initial_scratch_state, model_layout
from prismatic import __version__
from prismatic.checkpoint import CHECKPOINT_KIND, save_checkpoint
from prismatic.models.configuration import VLAConfig
from prismatic.models.modeling import MergeVLA
from prismatic.models.pretrained import save_pretrained


def toy_norm_stats(seed: int, action_dim: int = 7, proprio_dim: int = 8) -> dict:
    """Distinct but valid q01/q99 stats per expert (gripper action dimension not normalised)."""
    g = torch.Generator().manual_seed(seed)

    def stats(n, mask):
        lo = -1.0 - torch.rand(n, generator=g)
        return {"q01": lo.tolist(), "q99": (lo + 1.0 + torch.rand(n, generator=g)).tolist(), "mask": mask}

    return {"action": stats(action_dim, [True] * (action_dim - 1) + [False]),
            "proprio": stats(proprio_dim, [True] * proprio_dim)}


def save_perturbed_experts(model: MergeVLA, root: Path | str, names: Sequence[str], noise: float = 0.05,
                           seed: int = 0) -> list[tuple[str, Path]]:
    """Simulate fine-tuning: each expert = the model's trainable weights + seeded Gaussian noise.

    LoRA B starts at zero, so the noise makes every task vector nonzero. The model is restored afterwards.
    """
    start = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    old_stats = model.norm_stats
    out = []
    try:
        for i, name in enumerate(names):
            g = torch.Generator().manual_seed(seed * 1000 + i)
            model.load_state_dict({k: v + noise * torch.randn(v.shape, generator=g) for k, v in start.items()},
                                  strict=False)
            model.norm_stats = toy_norm_stats(seed * 1000 + i, model.config.action_dim, model.config.proprio_dim)
            out.append((name, save_pretrained(model, Path(root) / name, task=name)))
    finally:
        model.load_state_dict(start, strict=False)
        model.norm_stats = old_stats
    return out


def write_synthetic_expert(directory: Path | str, cfg: VLAConfig, seed: int, base_ref: dict,
                           init_seed: int = 0, lora_std: float = 0.01, scratch_noise: float = 0.01) -> Path:
    """A checkpoint with random LoRA factors (B nonzero) and perturbed from-scratch parts, from the layout."""
    lay = model_layout(cfg)
    g = torch.Generator().manual_seed(seed)
    r = cfg.lora.r
    tensors: dict[str, torch.Tensor] = {}
    for mod, (o, i) in lay.lora_modules.items():
        tensors[mod + LORA_A] = torch.randn(r, i, generator=g) / i ** 0.5
        tensors[mod + LORA_B] = torch.randn(o, r, generator=g) * lora_std
    for n, t in initial_scratch_state(cfg, init_seed).items():
        tensors[n] = t + scratch_noise * torch.randn(t.shape, generator=g)
    manifest = {
        "config_name": cfg.name, "config": cfg.to_dict(),
        "lora": {"r": r, "alpha": cfg.lora.alpha, "dropout": cfg.lora.dropout, "scale": cfg.lora.scale},
        "base": base_ref, "norm_stats": toy_norm_stats(seed, cfg.action_dim, cfg.proprio_dim),
        "init_seed": init_seed, "mergevla_version": __version__, "synthetic": True,
    }
    return save_checkpoint(directory, tensors, manifest, CHECKPOINT_KIND)
