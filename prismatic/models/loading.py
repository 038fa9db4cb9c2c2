"""Where the pretrained VLM θ0 comes from, and its identity (a content hash) for checkpoints and merging.

Three sources, in order of preference:
- `base_dir`: this project's base format, one file: `vlm.safetensors` (the VLM's state dict in our names),
  `base.json` (config name + sha256) and `tokenizer.json`. Made by `vla-scripts/convert_base.py` from the
  released Prismatic + Qwen files, or by the TableTop pretraining script.
- `llm_path`: a Hugging Face-format Qwen2.5-0.5B directory; the projector (and the LLM as tuned in VLM
  training) come from `prismatic_checkpoint`, the towers from it or from `dino_path` / `siglip_path`. Parts
  that no file provides stay random only when `random_seed` is given (LLM-only experiments).
- `random_seed`: every weight random from a seed (tests, tiny experiments).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from prismatic.io import atomic_path, read_json_object, state_dict_sha256, write_json
from prismatic.models.configuration import VLAConfig

BASE_FORMAT = "mergevla-base"
PRETRAINED_README = "pretrained_models/README.md"


@dataclass
class BaseModelConfig:
    base_dir: Optional[Path] = None  # mergevla base directory (vlm.safetensors + base.json + tokenizer.json)
    llm_path: Optional[Path] = None  # Hugging Face-format Qwen2.5-0.5B directory
    prismatic_checkpoint: Optional[Path] = None  # Prismatic VLM checkpoint (.pt or .safetensors)
    dino_path: Optional[Path] = None  # DINOv2-reg tower (timm file or HF dir) when the checkpoint lacks it
    siglip_path: Optional[Path] = None  # SigLIP tower (timm file or HF dir) when the checkpoint lacks it
    # Alone: a fully random base (tests, tiny runs). With llm_path: the seed of the parts no file provides,
    # so random vision towers are always asked for explicitly.
    random_seed: Optional[int] = None

    def describe(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in vars(self).items() if v is not None) or "nothing"

    def tokenizer_dir(self) -> Path | None:
        """Where this base's tokenizer.json lives (None: a random base, which uses the built-in vocabulary)."""
        if self.base_dir is not None:
            base_json(self.base_dir)  # a directory that is not a base is named as such, not as a missing tokenizer
            return Path(self.base_dir)
        return Path(self.llm_path) if self.llm_path is not None else None


class BaseModelError(FileNotFoundError):
    pass


class WeightsError(ValueError):
    """A weights file whose names or shapes do not fit the module they are meant for."""


def base_json(directory: Path | str) -> Path:
    """`directory`/base.json, or BaseModelError saying the directory is not a mergevla base and what writes one."""
    meta_file = Path(directory) / "base.json"
    if not meta_file.is_file():
        raise BaseModelError(
            f"{meta_file} not found: {directory} is not a mergevla base directory (write one with python "
            f"vla-scripts/convert_base.py, or vla-scripts/pretrain_tabletop.py for TableTop-4; see {PRETRAINED_README})"
        )
    return meta_file


def read_safetensors(path: Path | str, what: str, error: type[Exception] = BaseModelError) -> dict[str, torch.Tensor]:
    """`load_file`, but a missing or corrupt file raises `error` naming the path (SafetensorError does not)."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise error(f"{path}: cannot be read as {what} ({type(e).__name__}: {e})") from e


def random_base(cfg: VLAConfig, seed: int) -> dict[str, torch.Tensor]:
    # imported here: the configs and the CLIs import this module, and need not import transformers
    from prismatic.models.modeling import PrismaticVLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return PrismaticVLM(cfg).state_dict()


def save_base_dir(directory: Path | str, cfg: VLAConfig, vlm_state: dict[str, torch.Tensor], tokenizer_json: str,
                  extra: dict | None = None) -> str:
    d = Path(directory)
    present = [f for f in ("base.json", "vlm.safetensors", "tokenizer.json") if (d / f).exists()]
    if present:
        raise FileExistsError(f"{d} already holds {', '.join(present)}; refusing to overwrite it")
    d.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().contiguous() for k, v in vlm_state.items()}
    digest = state_dict_sha256(sd)
    # Tied weights (lm_head = embed_tokens) are stored once; safetensors refuses shared storage anyway.
    first_by_ptr: dict[tuple, str] = {}
    tied = {}
    for k in sorted(sd):
        t = sd[k]
        # Only identical views are ties: slices of one storage (e.g. a split qkv) are distinct tensors.
        view = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if view in first_by_ptr and t.numel():
            tied[k] = first_by_ptr[view]
        else:
            first_by_ptr.setdefault(view, k)
    with atomic_path(d / "vlm.safetensors") as tmp:
        save_file({k: v for k, v in sd.items() if k not in tied}, str(tmp))
    with atomic_path(d / "tokenizer.json") as tmp:
        tmp.write_text(tokenizer_json)
    write_json(d / "base.json", {"format": BASE_FORMAT, "config": cfg.to_dict(), "sha256": digest, "tied": tied,
                                 **(extra or {})})
    return digest


def load_base_dir(directory: Path | str, cfg: VLAConfig, verify: bool = True
                  ) -> tuple[dict[str, torch.Tensor], dict]:
    """(VLM state dict, base.json); with `verify`, the weights must hash to base.json's sha256."""
    meta_file = base_json(directory)
    d = meta_file.parent
    meta = read_json_object(meta_file, BaseModelError)
    if meta.get("format") != BASE_FORMAT:
        raise BaseModelError(f"{meta_file}: field 'format' is {meta.get('format')!r}, expected {BASE_FORMAT!r}")
    try:
        saved = VLAConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise BaseModelError(f"{meta_file}: field 'config' is missing or invalid ({e})") from e
    for field in ("image_size", "dino", "siglip", "llm"):
        if getattr(saved, field) != getattr(cfg, field):
            raise BaseModelError(
                f"{meta_file}: config field {field!r} is {getattr(saved, field)}, but the model config "
                f"{cfg.name!r} expects {getattr(cfg, field)}"
            )
    wf = d / "vlm.safetensors"
    sd = read_safetensors(wf, "the VLM weights of a mergevla base directory")
    for alias, source in meta.get("tied", {}).items():
        sd[alias] = sd[source]
    # base.json's sha256 is the base's identity in every manifest, so it must describe these very bytes
    if verify and state_dict_sha256(sd) != meta.get("sha256"):
        raise BaseModelError(
            f"{wf} does not match the sha256 recorded in {meta_file}: the file is corrupt or was changed"
        )
    return sd, meta


def load_vlm_weights(vlm: torch.nn.Module, state: dict[str, torch.Tensor], source: str, config_name: str) -> None:
    """Load base weights into a PrismaticVLM; every parameter must come from `state` and nothing else be in it."""
    missing, unexpected = vlm.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise BaseModelError(
            f"base weights ({source}) do not fit config {config_name!r}: "
            f"missing {sorted(missing)[:5]}…, unexpected {sorted(unexpected)[:5]}…"
        )


def load_qwen_hf(path: Path | str, cfg: VLAConfig) -> dict[str, torch.Tensor]:
    """State dict (our names, `llm.` prefix) of a Hugging Face-format Qwen2 directory; no network."""
    p = Path(path)
    if not (p / "config.json").is_file():
        raise BaseModelError(
            f"no Qwen2.5-0.5B weights at {p}: put the Hugging Face-format directory (config.json, "
            f"model.safetensors, tokenizer.json) there; see {PRETRAINED_README}"
        )
    hf = read_json_object(p / "config.json", BaseModelError)
    want = {"hidden_size": cfg.llm.hidden_size, "num_hidden_layers": cfg.llm.num_layers,
            "num_attention_heads": cfg.llm.num_heads, "num_key_value_heads": cfg.llm.num_kv_heads,
            "intermediate_size": cfg.llm.intermediate_size, "vocab_size": cfg.llm.vocab_size}
    for k, v in want.items():
        if hf.get(k) != v:
            raise BaseModelError(f"{p / 'config.json'}: {k} is {hf.get(k)}, config {cfg.name!r} expects {v}")
    # the model is built from `cfg`, not from this file: a value the file states otherwise would be ignored
    stated = {"rope_theta": hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta")),
              "rms_norm_eps": hf.get("rms_norm_eps"), "tie_word_embeddings": hf.get("tie_word_embeddings")}
    for k, v in stated.items():
        if v is not None and v != getattr(cfg.llm, k):
            raise BaseModelError(f"{p / 'config.json'}: {k} is {v}, config {cfg.name!r} expects {getattr(cfg.llm, k)}")
    files = sorted(p.glob("*.safetensors"))
    if not files:
        raise BaseModelError(f"no *.safetensors weights in {p} (only safetensors are read, never pickles)")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(read_safetensors(f, "Qwen2 weights"))
    out = {f"llm.{k}": v for k, v in sd.items()}
    if "llm.lm_head.weight" not in out and cfg.llm.tie_word_embeddings:
        out["llm.lm_head.weight"] = out["llm.model.embed_tokens.weight"]
    return out


def resolve_base(cfg: VLAConfig, base: BaseModelConfig, verify: bool = True
                 ) -> tuple[dict[str, torch.Tensor], dict, Path | None]:
    """(VLM state dict, reference for manifests, tokenizer location or None).

    `verify=False` skips re-hashing a base directory's weights (its recorded sha256 is then taken on trust).
    """
    if base.base_dir is not None:
        sd, meta = load_base_dir(base.base_dir, cfg, verify)
        ref = {"kind": "dir", "path": str(Path(base.base_dir).resolve()), "sha256": meta["sha256"]}
        return sd, ref, base.tokenizer_dir()
    if base.llm_path is not None:
        from prismatic.models import prismatic_weights as pw

        towers_given = base.dino_path is not None or base.siglip_path is not None
        # every part from a file, the LLM from the checkpoint (the one VLM training tuned): neither a random VLM
        # nor llm_path's weights would survive (at real size ~30 s and GBs), so only its tokenizer is read
        from_files = base.prismatic_checkpoint is not None and (base.random_seed is None or towers_given)
        llm = None if from_files else load_qwen_hf(base.llm_path, cfg)
        if base.random_seed is None and base.prismatic_checkpoint is None:
            raise BaseModelError(
                "llm_path alone leaves the vision towers and projector unset: add prismatic_checkpoint "
                f"(+ dino_path / siglip_path), or random_seed to make them random on purpose; see {PRETRAINED_README}"
            )
        if from_files:
            sd = pw.assemble_vlm_state(cfg, base.prismatic_checkpoint, base.dino_path, base.siglip_path)[0]
        else:
            sd = random_base(cfg, base.random_seed)
            sd.update(llm)
            if base.prismatic_checkpoint is not None:
                sd.update(pw.load_prismatic_checkpoint(base.prismatic_checkpoint, cfg))
        as_str = lambda p: str(Path(p).resolve()) if p is not None else None  # noqa: E731
        ref = {"kind": "files", "llm_path": as_str(base.llm_path),
               "prismatic_checkpoint": as_str(base.prismatic_checkpoint), "dino_path": as_str(base.dino_path),
               "siglip_path": as_str(base.siglip_path), "random_seed": base.random_seed,
               "sha256": state_dict_sha256(sd)}
        return sd, ref, base.tokenizer_dir()
    if base.random_seed is not None:
        sd = random_base(cfg, base.random_seed)
        return sd, {"kind": "random", "seed": base.random_seed, "sha256": state_dict_sha256(sd)}, None
    raise BaseModelError(
        "no base model given: set base_dir (a mergevla base directory), llm_path (+ prismatic_checkpoint), "
        f"or random_seed for a random base; see {PRETRAINED_README}"
    )


def base_config_from_ref(ref: dict) -> BaseModelConfig:
    kind = ref.get("kind")
    if kind == "dir":
        return BaseModelConfig(base_dir=Path(ref["path"]))
    if kind == "files":
        as_path = lambda k: Path(ref[k]) if ref.get(k) else None  # noqa: E731
        return BaseModelConfig(llm_path=as_path("llm_path"), prismatic_checkpoint=as_path("prismatic_checkpoint"),
                               dino_path=as_path("dino_path"), siglip_path=as_path("siglip_path"),
                               random_seed=ref.get("random_seed"))
    if kind == "random":
        return BaseModelConfig(random_seed=int(ref["seed"]))
    raise BaseModelError(f"unknown base reference kind {kind!r} (expected dir, files or random)")
