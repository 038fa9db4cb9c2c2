"""Resizing camera frames: one Lanczos filter for training data and evaluation frames alike.

OpenVLA-style RLDS data is stored at 256 px and resized to the model's 224 with a Lanczos filter when it is
read; LIBERO evaluation frames take the same filter (experiments/robot/libero/preprocess.py), so the model sees
the same kind of pixels in training and at test time.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def lanczos_resize(img: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 → (size, size, 3) uint8 (unchanged when it already has that size)."""
    if img.shape[:2] == (size, size):
        return img
    return np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.LANCZOS))


def resize_frames(frames: np.ndarray, size: int | None) -> np.ndarray:
    """(..., H, W, 3) uint8 frames → (..., size, size, 3) with `lanczos_resize`; `size` None: unchanged."""
    frames = np.asarray(frames)
    if size is None or frames.shape[-3:-1] == (size, size):
        return frames
    flat = frames.reshape(-1, *frames.shape[-3:])
    out = np.stack([lanczos_resize(f, size) for f in flat])
    return out.reshape(*frames.shape[:-3], size, size, 3)
