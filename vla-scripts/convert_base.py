"""Convert the released Prismatic VLM files into a mergevla base directory (one-off, local files only).

    python vla-scripts/convert_base.py \\
        --llm_path pretrained_models/Qwen2.5-0.5B \\
        --prismatic_checkpoint pretrained_models/prism-qwen25-extra-dinosiglip-224px-0_5b/checkpoints/latest-checkpoint.pt \\
        --dino_path pretrained_models/vit_large_patch14_reg4_dinov2.lvd142m \\
        --siglip_path pretrained_models/vit_so400m_patch14_siglip_224 \\
        --out_dir pretrained_models/mergevla-base-qwen25-dinosiglip-224px

The result (`vlm.safetensors` + `base.json` + `tokenizer.json`) is what `BaseModelConfig(base_dir=…)` loads.
The vision towers come from the Prismatic checkpoint when it holds them, otherwise from `dino_path` /
`siglip_path`. The Qwen directory supplies the tokenizer (the LLM weights are the Prismatic checkpoint's).
See pretrained_models/README.md for where each file goes. Nothing is downloaded.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import draccus
import torch

from prismatic.cli import run_cli
from prismatic.io import atomic_dir, read_json_object
from prismatic.models.configuration import CONFIGS, get_config
from prismatic.models.loading import PRETRAINED_README, BaseModelError, save_base_dir
from prismatic.models.prismatic_weights import TIMM_NAMES, WeightsError, assemble_vlm_state
from prismatic.models.processing import load_tokenizer

PRETRAINED = Path("pretrained_models")
PRISM_CKPT = PRETRAINED / "prism-qwen25-extra-dinosiglip-224px-0_5b" / "checkpoints" / "latest-checkpoint.pt"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


StoredDtype = Literal["float32", "bfloat16", "keep"]  # an alias: draccus drops the help of an inline Literal


@dataclass
class ConvertConfig:
    config_name: str = "qwen25-dinosiglip-224px"  # model config the weights must fit
    llm_path: Path = PRETRAINED / "Qwen2.5-0.5B"  # Hugging Face Qwen2.5-0.5B dir (its tokenizer.json is copied)
    prismatic_checkpoint: Path = PRISM_CKPT  # Prismatic VLM checkpoint (.pt, or .safetensors with flat keys)
    dino_path: Optional[Path] = PRETRAINED / TIMM_NAMES["dino"]  # used if the checkpoint lacks DINOv2-reg
    siglip_path: Optional[Path] = PRETRAINED / TIMM_NAMES["siglip"]  # used if the checkpoint lacks SigLIP
    out_dir: Path = PRETRAINED / "mergevla-base-qwen25-dinosiglip-224px"  # must not exist or be empty
    dtype: StoredDtype = "float32"  # stored precision; float32 is lossless from any source


def _tokenizer_json(llm_path: Path, cfg_name: str, cfg) -> str:
    tok = llm_path / "tokenizer.json"
    if not tok.is_file():
        raise BaseModelError(
            f"no tokenizer.json at {tok}: put the Hugging Face-format Qwen2.5-0.5B directory at {llm_path} "
            f"(see {PRETRAINED_README})"
        )
    conf = llm_path / "config.json"
    if conf.is_file():  # a wrong LLM directory is caught here rather than by a confusing tokenizer later
        hf = read_json_object(conf, BaseModelError)
        for key, want in (("hidden_size", cfg.llm.hidden_size), ("vocab_size", cfg.llm.vocab_size)):
            if hf.get(key) != want:
                raise BaseModelError(f"{conf}: {key} is {hf.get(key)}, config {cfg_name!r} expects {want}")
    # a damaged file would otherwise be copied into the base and fail at fine-tuning, far from here
    load_tokenizer(cfg.tokenizer, tok, BaseModelError)
    return tok.read_text()


def check_inputs(c: ConvertConfig) -> None:
    """Name every missing input at once, each with what belongs there, before any slow loading."""
    missing = []
    if not (Path(c.llm_path) / "tokenizer.json").is_file():
        missing.append(f"--llm_path {c.llm_path}: the Hugging Face-format Qwen2.5-0.5B directory (tokenizer.json)")
    if not Path(c.prismatic_checkpoint).is_file():
        missing.append(f"--prismatic_checkpoint {c.prismatic_checkpoint}: the Prismatic VLM checkpoint "
                       "(prism-qwen25-extra-dinosiglip-224px-0_5b/checkpoints/latest-checkpoint.pt)")
    if missing:  # the towers are only needed when the checkpoint lacks them; say so rather than demand them
        for kind in ("dino", "siglip"):
            path = getattr(c, f"{kind}_path")
            if path is None or not Path(path).exists():
                missing.append(f"--{kind}_path {path}: {TIMM_NAMES[kind]} weights (timm or Hugging Face format), "
                               "needed unless the Prismatic checkpoint holds the vision backbone")
        raise BaseModelError(f"missing inputs (see {PRETRAINED_README}; nothing is downloaded):\n  "
                             + "\n  ".join(missing))


def convert(c: ConvertConfig) -> str:
    """Write the base directory; returns the sha256 of its weights."""
    out = Path(c.out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} is not an empty directory; refusing to overwrite it (choose another --out_dir)")
    if c.dtype not in (*DTYPES, "keep"):
        raise BaseModelError(f"dtype is {c.dtype!r}; expected one of {[*DTYPES, 'keep']}")
    if c.config_name not in CONFIGS:
        raise BaseModelError(f"config_name is {c.config_name!r}; expected one of {sorted(CONFIGS)}")
    check_inputs(c)
    cfg = get_config(c.config_name)
    tokenizer_json = _tokenizer_json(Path(c.llm_path), c.config_name, cfg)
    sd, sources = assemble_vlm_state(cfg, c.prismatic_checkpoint, c.dino_path, c.siglip_path)
    if c.dtype != "keep":
        cast: dict[int, torch.Tensor] = {}  # by identity, so tied tensors (lm_head = embed_tokens) stay one tensor
        sd = {k: cast.setdefault(id(v), v.to(DTYPES[c.dtype]) if v.is_floating_point() else v) for k, v in sd.items()}
    sources["tokenizer"] = str(Path(c.llm_path) / "tokenizer.json")
    with atomic_dir(out, replace=out.exists()) as tmp:  # replaces only the empty directory checked above
        digest = save_base_dir(tmp, cfg, sd, tokenizer_json, extra={"sources": sources, "dtype": c.dtype,
                                                                    "converted_by": "vla-scripts/convert_base.py"})
    for part, src in sources.items():
        print(f"  {part:10s} ← {src}")
    print(f"wrote {out} (sha256 {digest[:12]}…)")
    return digest


def parse_args(args: Sequence[str] | None = None) -> ConvertConfig:
    return draccus.parse(config_class=ConvertConfig, args=args)


if __name__ == "__main__":
    sys.exit(run_cli("convert_base", ConvertConfig, convert, (BaseModelError, WeightsError)))
