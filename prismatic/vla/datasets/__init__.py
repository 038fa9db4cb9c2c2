"""Training data: raw LIBERO HDF5 and RLDS suites behind one dataset interface (see `dataset.py`)."""

from prismatic.vla.datasets.dataset import VLADataset, available_suites, load_suite, resolve_suite
from prismatic.vla.datasets.episodes import DatasetError, Episode, chunk_indices, noop_keep_mask
from prismatic.vla.datasets.stats import STATS_FILE, compute_norm_stats

__all__ = ["VLADataset", "available_suites", "load_suite", "resolve_suite", "DatasetError", "Episode",
           "chunk_indices", "noop_keep_mask", "STATS_FILE", "compute_norm_stats"]
