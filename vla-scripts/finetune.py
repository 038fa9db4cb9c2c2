"""Fine-tune one MergeVLA expert on one suite.

    python vla-scripts/finetune.py --config_name tiny --data_root data/synthetic_libero --suite libero_spatial
    torchrun --standalone --nproc_per_node 8 vla-scripts/finetune.py --data_root data/libero --suite libero_10 \
        --base.base_dir pretrained_models/mergevla-base-qwen25-dinosiglip-224px --max_steps 50000

Every field of `prismatic.training.FinetuneConfig` is a flag (`--help` lists them). Bad input (missing data,
unknown suite, corrupt files, an out_dir holding another run) stops with exit code 2 before training starts.
"""

from __future__ import annotations

import logging
import sys

from prismatic.checkpoint import CheckpointError
from prismatic.cli import run_cli
from prismatic.models.loading import BaseModelError, WeightsError
from prismatic.training import ConfigError, FinetuneConfig, RunDirError, TrainingDiverged
from prismatic.vla.datasets import DatasetError

# FileNotFoundError: e.g. a base directory without the Qwen tokenizer.json (BaseModelError is one too)
USER_ERRORS = (ConfigError, DatasetError, RunDirError, CheckpointError, BaseModelError, WeightsError, TrainingDiverged,
               FileNotFoundError)


def run(cfg: FinetuneConfig) -> None:
    cfg.validate()  # train() checks again; here bad flags are refused before the seconds of importing the model
    from prismatic.training import train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    print(f"final checkpoint: {train(cfg)}")


def main() -> int:
    return run_cli("finetune", FinetuneConfig, run, USER_ERRORS)


if __name__ == "__main__":
    sys.exit(main())
