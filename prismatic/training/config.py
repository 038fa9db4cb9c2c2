"""The fine-tuning configuration: one draccus dataclass, docs/DESIGN.md §2 defaults.

`config_name` picks the model (`tiny` trains on a CPU; `qwen25-dinosiglip-224px` is the published size).
Batch size is per process: the global batch is batch_size × processes × grad_accumulation_steps.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch

from prismatic.cli import check_finite
from prismatic.models import BaseModelConfig
from prismatic.models.configuration import CONFIGS, ExpertArch
from prismatic.vla.augmentation import ImageAugConfig
from prismatic.vla.datasets.dataset import DatasetFormat

# the CLI's choices are aliases: draccus drops the help of a field whose Literal is written inline
LrSchedule = Literal["constant", "cosine", "linear"]
ActionLoss = Literal["l1", "mse"]
WandbMode = Literal["offline", "online"]
Device = Literal["auto", "cpu", "cuda"]
AttnImplementation = Literal["auto", "sdpa", "eager", "flash_attention_2"]


class ConfigError(ValueError):
    """A configuration value is invalid or inconsistent."""


class TrainingDiverged(RuntimeError):
    """The loss stopped being a number: the settings (usually the learning rate) must change."""


@dataclass
class FinetuneConfig:
    # model
    config_name: str = "qwen25-dinosiglip-224px"  # model config: the published size, or "tiny" (trains on CPU)
    expert_arch: ExpertArch = "cross_attn"  # "self_attn" = the VLA-Adapter baseline
    base: BaseModelConfig = field(default_factory=BaseModelConfig)  # θ0; tiny with nothing set → random seed 0
    seed: int = 7  # trainable-part init, data order, augmentation, noise: the same seed for every expert

    # data
    data_root: Path = Path("data/libero")  # folder holding one directory per suite
    suite: str = "libero_spatial"  # a directory under data_root (libero_spatial|object|goal|10|90, or TableTop-4's)
    dataset_format: DatasetFormat = "hdf5"  # raw LIBERO HDF5 files, or OpenVLA's modified_libero_rlds
    # files marked mergevla_keep_noops (TableTop-4's scripted demos) keep theirs: their still steps wait for the fingers
    filter_noops: bool = True  # drop no-op steps from raw HDF5 demos, as the RLDS release did
    preload_images_gb: float = 4.0  # load HDF5 images into memory when they fit in this many GB
    cache_stats: bool = True  # cache norm stats + fingerprint next to the data
    num_workers: int = 0  # data-loader processes (0: load in the training process)

    # optimisation (docs/DESIGN.md §2)
    batch_size: int = 8  # samples per process and micro-step
    grad_accumulation_steps: int = 2  # micro-steps per optimizer step
    lr: float = 2e-4  # AdamW learning rate (peak, with a schedule)
    weight_decay: float = 0.01  # AdamW's decoupled weight decay
    lr_schedule: LrSchedule = "constant"  # the lr after the warm-up: flat, or decaying to lr × min_lr_ratio
    warmup_steps: int = 0  # optimizer steps over which the lr rises linearly to lr
    min_lr_ratio: float = 0.0  # cosine/linear decay ends at lr × this at max_steps
    max_grad_norm: float = 0.0  # 0: no clipping
    max_steps: int = 30_000  # optimizer steps (bash_scripts/finetune_libero.sh sets it per suite)
    image_aug: bool = True  # random crop and colour jitter of the training images (--aug.*)
    aug: ImageAugConfig = field(default_factory=ImageAugConfig)
    action_loss: ActionLoss = "l1"  # L1 as published

    # run
    out_dir: Optional[Path] = None  # default: runs/<suite>-<config_name>-<expert_arch>-seed<seed>
    save_every: int = 5_000  # checkpoint every N optimizer steps (and at the end)
    keep_train_states: int = 1  # optimizer states kept (the newest ones); model weights are never deleted
    resume: bool = False  # continue from the latest checkpoint in out_dir (start fresh if there is none)
    log_every: int = 10  # optimizer steps between metrics.jsonl records
    progress_bar: bool = True  # a tqdm bar; false: each logged step is a log line (batch jobs)
    wandb: bool = False  # also log to Weights & Biases (the wandb extra)
    wandb_project: str = "mergevla"  # W&B project name
    wandb_mode: WandbMode = "offline"  # online needs W&B credentials; offline runs sync later
    device: Device = "auto"  # auto: CUDA when available
    cpu_threads: int = 0  # torch threads when training on CPU (0: torch's default); tiny models run best on 1
    attn_implementation: AttnImplementation = "auto"  # LLM attention; auto: flash-attention 2 on a GPU if installed

    def run_dir(self) -> Path:
        if self.out_dir is not None:
            return Path(self.out_dir)
        return Path("runs") / f"{self.suite}-{self.config_name}-{self.expert_arch}-seed{self.seed}"

    def base_model(self) -> BaseModelConfig:
        """The tiny config needs no pretrained weights: with no base given it uses a random base (seed 0)."""
        if self.base.describe() == "nothing" and self.config_name == "tiny":
            return BaseModelConfig(random_seed=0)
        return self.base

    def validate(self) -> None:
        if self.config_name not in CONFIGS:
            raise ConfigError(f"config_name is {self.config_name!r}, expected one of {sorted(CONFIGS)}")
        positive = ("batch_size", "grad_accumulation_steps", "max_steps", "save_every", "log_every",
                    "keep_train_states")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} is {getattr(self, name)}, expected a positive integer")
        for name in ("warmup_steps", "num_workers", "cpu_threads", "seed"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} is {getattr(self, name)}, expected >= 0")
        check_finite(self, ("lr", "weight_decay", "max_grad_norm", "min_lr_ratio"), ConfigError)
        if self.lr <= 0 or self.weight_decay < 0 or self.max_grad_norm < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("need lr > 0, weight_decay >= 0, max_grad_norm >= 0 and min_lr_ratio in [0, 1]")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device is 'cuda' but no CUDA device is available (use --device cpu or auto)")
        if self.attn_implementation == "flash_attention_2" and (self.device == "cpu" or not torch.cuda.is_available()):
            raise ConfigError("attn_implementation flash_attention_2 needs a CUDA device")
        if self.warmup_steps >= self.max_steps and self.lr_schedule != "constant":
            raise ConfigError(f"warmup_steps ({self.warmup_steps}) must be below max_steps ({self.max_steps})")
        # the CLI enforces each field's choices; a config built in Python must fail here too, before run.json
        for name, hint in typing.get_type_hints(FinetuneConfig).items():
            if typing.get_origin(hint) is Literal and getattr(self, name) not in typing.get_args(hint):
                raise ConfigError(f"{name} is {getattr(self, name)!r}, expected one of {list(typing.get_args(hint))}")
        try:
            self.aug.validate()
        except ValueError as e:
            raise ConfigError(str(e)) from e

    def to_dict(self) -> dict:
        def enc(v):
            if dataclasses.is_dataclass(v):
                return {f.name: enc(getattr(v, f.name)) for f in dataclasses.fields(v)}
            if isinstance(v, Path):
                return str(v)
            if isinstance(v, tuple):
                return [enc(x) for x in v]
            return v

        return enc(self)


# Fields that may change when a run is resumed: how it is run, not what it learns. (Moved data or base
# weights are fine: the data fingerprint and the base's sha256 are checked instead of their paths.)
RESUMABLE_FIELDS = ("data_root", "base", "resume", "out_dir", "save_every", "keep_train_states", "log_every", "progress_bar", "wandb",
                    "wandb_project", "wandb_mode", "num_workers", "device", "cpu_threads", "attn_implementation", "max_steps",
                    "preload_images_gb", "cache_stats")


# Fields added after runs were first recorded, with the value every older run was trained with.
LATER_FIELDS = {"action_loss": "l1"}


def run_identity(cfg_dict: dict) -> dict:
    """The part of a config that must match for a resumed run to continue the same training."""
    ident = {**LATER_FIELDS, **{k: v for k, v in cfg_dict.items() if k not in RESUMABLE_FIELDS}}
    if cfg_dict.get("lr_schedule", "constant") != "constant":  # a decaying schedule depends on max_steps
        ident["max_steps"] = cfg_dict.get("max_steps")
    return ident
