"""Pretrain the tiny VLM on the TableTop-4 pretraining pool and write a mergevla base directory.

    python vla-scripts/pretrain_tabletop.py                      # regenerates pretrained_models/tabletop4-tiny-base
    python vla-scripts/pretrain_tabletop.py --steps 200 --out_dir runs/base-smoke
    python vla-scripts/pretrain_tabletop.py --evaluate_only true  # held-out accuracy of the shipped base

Every field of `PretrainConfig` (experiments/robot/tabletop_pipeline/vlm_pretrain.py) is a flag. The pool is
rendered to `--pool` first when that file does not exist. Refuses an existing `--out_dir` unless
`--overwrite true`. Bad input stops with exit code 2.
"""

from __future__ import annotations

import logging
import sys

import draccus

from experiments.robot.tabletop_pipeline.vlm_pretrain import PretrainConfig, PretrainError, pretrain


def main() -> int:
    cfg = draccus.parse(PretrainConfig)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        pretrain(cfg)
    except (PretrainError, FileExistsError, FileNotFoundError) as e:  # FileNotFoundError: no base to evaluate
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
