"""Pretrain the tiny VLM on the TableTop-4 pretraining pool and write a mergevla base directory.

    python vla-scripts/pretrain_tabletop.py --overwrite true     # regenerates pretrained_models/tabletop4-tiny-base
    python vla-scripts/pretrain_tabletop.py --steps 200 --out_dir runs/base-smoke
    python vla-scripts/pretrain_tabletop.py --evaluate_only true  # held-out accuracy of the shipped base

Every field of `PretrainConfig` (experiments/robot/tabletop_pipeline/vlm_pretrain.py) is a flag. The pool is
rendered to `--pool` first when that file does not exist. Refuses an existing `--out_dir` unless
`--overwrite true`. Bad input stops with exit code 2.
"""

from __future__ import annotations

import logging
import sys

from experiments.robot.tabletop_pipeline.vlm_pretrain import PretrainConfig, PretrainError, pretrain
from prismatic.cli import run_cli


def run(cfg: PretrainConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    pretrain(cfg)


def main() -> int:
    # FileNotFoundError: no base to evaluate
    return run_cli("pretrain_tabletop", PretrainConfig, run, (PretrainError, FloatingPointError, FileNotFoundError))


if __name__ == "__main__":
    sys.exit(main())
