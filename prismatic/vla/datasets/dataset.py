"""One dataset interface over every episode reader: indexed steps → training samples.

A sample is `{"images": uint8 (2, H, W, 3), "proprio": float32 (8,), "instruction": str,
"actions": float32 (chunk_len, 7)}`: raw values (gripper as a 1 = open / 0 = close label); the trainer
normalises with `norm_stats`. `get_batch` fetches many steps at once (vectorised when images are in memory).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from prismatic.vla.datasets.episodes import ArrayImages, DatasetError, Episode, chunk_indices
from prismatic.vla.datasets.hdf5 import read_hdf5_suite
from prismatic.vla.datasets.rlds import find_builder_dir, read_rlds_suite
from prismatic.vla.datasets.stats import (
    STATS_FILE,
    compute_norm_stats,
    file_table,
    fingerprint,
    load_cached_stats,
    write_stats_cache,
)

DatasetFormat = Literal["hdf5", "rlds"]
RLDS_SUFFIX = "_no_noops"
log = logging.getLogger(__name__)


class VLADataset:
    def __init__(self, episodes: Sequence[Episode], chunk_len: int = 8):
        if not episodes:
            raise DatasetError("the dataset holds no episodes")
        self.episodes = sorted(episodes, key=Episode.sort_key)
        self.chunk_len = chunk_len
        lengths = np.array([len(e.actions) for e in self.episodes])
        self.starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        self.actions = np.concatenate([e.actions for e in self.episodes]).astype(np.float32)
        self.proprio = np.concatenate([e.proprio for e in self.episodes]).astype(np.float32)
        self.episode_of = np.repeat(np.arange(len(self.episodes)), lengths)
        self.step_of = np.arange(len(self.actions)) - self.starts[self.episode_of]
        self.chunks = np.concatenate([s + chunk_indices(n, chunk_len) for s, n in zip(self.starts, lengths)])
        self.instructions = [e.instruction for e in self.episodes]
        self._images = self._concat_images()
        self.norm_stats: dict | None = None
        self.fingerprint: str | None = None
        self.info: dict = {"num_episodes": len(self.episodes), "num_steps": len(self)}

    def _concat_images(self) -> np.ndarray | None:
        """All images as one array when every episode is in memory with one shape (fast batch indexing)."""
        srcs = [e.images for e in self.episodes]
        if all(isinstance(s, ArrayImages) for s in srcs) and len({s.images.shape[1:] for s in srcs}) == 1:
            first = srcs[0].images
            out = np.empty((sum(len(s.images) for s in srcs), *first.shape[1:]), first.dtype)
            del srcs, first
            # copy one episode at a time and point it at its view, so its own array can go at once: the peak is
            # the images once plus one episode, not twice the images (preload_images_gb bounds the images once)
            for e, start in zip(self.episodes, self.starts):
                n = len(e.actions)
                out[start : start + n] = e.images.images
                e.images = ArrayImages(out[start : start + n])
            return out
        return None

    def __len__(self) -> int:
        return len(self.actions)

    def images(self, indices: np.ndarray) -> np.ndarray:
        if self._images is not None:
            return self._images[indices]
        return np.stack([self.episodes[self.episode_of[i]].images.get(np.array([self.step_of[i]]))[0] for i in indices])

    def get_batch(self, indices: Sequence[int] | np.ndarray) -> dict:
        idx = np.asarray(indices, dtype=np.int64)
        if idx.ndim != 1 or (len(idx) and (idx.min() < 0 or idx.max() >= len(self))):
            raise IndexError(f"indices must be a 1-D array within [0, {len(self)})")
        return {
            "images": self.images(idx),
            "proprio": self.proprio[idx],
            "instructions": [self.instructions[e] for e in self.episode_of[idx]],
            "actions": self.actions[self.chunks[idx]],
        }

    def __getitem__(self, i: int) -> dict:
        b = self.get_batch([int(i)])
        return {"images": b["images"][0], "proprio": b["proprio"][0], "instruction": b["instructions"][0],
                "actions": b["actions"][0]}


def available_suites(data_root: Path, dataset_format: DatasetFormat) -> list[str]:
    out = []
    for d in sorted(p for p in data_root.iterdir() if p.is_dir()):
        if dataset_format == "hdf5" and any(d.glob("*.hdf5")):
            out.append(d.name)
        elif dataset_format == "rlds" and find_builder_dir(d) is not None:
            out.append(d.name.removesuffix(RLDS_SUFFIX))
    return out


def resolve_suite(data_root: Path, suite: str, dataset_format: DatasetFormat) -> tuple[Path, list[Path]]:
    """(directory that holds the suite's files and its stats cache, the files that define its content)."""
    data_root = Path(data_root)
    if dataset_format not in ("hdf5", "rlds"):
        raise DatasetError(f"dataset_format is {dataset_format!r}, expected 'hdf5' or 'rlds'")
    if not data_root.is_dir():
        raise DatasetError(f"data_root {data_root} does not exist (or is not a directory)")
    names = [suite] if dataset_format == "hdf5" else [suite + RLDS_SUFFIX, suite]
    for name in names:
        d = data_root / name
        if not d.is_dir():
            continue
        if dataset_format == "hdf5":
            files = sorted(d.glob("*.hdf5"))
            if not files:
                raise DatasetError(f"suite directory {d} holds no *.hdf5 files: the dataset is empty")
            return d, files
        builder = find_builder_dir(d)
        if builder is None:
            hdf5 = " (it holds HDF5 files: --dataset_format hdf5 reads them)" if any(d.glob("*.hdf5")) else ""
            tried = f"no {names[0]} under {data_root}, and " if name != names[0] else ""
            raise DatasetError(f"{tried}{d} holds no RLDS dataset (no <version>/dataset_info.json){hdf5}")
        files = sorted(p for p in builder.iterdir() if p.is_file() and p.name != STATS_FILE and not p.name.startswith("."))
        return builder, files
    raise DatasetError(
        f"unknown suite {suite!r}: no {' or '.join(names)} under {data_root}; available {dataset_format} suites: "
        f"{available_suites(data_root, dataset_format) or 'none'}"
    )


def load_suite(
    data_root: Path | str,
    suite: str,
    dataset_format: DatasetFormat = "hdf5",
    chunk_len: int = 8,
    filter_noops: bool = True,
    preload_images_gb: float = 4.0,
    cache_stats: bool = True,
) -> VLADataset:
    """Read a suite, attach its norm stats and fingerprint (from the cache when it is still valid)."""
    suite_dir, files = resolve_suite(Path(data_root), suite, dataset_format)
    if dataset_format == "hdf5":
        reader = {"format": "hdf5", "filter_noops": filter_noops}
        episodes = read_hdf5_suite(files, filter_noops, preload_images_gb)
    else:
        reader = {"format": "rlds", "split": "train"}
        episodes = read_rlds_suite(suite_dir)
    if not episodes or not sum(len(e.actions) for e in episodes):
        raise DatasetError(f"{suite_dir}: the dataset is empty (no episodes with steps left after reading)")
    ds = VLADataset(episodes, chunk_len)
    counts = {"num_episodes": len(ds.episodes), "num_steps": len(ds)}
    cache = load_cached_stats(suite_dir, files, reader) if cache_stats else None
    if cache is None or {k: cache.get(k) for k in counts} != counts:
        stats = compute_norm_stats(ds.actions, ds.proprio)
        cache = write_stats_cache(suite_dir, files, reader, stats, counts) if cache_stats else None
        fp = cache["fingerprint"] if cache else None
    else:
        stats, fp = cache["norm_stats"], cache["fingerprint"]
    if fp is None:  # caching off: still fingerprint the content
        fp = fingerprint(file_table(suite_dir, files), reader)
    ds.norm_stats, ds.fingerprint = stats, fp
    # the recorded frames' size, for evaluation to compare with its renders (raw LIBERO HDF5: 128 px, RLDS: 256)
    frame_size = list(ds.episodes[0].images.get(np.array([0])).shape[2:4])
    ds.info = {"suite": suite, "format": dataset_format, "path": str(suite_dir.resolve()), **counts, **reader,
               "frame_size": frame_size}
    return ds
