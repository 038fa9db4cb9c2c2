"""Per-suite fine-tuning: `train(FinetuneConfig(...)) -> final checkpoint directory`."""

from prismatic.training.config import ConfigError, FinetuneConfig, TrainingDiverged
from prismatic.training.run_dir import RunDirError
from prismatic.training.schedule import lr_at

__all__ = ["ConfigError", "FinetuneConfig", "RunDirError", "TrainingDiverged", "lr_at", "train"]


def __getattr__(name: str):
    # the trainer (and with it the model and transformers) is imported on first use, so a CLI refuses bad flags
    # or prints --help without the seconds that import takes
    if name != "train":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from prismatic.training.trainer import train

    globals()["train"] = train
    return train
