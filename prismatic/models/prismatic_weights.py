"""Pretrained weights from the released files, renamed to our `PrismaticVLM` state-dict names.

Sources (all local; nothing is downloaded):
- the Prismatic VLM checkpoint (`latest-checkpoint.pt`, or a `.safetensors` with flattened keys):
  `{"model": {"projector": …, "llm_backbone": …[, "vision_backbone": …]}}`. Its LLM keys are already Hugging Face
  Qwen2 names under `llm.`; its vision keys are timm ViT names under `dino_featurizer.` / `siglip_featurizer.`.
- the two vision towers on their own (the "extra" Prismatic models keep the vision backbone frozen, so their
  checkpoint usually lacks it): timm-format state dicts, or Hugging Face-format model directories.

Our towers are transformers modules (`Dinov2WithRegistersModel`, `SiglipVisionModel`) built with `num_layers - 1`
blocks: the features come from the second-to-last block, so the last block and the heads are dropped here.
Every result is checked name by name and shape by shape against the module it will be loaded into.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from transformers import Dinov2WithRegistersModel, SiglipVisionModel
from transformers.utils import logging as hf_logging

from prismatic.io import read_json_object
from prismatic.models.configuration import VisionTowerConfig, VLAConfig
from prismatic.models.loading import PRETRAINED_README, BaseModelError, WeightsError, read_safetensors
from prismatic.models.modeling import PrismaticVLM, dino_hf_config, siglip_hf_config

TowerKind = Literal["dino", "siglip"]
TOWER_KINDS: tuple[TowerKind, ...] = ("dino", "siglip")
TIMM_NAMES = {"dino": "vit_large_patch14_reg4_dinov2.lvd142m", "siglip": "vit_so400m_patch14_siglip_224"}
PRISMATIC_PREFIX = {"dino": "dino_featurizer.", "siglip": "siglip_featurizer."}
CHECKPOINT_GROUPS = ("projector", "llm_backbone", "vision_backbone")

# timm modules our towers never run: SigLIP's attention-pool head and (empty when num_classes=0) classifier parts.
_TIMM_UNUSED = ("attn_pool.", "head.", "fc_norm.", "head_drop.")
# Buffers that older transformers versions saved although they are recomputed, not learned.
_NOT_WEIGHTS = re.compile(r".*rotary_emb\.inv_freq$")

_HF_MODULE = {"dino": Dinov2WithRegistersModel, "siglip": SiglipVisionModel}
_HF_LAYERS = {"dino": "encoder.layer.", "siglip": "encoder.layers."}
# timm block sub-module → transformers sub-module (weight/bias keep their names).
_BLOCK_MODULES = {
    "dino": {"norm1": "norm1", "norm2": "norm2", "attn.proj": "attention.o_proj", "mlp.fc1": "mlp.fc1",
             "mlp.fc2": "mlp.fc2"},
    "siglip": {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.proj": "self_attn.out_proj",
               "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"},
}
_QKV = {"dino": "attention.{}_proj", "siglip": "self_attn.{}_proj"}
_TOP = {
    "dino": {"patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
             "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
             "norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias"},
    "siglip": {"patch_embed.proj.weight": "embeddings.patch_embedding.weight",
               "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
               "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias"},
}


# ------------------------------------------------------------------------------------------------ checks


def _tower(cfg: VLAConfig, kind: str) -> VisionTowerConfig:
    if kind not in TOWER_KINDS:
        raise ValueError(f"unknown vision tower kind {kind!r}; expected one of {TOWER_KINDS}")
    return getattr(cfg, kind)


def tower_hf_config(kind: TowerKind, tower: VisionTowerConfig, image_size: int):
    make = dino_hf_config if kind == "dino" else siglip_hf_config
    return make(tower, image_size, tower.num_layers - 1)


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def tower_shapes(kind: TowerKind, tower: VisionTowerConfig, image_size: int) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of our tower module (built on the meta device: no memory, no init cost)."""
    with torch.device("meta"):
        return _shapes(_HF_MODULE[kind](tower_hf_config(kind, tower, image_size)))


def vlm_shapes(cfg: VLAConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return _shapes(PrismaticVLM(cfg))


def check_state_dict(sd: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], source: str,
                     what: str, unmapped: list[str] | tuple = ()) -> None:
    """Raise WeightsError naming every missing, unexpected or mis-shaped key (first few of each)."""
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted([*unmapped, *(set(sd) - set(expected))])
    shaped = sorted(f"{k} has shape {tuple(sd[k].shape)}, expected {expected[k]}"
                    for k in set(sd) & set(expected) if tuple(sd[k].shape) != expected[k])
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", shaped)):
        if items:
            more = f" (+{len(items) - 8} more)" if len(items) > 8 else ""
            problems.append(f"{label}: {', '.join(items[:8])}{more}")
    if problems:
        raise WeightsError(f"{source}: does not fit {what}; " + "; ".join(problems))


# ------------------------------------------------------------------------------------ position embeddings


def resample_grid(pos: torch.Tensor, grid: int, source: str, name: str) -> torch.Tensor:
    """(N, D) patch position table on a square grid → (grid², D): bicubic with antialiasing, in float32.

    The same resampling timm applies when a ViT is created at another image size than it was trained at
    (the 518 px DINOv2 table becomes the 224 px one), and that transformers applies at run time.
    """
    n, d = pos.shape
    side = round(n**0.5)
    if side * side != n:
        raise WeightsError(f"{source}: {name} has {n} positions, which is not a square grid of patches")
    if side == grid:
        return pos
    img = pos.float().reshape(1, side, side, d).permute(0, 3, 1, 2)
    img = F.interpolate(img, size=(grid, grid), mode="bicubic", align_corners=False, antialias=True)
    return img.permute(0, 2, 3, 1).reshape(grid * grid, d).to(pos.dtype)


def _grid(tower: VisionTowerConfig, image_size: int) -> int:
    return image_size // tower.patch_size


def position_table(pos: torch.Tensor, kind: TowerKind, grid: int, source: str, name: str) -> torch.Tensor:
    """The (N, D) patch table on this grid. Only DINOv2's is resampled (518 px → 224 px is how Prismatic used it);
    the SigLIP tower is natively 224 px, so another grid means a different tower, refused rather than resampled."""
    n = pos.shape[0]
    if kind == "siglip" and n != grid * grid:
        side = round(n**0.5)
        have = f"{side}×{side}" if side * side == n else f"{n}-position (not square)"
        raise WeightsError(
            f"{source}: {name} is a {have} SigLIP position table where the config expects {grid}×{grid} (as in "
            f"{TIMM_NAMES['siglip']}): a tower made for another resolution (e.g. 384 px) is refused, not resampled"
        )
    return resample_grid(pos, grid, source, name)


# -------------------------------------------------------------------------------------------- timm → HF


def _block_count(keys, source: str, tower: VisionTowerConfig) -> int:
    idx = {int(m.group(1)) for k in keys if (m := re.match(r"blocks\.(\d+)\.", k))}
    n = max(idx) + 1 if idx else 0
    if n not in (tower.num_layers - 1, tower.num_layers):
        raise WeightsError(
            f"{source}: has {n} transformer blocks, but the config expects {tower.num_layers} "
            f"(or {tower.num_layers - 1}, the last one being unused)"
        )
    return n


def timm_vit_to_hf(sd: dict[str, torch.Tensor], kind: TowerKind, tower: VisionTowerConfig, image_size: int,
                   source: str = "timm state dict") -> dict[str, torch.Tensor]:
    """timm ViT state dict → the state dict of our transformers tower (names relative to the tower module).

    - fused `attn.qkv` → `q/k/v_proj`; layer scale `ls{1,2}.gamma` → `layer_scale{1,2}.lambda1` (DINOv2);
    - DINOv2-reg in timm is `no_embed_class`: `pos_embed` covers the patches only and the cls/register tokens get
      no position. The transformers table has a cls slot added to the cls token: it is set to zero so the
      forward is the same. DINOv2's patch table is resampled to this image size if its grid differs (SigLIP's
      must already fit: see position_table);
    - the last block, SigLIP's attention-pool head and classifier parts are dropped (never run here);
    - DINOv2's `mask_token` (masked image modelling only, never used) is zero unless the file has one.
    """
    n_keep = tower.num_layers - 1
    _block_count(sd, source, tower)
    grid = _grid(tower, image_size)
    out: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    for key, t in sd.items():
        if key.startswith(_TIMM_UNUSED):
            continue
        if m := re.match(r"blocks\.(\d+)\.(.+)\.(weight|bias|gamma)$", key):
            i, mod, param = int(m.group(1)), m.group(2), m.group(3)
            if i >= n_keep:
                continue
            pre = f"{_HF_LAYERS[kind]}{i}."
            if mod == "attn.qkv" and param != "gamma":
                # cloned: three views of one storage would look like tied weights to a saver that dedups storage
                for name, part in zip("qkv", t.chunk(3, dim=0)):
                    out[pre + _QKV[kind].format(name) + "." + param] = part.clone()
            elif kind == "dino" and param == "gamma" and mod in ("ls1", "ls2"):
                out[f"{pre}layer_scale{mod[-1]}.lambda1"] = t
            elif param != "gamma" and mod in _BLOCK_MODULES[kind]:
                out[f"{pre}{_BLOCK_MODULES[kind][mod]}.{param}"] = t
            else:
                unmapped.append(key)
        elif key in _TOP[kind]:
            out[_TOP[kind][key]] = t
        elif key == "pos_embed":
            pos = position_table(t.reshape(-1, t.shape[-1]), kind, grid, source, key)
            if kind == "dino":
                # zero cls slot: timm adds no position to the cls token (it is folded into cls_token itself)
                pos = torch.cat([pos.new_zeros(1, pos.shape[1]), pos]).unsqueeze(0)
                out["embeddings.position_embeddings"] = pos
            else:
                out["embeddings.position_embedding.weight"] = pos
        elif kind == "dino" and key in ("cls_token", "reg_token", "mask_token"):
            name = {"cls_token": "cls_token", "reg_token": "register_tokens", "mask_token": "mask_token"}[key]
            out[f"embeddings.{name}"] = t.reshape(1, t.shape[-1]) if key == "mask_token" else t
        else:
            unmapped.append(key)
    if kind == "dino" and "embeddings.mask_token" not in out and "embeddings.cls_token" in out:
        cls = out["embeddings.cls_token"]
        out["embeddings.mask_token"] = cls.new_zeros(1, cls.shape[-1])
    check_state_dict(out, tower_shapes(kind, tower, image_size), source,
                     f"the {kind} tower of the config ({TIMM_NAMES[kind]} layout, {n_keep} blocks kept)", unmapped)
    return out


# ----------------------------------------------------------------------------------------- file reading


def read_tensor_file(path: Path, what: str) -> dict[str, torch.Tensor]:
    """A .safetensors file, or a torch pickle of plain tensors (read with weights_only=True)."""
    if path.suffix == ".safetensors":
        return read_safetensors(path, what, WeightsError)
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # legacy (non-zip) pickles cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(
            f"{path}: cannot be read as {what} with torch.load(weights_only=True) ({type(e).__name__}: {e}); "
            "only files of plain tensors are read, never arbitrary pickles"
        ) from e
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: holds a {type(obj).__name__}, expected a dict ({what})")
    return obj


def _tensor_dict(obj, source: str) -> dict[str, torch.Tensor]:
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{source}: expected a flat dict of tensors (a state dict)")
    return obj


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers logs a load report listing e.g. a full SigLIP's text weights; we check keys ourselves."""
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


# Fields of our transformers config that a Hugging Face directory must share (size and depth may differ).
_HF_FIELDS = {
    "dino": ("hidden_size", "num_attention_heads", "mlp_ratio", "patch_size", "num_register_tokens",
             "layer_norm_eps", "hidden_act", "qkv_bias", "use_swiglu_ffn"),
    "siglip": ("hidden_size", "num_attention_heads", "intermediate_size", "patch_size", "layer_norm_eps",
               "hidden_act"),
}


_GELU_FORMS = {"gelu", "gelu_new", "gelu_pytorch_tanh"}  # exact and tanh-approximated: one function, same weights


def _comparable(field: str, value):
    """A config value as far as the weights care: which form of GELU runs is the config's choice (the Prismatic VLM
    ran SigLIP's weights, published with the tanh form, in timm's exact GELU), any other activation must match."""
    return "gelu" if field == "hidden_act" and value in _GELU_FORMS else value


def hf_tower_to_ours(directory: Path, kind: TowerKind, tower: VisionTowerConfig, image_size: int
                     ) -> dict[str, torch.Tensor]:
    """A Hugging Face-format tower directory → our tower's state dict (last block dropped, DINOv2's table resampled).

    transformers' own loader is used because it also renames the older key names the Hub files carry.
    """
    with _quiet_transformers():
        model, info = _HF_MODULE[kind].from_pretrained(str(directory), local_files_only=True,
                                                        output_loading_info=True)
    if info.get("missing_keys"):
        raise WeightsError(f"{directory}: weights missing for {sorted(info['missing_keys'])[:8]}")
    ours = tower_hf_config(kind, tower, image_size)
    for f in _HF_FIELDS[kind]:
        if _comparable(f, getattr(model.config, f, None)) != _comparable(f, getattr(ours, f)):
            raise WeightsError(
                f"{directory / 'config.json'}: {f} is {getattr(model.config, f, None)!r}, but the {kind} tower of "
                f"the config expects {getattr(ours, f)!r}"
            )
    n_keep = tower.num_layers - 1
    if model.config.num_hidden_layers not in (n_keep, tower.num_layers):
        raise WeightsError(f"{directory / 'config.json'}: num_hidden_layers is {model.config.num_hidden_layers}, "
                           f"expected {tower.num_layers}")
    grid = _grid(tower, image_size)
    out: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        layer = re.match(r"encoder\.layers?\.(\d+)\.", k)
        if k.startswith("head.") or (layer and int(layer.group(1)) >= n_keep):
            continue
        if k == "embeddings.position_embeddings":  # (1, 1 + patches, D): the cls slot stays as trained
            v = torch.cat([v[0, :1], position_table(v[0, 1:], kind, grid, str(directory), k)]).unsqueeze(0)
        elif k == "embeddings.position_embedding.weight":
            v = position_table(v, kind, grid, str(directory), k)
        out[k] = v.detach().clone()
    check_state_dict(out, tower_shapes(kind, tower, image_size), str(directory), f"the {kind} tower of the config")
    return out


def _missing(path: Path, what: str) -> BaseModelError:
    return BaseModelError(f"no {what} at {path}: put it there (see {PRETRAINED_README}); nothing is downloaded")


# Weight files of a timm-format directory, in order of preference: the timm Hub repo of DINOv2-reg ships
# model.safetensors; timm's SigLIP weights live in the OpenCLIP repo (timm/ViT-SO400M-14-SigLIP).
TIMM_DIR_FILES = ("model.safetensors", "open_clip_model.safetensors", "open_clip_pytorch_model.bin",
                  "pytorch_model.bin")
OPEN_CLIP_PREFIX = "visual.trunk."  # OpenCLIP keeps the timm vision tower under this prefix, beside the text tower


def load_vision_tower(path: Path | str, kind: TowerKind, cfg: VLAConfig) -> dict[str, torch.Tensor]:
    """One tower's weights in our names (`vision.dino.*` / `vision.siglip.*`).

    `path`: a timm-format weights file (`.safetensors`, or a plain-tensor `.pt`/`.pth`/`.bin`; OpenCLIP files are
    reduced to their `visual.trunk.` part), a directory holding one of TIMM_DIR_FILES, or a Hugging Face-format
    directory (`config.json` with `model_type`).
    """
    tower, p = _tower(cfg, kind), Path(path)
    what = f"{kind} tower weights ({TIMM_NAMES[kind]}: timm weights or a Hugging Face directory)"
    if not p.exists():
        raise _missing(p, what)
    if p.is_dir():
        conf = p / "config.json"
        if conf.is_file() and "model_type" in read_json_object(conf, BaseModelError):
            sd = hf_tower_to_ours(p, kind, tower, cfg.image_size)
            return {f"vision.{kind}.{k}": v for k, v in sd.items()}
        files = [p / f for f in TIMM_DIR_FILES if (p / f).is_file()]
        if not files:
            raise BaseModelError(f"{p}: holds none of {TIMM_DIR_FILES} (timm format) nor a Hugging Face config.json "
                                 f"with model_type (see {PRETRAINED_README})")
        p = files[0]
    sd = _tensor_dict(read_tensor_file(p, what), str(p))
    if any(k.startswith(OPEN_CLIP_PREFIX) for k in sd):
        sd = {k[len(OPEN_CLIP_PREFIX):]: v for k, v in sd.items() if k.startswith(OPEN_CLIP_PREFIX)}
    return {f"vision.{kind}.{k}": v for k, v in timm_vit_to_hf(sd, kind, tower, cfg.image_size, str(p)).items()}


# ------------------------------------------------------------------------------------ Prismatic checkpoint


def _checkpoint_groups(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """{group: state dict} from the .pt layout {"model": {group: sd}} or a flat "<group>.<key>" safetensors."""
    layout = "{'model': {'projector': …, 'llm_backbone': …[, 'vision_backbone': …]}} of plain tensors"
    if path.suffix == ".safetensors":
        groups: dict[str, dict[str, torch.Tensor]] = {}
        for k, v in read_safetensors(path, "a Prismatic VLM checkpoint", WeightsError).items():
            g, _, rest = k.partition(".")
            if g not in CHECKPOINT_GROUPS or not rest:
                raise WeightsError(f"{path}: unexpected key {k!r}; keys must start with one of {CHECKPOINT_GROUPS}")
            groups.setdefault(g, {})[rest] = v
    else:
        obj = read_tensor_file(path, "a Prismatic VLM checkpoint")
        groups = obj.get("model")
        if not isinstance(groups, dict):
            raise WeightsError(f"{path}: top-level keys {sorted(obj)}, expected {layout}")
        extra = set(groups) - set(CHECKPOINT_GROUPS)
        if extra:
            raise WeightsError(f"{path}: unexpected groups {sorted(extra)} under 'model', expected {layout}")
        groups = {g: _tensor_dict(sd, f"{path} ['model']['{g}']") for g, sd in groups.items()}
    for g in ("projector", "llm_backbone"):
        if g not in groups:
            raise WeightsError(f"{path}: no '{g}' weights; a Prismatic VLM checkpoint holds {layout}")
    return groups


def load_prismatic_checkpoint(path: Path | str, cfg: VLAConfig) -> dict[str, torch.Tensor]:
    """The Prismatic VLM checkpoint in our names: `projector.*`, `llm.*`, and `vision.{dino,siglip}.*` when the
    checkpoint holds the vision backbone (the frozen-vision "extra" models usually do not)."""
    p = Path(path)
    if not p.is_file():
        raise _missing(p, "Prismatic VLM checkpoint (prism-qwen25-extra-dinosiglip-224px-0_5b/checkpoints/"
                          "latest-checkpoint.pt)")
    groups = _checkpoint_groups(p)
    out = {f"projector.{k.removeprefix('projector.')}": v for k, v in groups["projector"].items()}
    llm = {k: v for k, v in groups["llm_backbone"].items() if not _NOT_WEIGHTS.match(k)}
    bad = sorted(k for k in llm if not k.startswith("llm."))
    if bad:
        raise WeightsError(f"{p}: llm_backbone keys must start with 'llm.' (Hugging Face Qwen2 names), got {bad[:5]}")
    out.update(llm)
    emb, head = "llm.model.embed_tokens.weight", "llm.lm_head.weight"
    if cfg.llm.tie_word_embeddings and emb in out:
        # safetensors cannot store the shared tensor twice, so a tied output head may be absent
        if head in out and not torch.equal(out[head], out[emb]):
            raise WeightsError(f"{p}: {head} differs from {emb}, but the config ties them (tie_word_embeddings)")
        out[head] = out[emb]
    vision = groups.get("vision_backbone", {})
    for kind in TOWER_KINDS:
        pre = PRISMATIC_PREFIX[kind]
        sd = {k[len(pre):]: v for k, v in vision.items() if k.startswith(pre)}
        if sd:
            mapped = timm_vit_to_hf(sd, kind, _tower(cfg, kind), cfg.image_size, f"{p} [vision_backbone.{pre}*]")
            out.update({f"vision.{kind}.{k}": v for k, v in mapped.items()})
    stray = sorted(k for k in vision if not k.startswith(tuple(PRISMATIC_PREFIX.values())))
    # towers are optional here (checked whole by timm_vit_to_hf when present); projector and LLM are not
    expected = {k: s for k, s in vlm_shapes(cfg).items()
                if k.startswith(("projector.", "llm.")) or (k in out and k.startswith("vision."))}
    check_state_dict(out, expected, str(p), f"config {cfg.name!r}", [f"vision_backbone.{k}" for k in stray])
    return out


def towers_in(sd: dict[str, torch.Tensor]) -> set[str]:
    return {kind for kind in TOWER_KINDS if any(k.startswith(f"vision.{kind}.") for k in sd)}


def assemble_vlm_state(cfg: VLAConfig, prismatic_checkpoint: Path | str, dino_path: Path | str | None = None,
                       siglip_path: Path | str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The complete VLM state dict and where each part came from.

    A tower inside the Prismatic checkpoint wins over a separate file: it is what the VLM was trained with.
    """
    sd = load_prismatic_checkpoint(prismatic_checkpoint, cfg)
    sources = {"projector": str(prismatic_checkpoint), "llm": str(prismatic_checkpoint)}
    inside = towers_in(sd)
    for kind, path in (("dino", dino_path), ("siglip", siglip_path)):
        if kind in inside:
            sources[kind] = str(prismatic_checkpoint)
        elif path is None:
            raise BaseModelError(
                f"{prismatic_checkpoint} holds no {kind} tower weights: give --{kind}_path ({TIMM_NAMES[kind]}, "
                f"timm .safetensors or a Hugging Face directory; see {PRETRAINED_README})"
            )
        else:
            sd.update(load_vision_tower(path, kind, cfg))
            sources[kind] = str(path)
    check_state_dict(sd, vlm_shapes(cfg), "the assembled VLM weights", f"config {cfg.name!r}")
    return sd, sources
