"""Per-suite fine-tuning: `train(FinetuneConfig(...)) -> final checkpoint directory`."""

from prismatic.training.config import ConfigError, FinetuneConfig
from prismatic.training.run_dir import RunDirError
from prismatic.training.schedule import lr_at
from prismatic.training.trainer import TrainingDiverged, train

__all__ = ["ConfigError", "FinetuneConfig", "RunDirError", "TrainingDiverged", "lr_at", "train"]
