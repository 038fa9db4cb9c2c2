"""Per-suite fine-tuning: `train(FinetuneConfig(...)) -> final checkpoint directory`.

`train` is imported on first use (with it the model and transformers), so a CLI refuses bad flags or prints
--help without the seconds that import takes.
"""

from prismatic.lazy import lazy_exports
from prismatic.training.config import ConfigError, FinetuneConfig, TrainingDiverged
from prismatic.training.run_dir import RunDirError
from prismatic.training.schedule import lr_at

__all__ = ["ConfigError", "FinetuneConfig", "RunDirError", "TrainingDiverged", "lr_at", "train"]
__getattr__, __dir__ = lazy_exports(__name__, {"train": "trainer"}, globals())
