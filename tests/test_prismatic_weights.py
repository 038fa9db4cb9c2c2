"""Prismatic / timm weights → our modules, checked numerically without real weights and without timm.

The reference below is a from-scratch ViT forward with timm's semantics (fused qkv, layer scale, DINOv2-reg's
cls + register tokens prepended *after* the patch-only position embedding); random timm-format state dicts are
mapped and loaded into the transformers towers, whose second-to-last-block patch features must match it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import (
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    SiglipConfig,
    SiglipModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from prismatic.models.configuration import VLAConfig, get_config
from prismatic.models.loading import BaseModelError
from prismatic.models.modeling import PrismaticVLM, Qwen2ForCausalLM, make_projector, qwen2_hf_config
from prismatic.models.prismatic_weights import (
    WeightsError,
    assemble_vlm_state,
    load_prismatic_checkpoint,
    load_vision_tower,
    resample_grid,
    timm_vit_to_hf,
    tower_hf_config,
)

CFG = get_config("tiny")  # 64 px images, patch 16 → 4×4 grid; 3 blocks per tower (2 built)
GRID = CFG.image_size // CFG.dino.patch_size
REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ reference (timm)


def random_timm_sd(kind: str, src_grid: int, seed: int, extra_head: bool = True) -> dict[str, torch.Tensor]:
    t = getattr(CFG, kind)
    d, f, p = t.hidden_size, t.intermediate_size, t.patch_size
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.1, base=0.0):
        return base + scale * torch.randn(*shape, generator=g)

    sd = {"patch_embed.proj.weight": r(d, 3, p, p), "patch_embed.proj.bias": r(d), "pos_embed": r(1, src_grid**2, d),
          "norm.weight": r(d, base=1.0), "norm.bias": r(d)}
    if kind == "dino":
        sd.update(cls_token=r(1, 1, d, scale=1.0), reg_token=r(1, t.num_register_tokens, d, scale=1.0))
    for i in range(t.num_layers):
        b = f"blocks.{i}."
        sd.update({
            b + "norm1.weight": r(d, base=1.0), b + "norm1.bias": r(d), b + "norm2.weight": r(d, base=1.0),
            b + "norm2.bias": r(d), b + "attn.qkv.weight": r(3 * d, d), b + "attn.qkv.bias": r(3 * d),
            b + "attn.proj.weight": r(d, d), b + "attn.proj.bias": r(d), b + "mlp.fc1.weight": r(f, d),
            b + "mlp.fc1.bias": r(f), b + "mlp.fc2.weight": r(d, f), b + "mlp.fc2.bias": r(d),
        })
        if kind == "dino":  # far from timm's 1e-5 init so that a dropped layer scale shows
            sd.update({b + "ls1.gamma": r(d, scale=0.3, base=1.0), b + "ls2.gamma": r(d, scale=0.3, base=1.0)})
    if kind == "siglip" and extra_head:  # attention-pool head: present in timm files, never run by us
        sd.update({"attn_pool.latent": r(1, 1, d), "attn_pool.q.weight": r(d, d), "attn_pool.kv.weight": r(2 * d, d),
                   "attn_pool.norm.weight": r(d), "attn_pool.mlp.fc1.weight": r(f, d)})
    return sd


def timm_reference(sd: dict, x: torch.Tensor, kind: str, tower=None) -> torch.Tensor:
    """Patch features after block num_layers-2 (the second-to-last), timm semantics, no prefix tokens; the MLP's
    GELU in the form the tower config names (timm's own towers: exact)."""
    t = tower or getattr(CFG, kind)
    d, heads = t.hidden_size, t.num_heads
    hd = d // heads
    h = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=t.patch_size)
    h = h.flatten(2).transpose(1, 2)
    pos = sd["pos_embed"]
    side = round(pos.shape[1] ** 0.5)
    if side != GRID:  # what timm does when created at another image size (img_size=224 for the 518 px model)
        pos = pos.reshape(1, side, side, d).permute(0, 3, 1, 2)
        pos = F.interpolate(pos, size=(GRID, GRID), mode="bicubic", align_corners=False, antialias=True)
        pos = pos.permute(0, 2, 3, 1).reshape(1, GRID * GRID, d)
    h = h + pos
    prefix = 0
    if kind == "dino":  # no_embed_class: cls and registers come in after the position embedding
        b = h.shape[0]
        h = torch.cat([sd["cls_token"].expand(b, -1, -1), sd["reg_token"].expand(b, -1, -1), h], dim=1)
        prefix = 1 + t.num_register_tokens
    for i in range(t.num_layers - 1):
        w = {k[len(f"blocks.{i}."):]: v for k, v in sd.items() if k.startswith(f"blocks.{i}.")}
        b, n, _ = h.shape
        y = F.layer_norm(h, (d,), w["norm1.weight"], w["norm1.bias"], eps=t.layer_norm_eps)
        q, k, v = F.linear(y, w["attn.qkv.weight"], w["attn.qkv.bias"]).reshape(b, n, 3, heads, hd).permute(2, 0, 3, 1, 4)
        a = torch.softmax((q @ k.transpose(-1, -2)) * hd**-0.5, dim=-1) @ v
        y = F.linear(a.transpose(1, 2).reshape(b, n, d), w["attn.proj.weight"], w["attn.proj.bias"])
        h = h + (y * w["ls1.gamma"] if kind == "dino" else y)
        y = F.layer_norm(h, (d,), w["norm2.weight"], w["norm2.bias"], eps=t.layer_norm_eps)
        y = F.gelu(F.linear(y, w["mlp.fc1.weight"], w["mlp.fc1.bias"]), approximate="none" if t.hidden_act == "gelu" else "tanh")
        y = F.linear(y, w["mlp.fc2.weight"], w["mlp.fc2.bias"])
        h = h + (y * w["ls2.gamma"] if kind == "dino" else y)
    return h[:, prefix:]


def our_tower(kind: str, sd: dict, tower=None) -> torch.nn.Module:
    cls = Dinov2WithRegistersModel if kind == "dino" else SiglipVisionModel
    m = cls(tower_hf_config(kind, tower or getattr(CFG, kind), CFG.image_size)).eval()
    m.load_state_dict(sd, strict=True)
    return m


def tower_features(m: torch.nn.Module, kind: str, x: torch.Tensor) -> torch.Tensor:
    prefix = 1 + CFG.dino.num_register_tokens if kind == "dino" else 0
    with torch.no_grad():
        return m(pixel_values=x, output_hidden_states=True).hidden_states[-1][:, prefix:]


def images(seed: int = 0, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, CFG.image_size, CFG.image_size, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ timm → HF


@pytest.mark.parametrize("kind,src_grid,act", [("dino", GRID, None), ("dino", 12, None), ("siglip", GRID, None),
                                              ("siglip", GRID, "gelu")])
def test_timm_tower_matches_reference_forward(kind, src_grid, act):
    tower = getattr(CFG, kind) if act is None else dataclasses.replace(getattr(CFG, kind), hidden_act=act)
    sd = random_timm_sd(kind, src_grid, seed=1)
    mapped = timm_vit_to_hf(sd, kind, tower, CFG.image_size)
    x = images()
    ref = timm_reference(sd, x, kind, tower)
    got = tower_features(our_tower(kind, mapped, tower), kind, x)
    assert got.shape == (2, GRID * GRID, getattr(CFG, kind).hidden_size)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    if kind == "dino":  # the cls slot of the transformers table is zero: timm adds no position to the cls token
        assert torch.all(mapped["embeddings.position_embeddings"][0, 0] == 0)


def test_the_real_towers_run_timms_exact_gelu_and_older_files_load_as_built():
    """The Prismatic VLM ran both towers in timm, whose DINOv2 and SigLIP so400m use exact GELU; the tanh form
    (transformers' SigLIP default) gives other features, so it matters which one runs."""
    real = get_config("qwen25-dinosiglip-224px")
    assert real.dino.hidden_act == real.siglip.hidden_act == "gelu"
    sd = random_timm_sd("siglip", GRID, seed=1)
    x = images()
    exact = dataclasses.replace(CFG.siglip, hidden_act="gelu")
    tanh = dataclasses.replace(CFG.siglip, hidden_act="gelu_pytorch_tanh")
    ref = timm_reference(sd, x, "siglip", exact)
    got = tower_features(our_tower("siglip", timm_vit_to_hf(sd, "siglip", tanh, CFG.image_size), tanh), "siglip", x)
    assert (got - ref).abs().max() > 1e-4
    # a config recorded before the field (the shipped tiny base, older checkpoints) loads with the tanh form it
    # was built with; one recorded now keeps what it says
    old = CFG.to_dict()
    del old["siglip"]["hidden_act"], old["dino"]["hidden_act"]
    assert VLAConfig.from_dict(old) == CFG and CFG.siglip.hidden_act == "gelu_pytorch_tanh"
    assert VLAConfig.from_dict(real.to_dict()) == real


def test_resample_keeps_row_major_grid_layout():
    side, d = 6, 3
    cols = torch.arange(side, dtype=torch.float32).repeat(side)  # value = column index, constant down columns
    pos = torch.stack([cols, cols * 2, cols - 1], dim=1)
    out = resample_grid(pos, 4, "test", "pos_embed").reshape(4, 4, d)
    assert torch.allclose(out, out[:1].expand(4, -1, -1))  # still constant along rows: no transpose
    assert torch.all(out[0, 1:, 0] > out[0, :-1, 0])  # and increasing along columns
    assert resample_grid(pos, side, "test", "pos_embed") is pos
    with pytest.raises(WeightsError, match="not a square grid"):
        resample_grid(pos[:-1], 4, "file.safetensors", "pos_embed")


def test_timm_mapping_errors_name_key_and_source():
    t = CFG.dino
    sd = random_timm_sd("dino", GRID, seed=2)
    with pytest.raises(WeightsError, match=r"dino\.safetensors.*unexpected keys: blocks\.0\.attn\.extra\.weight"):
        timm_vit_to_hf({**sd, "blocks.0.attn.extra.weight": torch.zeros(1)}, "dino", t, CFG.image_size, "dino.safetensors")
    bad = dict(sd)
    del bad["blocks.1.ls2.gamma"]
    with pytest.raises(WeightsError, match=r"missing keys: encoder\.layer\.1\.layer_scale2\.lambda1"):
        timm_vit_to_hf(bad, "dino", t, CFG.image_size)
    bad = {**sd, "blocks.0.mlp.fc1.bias": torch.zeros(7)}
    with pytest.raises(WeightsError, match=r"encoder\.layer\.0\.mlp\.fc1\.bias has shape \(7,\), expected \(128,\)"):
        timm_vit_to_hf(bad, "dino", t, CFG.image_size)
    deeper = {**sd, **{k.replace("blocks.2.", "blocks.5."): v for k, v in sd.items() if k.startswith("blocks.2.")}}
    with pytest.raises(WeightsError, match="has 6 transformer blocks, but the config expects 3"):
        timm_vit_to_hf(deeper, "dino", t, CFG.image_size)
    # a file that already lacks the unused last block is fine
    short = {k: v for k, v in sd.items() if not k.startswith("blocks.2.")}
    assert timm_vit_to_hf(short, "dino", t, CFG.image_size).keys() == timm_vit_to_hf(sd, "dino", t, CFG.image_size).keys()


def test_siglip_table_at_another_grid_is_refused_not_resampled(tmp_path):
    """A 384-px SigLIP (27×27 patches of 14 px) is another tower, not a resampling away from the 224-px one."""
    sd = random_timm_sd("siglip", 27, seed=4)
    save_file(sd, str(tmp_path / "siglip384.safetensors"))
    with pytest.raises(WeightsError, match=r"siglip384\.safetensors: pos_embed is a 27×27 SigLIP position table "
                                           rf"where the config expects {GRID}×{GRID}"):
        load_vision_tower(tmp_path / "siglip384.safetensors", "siglip", CFG)
    # the same inside a Prismatic checkpoint, and from a Hugging Face directory
    parts = prismatic_parts()
    parts["vision_backbone"].update({f"siglip_featurizer.{k}": v for k, v in sd.items()})
    torch.save({"model": parts}, tmp_path / "ckpt.pt")
    with pytest.raises(WeightsError, match=r"ckpt\.pt \[vision_backbone\.siglip_featurizer\.\*\]: pos_embed is a 27×27"):
        load_prismatic_checkpoint(tmp_path / "ckpt.pt", CFG)
    s = CFG.siglip
    SiglipVisionModel(SiglipVisionConfig(
        hidden_size=s.hidden_size, num_hidden_layers=s.num_layers, num_attention_heads=s.num_heads,
        intermediate_size=s.intermediate_size, image_size=27 * s.patch_size, patch_size=s.patch_size,
        layer_norm_eps=s.layer_norm_eps,
    )).save_pretrained(tmp_path / "siglip_hf")
    with pytest.raises(WeightsError, match=r"siglip_hf: embeddings\.position_embedding\.weight is a 27×27 SigLIP"):
        load_vision_tower(tmp_path / "siglip_hf", "siglip", CFG)
    # DINOv2 at that grid is still resampled (its released table is 37×37)
    save_file(random_timm_sd("dino", 27, seed=4), str(tmp_path / "dino.safetensors"))
    dino = load_vision_tower(tmp_path / "dino.safetensors", "dino", CFG)
    assert dino["vision.dino.embeddings.position_embeddings"].shape == (1, 1 + GRID * GRID, CFG.dino.hidden_size)


def test_unreadable_safetensors_errors_name_the_file(tmp_path):
    bad = tmp_path / "latest-checkpoint.safetensors"
    bad.write_bytes(b"\x00" * 7)  # truncated: no complete header
    with pytest.raises(WeightsError, match=r"latest-checkpoint\.safetensors: cannot be read as a Prismatic VLM "
                                           r"checkpoint \(SafetensorError"):
        load_prismatic_checkpoint(bad, CFG)
    with pytest.raises(WeightsError, match=r"latest-checkpoint\.safetensors: cannot be read as dino tower weights"):
        load_vision_tower(bad, "dino", CFG)


def real_timm_shapes(kind: str, grid: int) -> dict[str, tuple[int, ...]]:
    """The released timm files' layout at full size (DINOv2-reg's table is 37×37 at 518 px)."""
    t = getattr(get_config("qwen25-dinosiglip-224px"), kind)
    d, f, p = t.hidden_size, t.intermediate_size, t.patch_size
    s = {"patch_embed.proj.weight": (d, 3, p, p), "patch_embed.proj.bias": (d,), "pos_embed": (1, grid * grid, d),
         "norm.weight": (d,), "norm.bias": (d,)}
    if kind == "dino":
        s.update(cls_token=(1, 1, d), reg_token=(1, t.num_register_tokens, d))
    else:
        s.update({"attn_pool.latent": (1, 1, d), "attn_pool.q.weight": (d, d), "attn_pool.kv.weight": (2 * d, d)})
    for i in range(t.num_layers):
        for name, shape in (("norm1", (d,)), ("norm2", (d,)), ("attn.qkv", (3 * d,)), ("attn.proj", (d,)),
                            ("mlp.fc1", (f,)), ("mlp.fc2", (d,))):
            s[f"blocks.{i}.{name}.bias"] = shape
            s[f"blocks.{i}.{name}.weight"] = {"attn.qkv": (3 * d, d), "attn.proj": (d, d), "mlp.fc1": (f, d),
                                              "mlp.fc2": (d, f)}.get(name, (d,))
        if kind == "dino":
            s.update({f"blocks.{i}.ls1.gamma": (d,), f"blocks.{i}.ls2.gamma": (d,)})
    return s


@pytest.mark.parametrize("kind,grid,params", [("dino", 37, 290_634_752), ("siglip", 16, 397_202_848)])
def test_real_size_timm_layouts_fit_the_real_config(kind, grid, params):
    """Full-size names and shapes, on the meta device (no memory): 23 of 24 / 26 of 27 blocks are kept."""
    cfg = get_config("qwen25-dinosiglip-224px")
    sd = {k: torch.empty(v, device="meta") for k, v in real_timm_shapes(kind, grid).items()}
    out = timm_vit_to_hf(sd, kind, getattr(cfg, kind), cfg.image_size)
    assert sum(v.numel() for v in out.values()) == params
    pos = out["embeddings.position_embeddings" if kind == "dino" else "embeddings.position_embedding.weight"]
    assert pos.shape[-2] == 256 + (kind == "dino")


# ------------------------------------------------------------------------------- Prismatic checkpoints


class NotATensor:
    """An arbitrary object: a checkpoint holding one must be refused, not unpickled."""


def prismatic_parts(seed: int = 3) -> dict[str, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    proj = {f"projector.{k}": v.detach().clone() for k, v in make_projector(CFG.vision_dim, CFG.llm.hidden_size)
            .state_dict().items()}
    llm = {f"llm.{k}": v.detach().clone() for k, v in Qwen2ForCausalLM(qwen2_hf_config(CFG)).state_dict().items()}
    # DINOv2's table at another grid, as the released 518-px one is; SigLIP's only ever at its own grid
    vision = {f"{pre}{k}": v for kind, pre in (("dino", "dino_featurizer."), ("siglip", "siglip_featurizer."))
              for k, v in random_timm_sd(kind, GRID + 2 if kind == "dino" else GRID, seed=seed + 10).items()}
    return {"projector": proj, "llm_backbone": llm, "vision_backbone": vision}


def fused_reference(parts: dict, x01: torch.Tensor) -> torch.Tensor:
    """Prismatic's fused features: both towers' patch features, each on its own normalisation, concatenated."""
    feats = []
    for kind, pre in (("dino", "dino_featurizer."), ("siglip", "siglip_featurizer.")):
        t = getattr(CFG, kind)
        sd = {k[len(pre):]: v for k, v in parts["vision_backbone"].items() if k.startswith(pre)}
        x = (x01 - torch.tensor(t.mean).view(1, 3, 1, 1)) / torch.tensor(t.std).view(1, 3, 1, 1)
        feats.append(timm_reference(sd, x, kind))
    return torch.cat(feats, dim=-1)


def loaded_vlm(sd: dict) -> PrismaticVLM:
    vlm = PrismaticVLM(CFG).eval()
    vlm.load_state_dict(sd, strict=True)
    return vlm


def check_vlm(vlm: PrismaticVLM, parts: dict) -> None:
    got = vlm.state_dict()
    for k, v in {**parts["projector"], **parts["llm_backbone"]}.items():
        assert torch.equal(got[k], v), k
    x01 = torch.rand(1, 2, 3, CFG.image_size, CFG.image_size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        feats = vlm.vision(x01)
    torch.testing.assert_close(feats, fused_reference(parts, x01.flatten(0, 1)).reshape(feats.shape), atol=1e-5,
                               rtol=1e-5)


def test_prismatic_pt_checkpoint_loads_strictly(tmp_path):
    parts = prismatic_parts()
    f = tmp_path / "checkpoints" / "latest-checkpoint.pt"
    f.parent.mkdir()
    torch.save({"model": parts}, f)
    sd = load_prismatic_checkpoint(f, CFG)
    check_vlm(loaded_vlm(sd), parts)


def test_a_base_wholly_from_files_builds_no_random_vlm_and_reads_only_the_tokenizer_from_llm_path(tmp_path, monkeypatch):
    import prismatic.models.loading as loading
    from prismatic.models import BaseModelConfig
    from prismatic.models.processing import build_tiny_tokenizer

    parts = prismatic_parts()
    f = tmp_path / "latest-checkpoint.pt"
    torch.save({"model": parts}, f)
    llm_dir = tmp_path / "qwen"  # the tokenizer only: the checkpoint's LLM is the one used
    llm_dir.mkdir()
    (llm_dir / "tokenizer.json").write_text(build_tiny_tokenizer().to_str())

    def unused(*_a, **_k):
        raise AssertionError("built or read weights that the checkpoint replaces")

    monkeypatch.setattr(loading, "random_base", unused)
    monkeypatch.setattr(loading, "load_qwen_hf", unused)
    sd, ref, tok = loading.resolve_base(CFG, BaseModelConfig(llm_path=llm_dir, prismatic_checkpoint=f))
    check_vlm(loaded_vlm(sd), parts)
    assert tok == llm_dir and ref["kind"] == "files" and ref["random_seed"] is None


def test_prismatic_safetensors_variant_matches_pt(tmp_path):
    parts = prismatic_parts()
    flat = {f"projector.{k}": v for k, v in parts["projector"].items()}  # → projector.projector.0.weight
    flat.update({f"llm_backbone.{k}": v.clone() for k, v in parts["llm_backbone"].items()
                 if k != "llm.lm_head.weight"})  # tied: safetensors keeps one copy
    flat.update({f"vision_backbone.{k}": v for k, v in parts["vision_backbone"].items()})
    save_file(flat, str(tmp_path / "ckpt.safetensors"))
    torch.save({"model": parts}, tmp_path / "ckpt.pt")
    a = load_prismatic_checkpoint(tmp_path / "ckpt.safetensors", CFG)
    b = load_prismatic_checkpoint(tmp_path / "ckpt.pt", CFG)
    assert a.keys() == b.keys() == PrismaticVLM(CFG).state_dict().keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_without_vision_takes_towers_from_files(tmp_path):
    parts = prismatic_parts()
    torch.save({"model": {g: parts[g] for g in ("projector", "llm_backbone")}}, tmp_path / "ckpt.pt")
    sd = load_prismatic_checkpoint(tmp_path / "ckpt.pt", CFG)
    assert not any(k.startswith("vision.") for k in sd)
    with pytest.raises(BaseModelError, match="holds no dino tower weights: give --dino_path"):
        assemble_vlm_state(CFG, tmp_path / "ckpt.pt")
    # DINOv2 as timm's Hub repo lays it out; SigLIP as timm gets it, from an OpenCLIP repo (text tower beside it)
    towers = {kind: {k[len(pre):]: v.contiguous() for k, v in parts["vision_backbone"].items() if k.startswith(pre)}
              for kind, pre in (("dino", "dino_featurizer."), ("siglip", "siglip_featurizer."))}
    (tmp_path / "dino_dir").mkdir()
    (tmp_path / "dino_dir" / "config.json").write_text(json.dumps({"architecture": "vit_large_patch14_reg4_dinov2"}))
    save_file(towers["dino"], str(tmp_path / "dino_dir" / "model.safetensors"))
    (tmp_path / "siglip_dir").mkdir()
    open_clip = {**{f"visual.trunk.{k}": v for k, v in towers["siglip"].items()},
                 "text.token_embedding.weight": torch.zeros(5, 3), "logit_scale": torch.zeros(())}
    torch.save(open_clip, tmp_path / "siglip_dir" / "open_clip_pytorch_model.bin")
    save_file(towers["dino"], str(tmp_path / "dino.safetensors"))  # a bare file works the same
    a, b = (load_vision_tower(tmp_path / f, "dino", CFG) for f in ("dino_dir", "dino.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(BaseModelError, match=r"holds none of \('model\.safetensors'"):
        load_vision_tower(tmp_path, "dino", CFG)
    full, sources = assemble_vlm_state(CFG, tmp_path / "ckpt.pt", tmp_path / "dino_dir", tmp_path / "siglip_dir")
    assert sources["dino"].endswith("dino_dir") and sources["siglip"].endswith("siglip_dir")
    check_vlm(loaded_vlm(full), parts)


def test_checkpoint_errors_name_key_and_file(tmp_path):
    parts = prismatic_parts()
    f = tmp_path / "latest-checkpoint.pt"

    def load_with(**groups):
        torch.save({"model": {**parts, **groups}}, f)
        return load_prismatic_checkpoint(f, CFG)

    proj = dict(parts["projector"])
    del proj["projector.2.bias"]
    with pytest.raises(WeightsError, match=r"latest-checkpoint\.pt: .*missing keys: projector\.2\.bias"):
        load_with(projector=proj)
    with pytest.raises(WeightsError, match=r"latest-checkpoint\.pt: .*unexpected keys: llm\.model\.extra\.weight"):
        load_with(llm_backbone={**parts["llm_backbone"], "llm.model.extra.weight": torch.zeros(2)})
    with pytest.raises(WeightsError, match=r"projector\.4\.weight has shape \(3, 3\), expected \(128, 128\)"):
        load_with(projector={**parts["projector"], "projector.4.weight": torch.zeros(3, 3)})
    with pytest.raises(WeightsError, match=r"vision_backbone\.dino_featurizer\..*unexpected keys: blocks\.0\.bogus"):
        load_with(vision_backbone={**parts["vision_backbone"], "dino_featurizer.blocks.0.bogus": torch.zeros(1)})
    torch.save({"model": {"projector": parts["projector"]}}, f)
    with pytest.raises(WeightsError, match="no 'llm_backbone' weights"):
        load_prismatic_checkpoint(f, CFG)
    torch.save(parts["projector"], f)
    with pytest.raises(WeightsError, match=r"top-level keys .* expected \{'model'"):
        load_prismatic_checkpoint(f, CFG)
    torch.save({"model": {"projector": NotATensor()}}, f)
    with pytest.raises(WeightsError, match=r"latest-checkpoint\.pt: cannot be read .* torch\.load\(weights_only=True\)"):
        load_prismatic_checkpoint(f, CFG)
    with pytest.raises(BaseModelError, match=r"no Prismatic VLM checkpoint .* at .*nope\.pt: put it there \(see pretrained"):
        load_prismatic_checkpoint(tmp_path / "nope.pt", CFG)


# ------------------------------------------------------------------------------ Hugging Face tower dirs


def test_hf_tower_directories_match_hf_forward(tmp_path):
    """A Hub-format DINOv2-reg at a larger image size (its table resampled by us) and a SigLIP with its head:
    our tower's last hidden state must equal the source model's own second-to-last-block output, with
    transformers interpolating the table at run time for DINOv2."""
    t = CFG.dino
    torch.manual_seed(7)
    dino = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(
        hidden_size=t.hidden_size, num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
        mlp_ratio=t.intermediate_size // t.hidden_size, image_size=96, patch_size=t.patch_size,
        num_register_tokens=t.num_register_tokens, layer_norm_eps=t.layer_norm_eps, layerscale_value=0.7,
    )).eval()
    with torch.no_grad():
        dino.embeddings.position_embeddings.normal_()
        dino.embeddings.cls_token.normal_()
        dino.embeddings.register_tokens.normal_()
    s = CFG.siglip
    siglip = SiglipVisionModel(SiglipVisionConfig(
        hidden_size=s.hidden_size, num_hidden_layers=s.num_layers, num_attention_heads=s.num_heads,
        intermediate_size=s.intermediate_size, image_size=CFG.image_size, patch_size=s.patch_size,
        layer_norm_eps=s.layer_norm_eps, vision_use_head=True,
    )).eval()
    x = images(seed=9)
    for kind, src in (("dino", dino), ("siglip", siglip)):
        src.save_pretrained(tmp_path / kind)
        sd = load_vision_tower(tmp_path / kind, kind, CFG)
        ours = our_tower(kind, {k[len(f"vision.{kind}."):]: v for k, v in sd.items()})
        prefix = 1 + t.num_register_tokens if kind == "dino" else 0
        with torch.no_grad():
            want = src(pixel_values=x, output_hidden_states=True).hidden_states[getattr(CFG, kind).num_layers - 1]
        torch.testing.assert_close(tower_features(ours, kind, x), want[:, prefix:], atol=1e-5, rtol=1e-5)
    # a full SigLIP (text tower too) directory: only its vision tower is taken
    full = SiglipModel(SiglipConfig(vision_config=siglip.config.to_dict(), text_config=dict(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=100,
        bos_token_id=1, eos_token_id=2, pad_token_id=1)))
    full.save_pretrained(tmp_path / "siglip_full")
    sd = load_vision_tower(tmp_path / "siglip_full", "siglip", CFG)
    for name, p in full.vision_model.named_parameters():
        if name.startswith(("embeddings.", "encoder.layers.0.", "encoder.layers.1.", "post_layernorm.")):
            assert torch.equal(sd[f"vision.siglip.{name}"], p), name
    with pytest.raises(WeightsError, match=r"config\.json: hidden_size is 64, but the siglip tower .* expects 32"):
        load_vision_tower(tmp_path / "siglip", "siglip", get_config("tiny", siglip=type(s)(
            hidden_size=32, num_layers=3, num_heads=4, intermediate_size=128, patch_size=8)))
    with pytest.raises(BaseModelError, match=r"no dino tower weights .* at .*missing: put it there"):
        load_vision_tower(tmp_path / "missing", "dino", CFG)
    # SigLIP's weights as published say the tanh GELU; a config that runs them with exact GELU (as the Prismatic
    # VLM did, in timm) takes them as they are, a config with another activation does not
    exact = get_config("tiny", siglip=dataclasses.replace(CFG.siglip, hidden_act="gelu"))
    assert all(torch.equal(v, sd[k]) for k, v in load_vision_tower(tmp_path / "siglip_full", "siglip", exact).items())
    with pytest.raises(WeightsError, match=r"hidden_act is 'gelu_pytorch_tanh', but the siglip tower .* expects 'relu'"):
        load_vision_tower(tmp_path / "siglip", "siglip", get_config("tiny", siglip=dataclasses.replace(
            CFG.siglip, hidden_act="relu")))


# ------------------------------------------------------------------------------------------ converter


def load_converter():
    spec = importlib.util.spec_from_file_location("convert_base", REPO / "vla-scripts" / "convert_base.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve the config's annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def test_convert_base_writes_a_loadable_base_dir(tmp_path):
    from prismatic.models import BaseModelConfig, build_vla
    from prismatic.models.processing import build_tiny_tokenizer

    conv = load_converter()
    parts = prismatic_parts()
    ckpt = tmp_path / "prism" / "checkpoints" / "latest-checkpoint.pt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"model": parts}, ckpt)
    llm_dir = tmp_path / "qwen"
    llm_dir.mkdir()
    (llm_dir / "tokenizer.json").write_text(build_tiny_tokenizer().to_str())
    out = tmp_path / "base"
    args = ["--config_name", "tiny", "--llm_path", str(llm_dir), "--prismatic_checkpoint", str(ckpt),
            "--out_dir", str(out)]
    cfg = conv.parse_args(args)
    conv.convert(cfg)
    meta = json.loads((out / "base.json").read_text())
    assert meta["format"] == "mergevla-base" and meta["sources"]["dino"] == str(ckpt)
    from prismatic.models.loading import load_base_dir

    base_sd, _ = load_base_dir(out, CFG)
    check_vlm(loaded_vlm(base_sd), parts)  # every tensor survives the file round trip, towers included
    model = build_vla("tiny", BaseModelConfig(base_dir=out))
    assert model.base_ref["sha256"] == meta["sha256"]
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        conv.convert(cfg)
    missing = conv.parse_args([*args[:-1], str(tmp_path / "other"), "--prismatic_checkpoint", str(tmp_path / "x.pt")])
    with pytest.raises(BaseModelError, match=r"missing inputs.*\n  --prismatic_checkpoint .*x\.pt: the Prismatic VLM"):
        conv.convert(missing)
    other = tmp_path / "other"
    with pytest.raises(BaseModelError, match="config_name is 'bogus'; expected one of"):
        conv.convert(conv.parse_args([*args[:-1], str(other), "--config_name", "bogus"]))
    (llm_dir / "tokenizer.json").write_text('{"model": 1}')
    with pytest.raises(BaseModelError, match=r"qwen/tokenizer\.json is not a tokenizer file"):
        conv.convert(conv.parse_args([*args[:-1], str(other)]))
    assert not other.exists()
    # an empty directory made for the base is filled; one that dies halfway leaves it empty, so a rerun goes on
    other.mkdir()
    (llm_dir / "tokenizer.json").write_text(build_tiny_tokenizer().to_str())
    conv.convert(conv.parse_args([*args[:-1], str(other)]))
    assert sorted(p.name for p in other.iterdir()) == sorted(p.name for p in out.iterdir())


# ------------------------------------------------------------------------------ edge cases of the mapping


def tiny_siglip_hf(**over) -> SiglipVisionModel:
    s = CFG.siglip
    kw = dict(hidden_size=s.hidden_size, num_hidden_layers=s.num_layers, num_attention_heads=s.num_heads,
              intermediate_size=s.intermediate_size, image_size=CFG.image_size, patch_size=s.patch_size,
              layer_norm_eps=s.layer_norm_eps)
    torch.manual_seed(13)
    return SiglipVisionModel(SiglipVisionConfig(**{**kw, **over})).eval()


def test_dino_mask_token_is_zero_unless_the_file_has_one():
    """The mask token is never run, but it is part of the base's weights (and its hash): absent from the file, it
    must be zero, not e.g. a copy of the cls token; present, it is taken as it is."""
    sd = random_timm_sd("dino", GRID, seed=6)
    d = CFG.dino.hidden_size
    out = timm_vit_to_hf(sd, "dino", CFG.dino, CFG.image_size)
    assert out["embeddings.mask_token"].shape == (1, d) and not out["embeddings.mask_token"].any()
    mask = torch.randn(1, 1, d)
    out = timm_vit_to_hf({**sd, "mask_token": mask}, "dino", CFG.dino, CFG.image_size)
    assert torch.equal(out["embeddings.mask_token"], mask.reshape(1, d))


def test_a_timm_directory_prefers_model_safetensors_over_other_weight_files(tmp_path):
    """TIMM_DIR_FILES is an order of preference: with both a model.safetensors and a pytorch_model.bin, the first."""
    d = tmp_path / "dino_dir"
    d.mkdir()
    save_file(random_timm_sd("dino", GRID, seed=1), str(d / "model.safetensors"))
    torch.save(random_timm_sd("dino", GRID, seed=2), d / "pytorch_model.bin")
    got = load_vision_tower(d, "dino", CFG)
    want = load_vision_tower(d / "model.safetensors", "dino", CFG)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def test_hf_tower_of_another_depth_is_refused(tmp_path):
    """A deeper Hugging Face tower would otherwise load its first blocks and pass every shape check."""
    tiny_siglip_hf(num_hidden_layers=CFG.siglip.num_layers + 2).save_pretrained(tmp_path / "deep")
    with pytest.raises(WeightsError, match=rf"deep/config\.json: num_hidden_layers is {CFG.siglip.num_layers + 2}, "
                                           rf"expected {CFG.siglip.num_layers}"):
        load_vision_tower(tmp_path / "deep", "siglip", CFG)
    # the short form (last, unused block already dropped) loads
    tiny_siglip_hf(num_hidden_layers=CFG.siglip.num_layers - 1).save_pretrained(tmp_path / "short")
    assert "vision.siglip.encoder.layers.1.mlp.fc2.bias" in load_vision_tower(tmp_path / "short", "siglip", CFG)


def test_hf_tower_with_missing_weights_is_refused_not_left_random(tmp_path):
    tiny_siglip_hf().save_pretrained(tmp_path / "siglip")
    f = tmp_path / "siglip" / "model.safetensors"
    sd = {k: v.contiguous() for k, v in load_file(str(f)).items()}
    gone = next(k for k in sd if k.endswith("encoder.layers.0.mlp.fc1.weight"))
    del sd[gone]
    save_file(sd, str(f), metadata={"format": "pt"})
    with pytest.raises(WeightsError, match=r"siglip: weights missing for .*encoder\.layers\.0\.mlp\.fc1\.weight"):
        load_vision_tower(tmp_path / "siglip", "siglip", CFG)


def test_hf_tower_with_another_layer_norm_eps_is_refused(tmp_path):
    """Fields no shape reveals must match too: another eps gives other features from the same weights."""
    tiny_siglip_hf(layer_norm_eps=1e-3).save_pretrained(tmp_path / "siglip")
    with pytest.raises(WeightsError, match=r"config\.json: layer_norm_eps is 0\.001, but the siglip tower of the "
                                           r"config expects 1e-06"):
        load_vision_tower(tmp_path / "siglip", "siglip", CFG)


def test_checkpoint_with_groups_or_keys_beyond_the_layout_is_refused(tmp_path):
    """Optimizer state or another model's weights in the file must be named, not silently ignored."""
    parts = prismatic_parts()
    torch.save({"model": {**parts, "optimizer": {"step": torch.zeros(())}}}, tmp_path / "ckpt.pt")
    with pytest.raises(WeightsError, match=r"ckpt\.pt: unexpected groups \['optimizer'\] under 'model'"):
        load_prismatic_checkpoint(tmp_path / "ckpt.pt", CFG)
    flat = {f"{g}.{k}": v.contiguous() for g, sd in parts.items() for k, v in sd.items() if k != "llm.lm_head.weight"}
    save_file({**flat, "optimizer.step": torch.zeros(())}, str(tmp_path / "ckpt.safetensors"))
    with pytest.raises(WeightsError, match=r"ckpt\.safetensors: unexpected key 'optimizer\.step'; keys must start "
                                           r"with one of \('projector', 'llm_backbone', 'vision_backbone'\)"):
        load_prismatic_checkpoint(tmp_path / "ckpt.safetensors", CFG)
    stray = {**parts["vision_backbone"], "clip_featurizer.blocks.0.norm1.weight": torch.zeros(3)}
    torch.save({"model": {**parts, "vision_backbone": stray}}, tmp_path / "stray.pt")
    with pytest.raises(WeightsError, match=r"unexpected keys: vision_backbone\.clip_featurizer\.blocks\.0\.norm1\.weight"):
        load_prismatic_checkpoint(tmp_path / "stray.pt", CFG)


def test_checkpoint_llm_buffers_are_dropped_and_an_untied_head_is_refused(tmp_path):
    parts = prismatic_parts()
    llm = parts["llm_backbone"]
    # older transformers saved the recomputed rotary buffer: not a weight, so it is left out rather than refused
    old = {**llm, "llm.model.rotary_emb.inv_freq": torch.ones(8)}
    torch.save({"model": {**parts, "llm_backbone": old}}, tmp_path / "old.pt")
    sd = load_prismatic_checkpoint(tmp_path / "old.pt", CFG)
    assert not any("inv_freq" in k for k in sd)
    assert torch.equal(sd["llm.lm_head.weight"], llm["llm.model.embed_tokens.weight"])
    # the config ties the output head to the embedding: a checkpoint whose head differs is not what it describes
    untied = {**llm, "llm.lm_head.weight": llm["llm.model.embed_tokens.weight"] + 1}
    torch.save({"model": {**parts, "llm_backbone": untied}}, tmp_path / "untied.pt")
    with pytest.raises(WeightsError, match=r"untied\.pt: llm\.lm_head\.weight differs from llm\.model\.embed_tokens"
                                           r"\.weight, but the config ties them"):
        load_prismatic_checkpoint(tmp_path / "untied.pt", CFG)


def test_towers_given_beside_a_random_seed_are_read_from_their_files(tmp_path):
    """random_seed with a checkpoint that lacks the towers: the named tower files fill them, not random weights."""
    from prismatic.models import BaseModelConfig
    from prismatic.models.loading import resolve_base
    from prismatic.models.processing import build_tiny_tokenizer

    parts = prismatic_parts()
    torch.save({"model": {g: parts[g] for g in ("projector", "llm_backbone")}}, tmp_path / "ckpt.pt")
    for kind, pre in (("dino", "dino_featurizer."), ("siglip", "siglip_featurizer.")):
        save_file({k[len(pre):]: v.contiguous() for k, v in parts["vision_backbone"].items() if k.startswith(pre)},
                  str(tmp_path / f"{kind}.safetensors"))
    llm_dir = tmp_path / "qwen"
    llm_dir.mkdir()
    (llm_dir / "tokenizer.json").write_text(build_tiny_tokenizer().to_str())
    sd, ref, _ = resolve_base(CFG, BaseModelConfig(llm_path=llm_dir, prismatic_checkpoint=tmp_path / "ckpt.pt",
                                                   dino_path=tmp_path / "dino.safetensors",
                                                   siglip_path=tmp_path / "siglip.safetensors", random_seed=0))
    for kind in ("dino", "siglip"):
        want = load_vision_tower(tmp_path / f"{kind}.safetensors", kind, CFG)
        assert all(torch.equal(sd[k], v) for k, v in want.items()), kind
    assert ref["dino_path"].endswith("dino.safetensors") and ref["random_seed"] == 0


def test_convert_base_stores_the_dtype_asked_for_and_checks_the_llm_directory(tmp_path):
    from prismatic.models.loading import load_base_dir
    from prismatic.models.processing import build_tiny_tokenizer

    conv = load_converter()
    parts = prismatic_parts()
    ckpt = tmp_path / "latest-checkpoint.pt"
    torch.save({"model": parts}, ckpt)
    llm_dir = tmp_path / "qwen"
    llm_dir.mkdir()
    (llm_dir / "tokenizer.json").write_text(build_tiny_tokenizer().to_str())
    args = ["--config_name", "tiny", "--llm_path", str(llm_dir), "--prismatic_checkpoint", str(ckpt)]
    conv.convert(conv.parse_args([*args, "--out_dir", str(tmp_path / "bf16"), "--dtype", "bfloat16"]))
    stored = load_file(str(tmp_path / "bf16" / "vlm.safetensors"))
    assert {v.dtype for v in stored.values()} == {torch.bfloat16}
    sd, meta = load_base_dir(tmp_path / "bf16", CFG)  # the recorded hash is that of the stored (cast) weights
    assert meta["dtype"] == "bfloat16" and len(meta["tied"]) == 1  # the tied head stays one tensor, stored once
    assert set(*meta["tied"].items()) == {"llm.lm_head.weight", "llm.model.embed_tokens.weight"}
    emb = parts["llm_backbone"]["llm.model.embed_tokens.weight"]
    assert torch.equal(sd["llm.model.embed_tokens.weight"], emb.to(torch.bfloat16))
    # a config.json in the LLM directory that is not the config's LLM is named before anything is converted
    (llm_dir / "config.json").write_text(json.dumps({"hidden_size": 64, "vocab_size": CFG.llm.vocab_size}))
    with pytest.raises(BaseModelError, match=r"qwen/config\.json: hidden_size is 64, config 'tiny' expects 128"):
        conv.convert(conv.parse_args([*args, "--out_dir", str(tmp_path / "other")]))
    assert not (tmp_path / "other").exists()
