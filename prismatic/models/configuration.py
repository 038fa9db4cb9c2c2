"""Model configurations, registered by name.

`qwen25-dinosiglip-224px` is the published MergeVLA architecture (DINOv2 ViT-L/14-reg4 + SigLIP so400m/14,
Qwen2.5-0.5B, 24 action-expert blocks). `tiny` keeps every structural choice but shrinks widths, depths and
image size so that the whole pipeline trains on two CPU cores.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, get_args

ExpertArch = Literal["cross_attn", "self_attn"]


@dataclass
class VisionTowerConfig:
    hidden_size: int
    num_layers: int  # as published; the last block is never run (features come from the one before)
    num_heads: int
    intermediate_size: int
    patch_size: int = 14
    num_register_tokens: int = 0  # DINOv2-reg only
    layer_norm_eps: float = 1e-6
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    # the MLP activation as the VLM's training ran the tower: the Prismatic VLM ran both towers in timm, whose
    # DINOv2 and SigLIP so400m use exact GELU (transformers' SigLIP config says the tanh approximation)
    hidden_act: str = "gelu"


# what every SigLIP config recorded before `hidden_act` existed was built with (transformers' SigLIP default)
LEGACY_SIGLIP_ACT = "gelu_pytorch_tanh"


@dataclass
class LLMConfig:
    hidden_size: int = 896
    num_layers: int = 24
    num_heads: int = 14
    num_kv_heads: int = 2
    intermediate_size: int = 4864
    vocab_size: int = 151936
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = True


@dataclass
class LoRAConfig:
    r: int = 64
    alpha: int = 128
    dropout: float = 0.0

    @property
    def scale(self) -> float:
        return self.alpha / self.r


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class VLAConfig:
    name: str = "qwen25-dinosiglip-224px"
    image_size: int = 224
    num_images: int = 2  # third-person + wrist
    dino: VisionTowerConfig = field(
        default_factory=lambda: VisionTowerConfig(
            hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096, patch_size=14,
            num_register_tokens=4, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        )
    )
    siglip: VisionTowerConfig = field(
        default_factory=lambda: VisionTowerConfig(
            hidden_size=1152, num_layers=27, num_heads=16, intermediate_size=4304, patch_size=14,
        )
    )
    llm: LLMConfig = field(default_factory=LLMConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    num_action_queries: int = 64
    chunk_len: int = 8
    action_dim: int = 7
    proprio_dim: int = 8
    expert_heads: int = 8
    expert_arch: ExpertArch = "cross_attn"  # "self_attn" = the VLA-Adapter baseline that does not merge
    expert_noise_std: float = 0.02  # noise added to the expert's (zero) input during training only
    tokenizer: Literal["qwen", "tiny"] = "qwen"

    @property
    def patches_per_image(self) -> int:
        assert self.dino.patch_size == self.siglip.patch_size, "both towers must share the patch grid"
        return (self.image_size // self.dino.patch_size) ** 2

    @property
    def num_vision_tokens(self) -> int:
        return self.num_images * self.patches_per_image

    @property
    def vision_dim(self) -> int:
        return self.dino.hidden_size + self.siglip.hidden_size

    @property
    def num_expert_blocks(self) -> int:
        return self.llm.num_layers

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> VLAConfig:
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown VLAConfig fields {sorted(unknown)}; expected a subset of {sorted(known)}")
        sub = {"dino": VisionTowerConfig, "siglip": VisionTowerConfig, "llm": LLMConfig, "lora": LoRAConfig}
        for k, typ in sub.items():
            if k in d:
                if not isinstance(d[k], dict):
                    raise ValueError(f"VLAConfig field {k!r} is {d[k]!r}, expected an object of {typ.__name__} fields")
                v = dict(d[k])
                known = {f.name for f in dataclasses.fields(typ)}
                if k == "siglip":  # a file from before the field: load it as it was built, unchanged
                    v.setdefault("hidden_act", LEGACY_SIGLIP_ACT)
                if unknown := set(v) - known:
                    raise ValueError(f"unknown {typ.__name__} fields {sorted(unknown)} in {k!r}; expected a subset "
                                     f"of {sorted(known)}")
                for t in ("mean", "std"):
                    if t in v:
                        v[t] = tuple(v[t])
                d[k] = typ(**v)
        return cls(**d)


def _tiny() -> VLAConfig:
    return VLAConfig(
        name="tiny",
        image_size=64,
        # patch 16: 4×4 patches per camera, 32 vision tokens; twice the training throughput of patch 8 on CPU,
        # and on TableTop-4 the experts trained in the same wall time follow the instruction far better
        dino=VisionTowerConfig(
            hidden_size=64, num_layers=3, num_heads=4, intermediate_size=128, patch_size=16,
            num_register_tokens=4, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        ),
        # the shipped tiny base was pretrained with transformers' SigLIP activation
        siglip=VisionTowerConfig(hidden_size=64, num_layers=3, num_heads=4, intermediate_size=128, patch_size=16,
                                 hidden_act=LEGACY_SIGLIP_ACT),
        llm=LLMConfig(
            hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=384,
            vocab_size=512, rope_theta=10_000.0, max_position_embeddings=1024,
        ),
        lora=LoRAConfig(r=16, alpha=32),
        num_action_queries=16,
        expert_heads=4,
        tokenizer="tiny",
    )


CONFIGS: dict[str, Callable[[], VLAConfig]] = {
    "qwen25-dinosiglip-224px": VLAConfig,
    "tiny": _tiny,
}


def get_config(name: str, **overrides) -> VLAConfig:
    if name not in CONFIGS:
        raise ValueError(f"unknown config_name {name!r}; expected one of {sorted(CONFIGS)}")
    cfg = CONFIGS[name]()
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise ValueError(f"unknown VLAConfig field {k!r}")
        setattr(cfg, k, v)
    if cfg.expert_arch not in get_args(ExpertArch):  # the model would silently build the cross-attention expert
        raise ValueError(f"expert_arch is {cfg.expert_arch!r}, expected one of {list(get_args(ExpertArch))}")
    return cfg
