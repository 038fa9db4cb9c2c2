"""Episodes in memory, the no-op filter of the RLDS release, and action chunking.

Every reader (raw LIBERO HDF5, RLDS, the project's own TableTop-4 files) produces `Episode`s with the same
conventions: images upright (RLDS orientation), proprio = [eef pos, axis-angle, gripper qpos] (8), actions
(7) with the gripper in the training convention (1 = open, 0 = close).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol

import numpy as np

NOOP_THRESHOLD = 1e-4  # the threshold OpenVLA used when it regenerated LIBERO without no-ops
ACTION_DIM, PROPRIO_DIM = 7, 8


class DatasetError(ValueError):
    """A dataset is missing, empty, corrupt or not in the expected layout."""


class ImageSource(Protocol):
    """Images of one episode, in kept-step order."""

    def __len__(self) -> int: ...

    def get(self, steps: np.ndarray) -> np.ndarray:
        """(n, 2, H, W, 3) uint8 for the given kept-step indices."""


class ArrayImages:
    """Images already in memory: (T, 2, H, W, 3) uint8."""

    def __init__(self, images: np.ndarray):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def get(self, steps: np.ndarray) -> np.ndarray:
        return self.images[steps]


@dataclass
class Episode:
    instruction: str
    actions: np.ndarray  # (T, 7) float32, gripper 1 = open / 0 = close
    proprio: np.ndarray  # (T, 8) float32
    images: ImageSource  # T steps of [third-person, wrist]
    source: str  # where it came from, for error messages ("file.hdf5:demo_3")

    def __post_init__(self):
        t = len(self.actions)
        if self.actions.shape != (t, ACTION_DIM) or self.proprio.shape != (t, PROPRIO_DIM) or len(self.images) != t:
            raise DatasetError(
                f"{self.source}: inconsistent episode (actions {self.actions.shape}, proprio {self.proprio.shape}, "
                f"{len(self.images)} images); expected (T, {ACTION_DIM}), (T, {PROPRIO_DIM}) and T images"
            )

    def sort_key(self) -> tuple[str, str]:
        """Canonical order: a suite read from HDF5 or from RLDS lists its episodes identically."""
        return self.instruction, hashlib.sha256(np.ascontiguousarray(self.actions, np.float32).tobytes()).hexdigest()


def noop_keep_mask(actions: np.ndarray, threshold: float = NOOP_THRESHOLD) -> np.ndarray:
    """Which steps survive the RLDS release's no-op filter (actions in LIBERO's raw convention).

    A step is a no-op when its translation + rotation is (near) zero and its gripper command equals that of
    the previous *kept* step; with no kept step yet, a (near) zero motion alone makes it a no-op.
    """
    keep = np.zeros(len(actions), dtype=bool)
    prev = None
    for t, a in enumerate(np.asarray(actions, dtype=np.float64)):
        still = np.linalg.norm(a[:-1]) < threshold
        if still and (prev is None or a[-1] == prev[-1]):
            continue
        keep[t] = True
        prev = a
    return keep


def chunk_indices(length: int, chunk_len: int) -> np.ndarray:
    """(length, chunk_len) step indices: the current step and the next chunk_len-1, the end repeated."""
    idx = np.arange(length)[:, None] + np.arange(chunk_len)[None, :]
    return np.minimum(idx, length - 1)
