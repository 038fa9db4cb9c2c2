"""Tiny LIBERO-layout datasets and tiny training configs shared by the data and fine-tuning tests."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from prismatic.training import FinetuneConfig
from prismatic.vla.datasets.synthetic import Task, make_tasks, write_hdf5_suite

SUITE = "libero_spatial"
HAS_TFDS = importlib.util.find_spec("tensorflow_datasets") is not None and importlib.util.find_spec("tensorflow")
needs_tfds = pytest.mark.skipif(
    not HAS_TFDS, reason="the `rlds` extra (tensorflow-cpu, tensorflow-datasets) is not installed"
)


def small_tasks(seed: int = 0, steps: int = 20, image_size: int = 16) -> list[Task]:
    return make_tasks(num_tasks=2, demos_per_task=2, steps=steps, image_size=image_size, seed=seed)


def hdf5_root(root: Path, tasks: list[Task] | None = None, suite: str = SUITE, upright: bool = False) -> Path:
    write_hdf5_suite(root, suite, tasks or small_tasks(), upright=upright)
    return root


def tiny_config(data_root: Path, out_dir: Path, **overrides) -> FinetuneConfig:
    """The tiny model on a random base, small batches: a few steps take well under a second each.

    One thread: the tiny model's ops are too small to gain from two, and two threads slow down several-fold
    when the suite shares the CPU with other processes."""
    cfg = FinetuneConfig(config_name="tiny", data_root=data_root, suite=SUITE, out_dir=out_dir, seed=0,
                         batch_size=2, grad_accumulation_steps=1, max_steps=4, save_every=2, log_every=1,
                         progress_bar=False, device="cpu", cpu_threads=1)
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise AttributeError(k)
        setattr(cfg, k, v)
    return cfg


def kept_steps(actions: np.ndarray) -> np.ndarray:
    from prismatic.vla.datasets import noop_keep_mask

    return np.flatnonzero(noop_keep_mask(actions))


# the knobs bash_scripts/*.sh read from the environment: a developer's exported SEED or CONFIG_NAME must not leak in
SCRIPT_KNOBS = ("SEED", "TRAIN_SEED", "EVAL_SEED", "EXPERT_ARCH", "CONFIG_NAME", "OUT_ROOT", "RESULTS_DIR",
                "SUMMARY_DIR", "QUICK", "DRY_RUN", "NUM_TRIALS", "TASK_IDS", "MAX_STEPS", "NUM_ENVS", "ENV_IMG_RES",
                "FAST_RENDER", "SAVE_VIDEOS", "DEVICE", "SUITES", "METHOD", "ROUTER_VARIANT", "MERGED_CKPT",
                "CKPT_SPATIAL", "CKPT_OBJECT", "CKPT_GOAL", "CKPT_10", "DATA_ROOT", "FORMAT", "BASE_DIR", "NPROC",
                "PYTHON", "ALGORITHMS", "MERGED_ROOT", "MASKS", "MASK_LAMBDA", "K_GATE", "EXPERT_HEAD_LAYERS",
                "MERGE_SEED", "MERGE_DEVICE")


def script_env(**extra: str) -> dict[str, str]:
    """os.environ without the scripts' knobs, plus `extra`."""
    import os

    return {**{k: v for k, v in os.environ.items() if k not in SCRIPT_KNOBS}, **extra}


def echo_python(path: Path) -> Path:
    """A stand-in interpreter that prints the command line it is given, except that a script fed on stdin (`-`,
    how the scripts read manifests) runs in the real one."""
    import sys

    path.write_text(f'#!/bin/sh\nif [ "$1" = "-" ]; then exec "{sys.executable}" "$@"; fi\nprintf "%s\\n" "$@"\n')
    path.chmod(0o755)
    return path
