"""Per-dimension q01/q99 normalisation to [-1, 1] (clipped), as in docs/DESIGN.md §3.

Stats layout, stored in every checkpoint manifest as `norm_stats`:
    {"action":  {"q01": [7], "q99": [7], "mask": [7 bools]},
     "proprio": {"q01": [8], "q99": [8], "mask": [8 bools]}}
Dimensions whose mask is False (the gripper action) pass through unchanged.
"""

from __future__ import annotations

import math

import numpy as np

EPS = 1e-8


def compute_stats(x: np.ndarray, mask: list[bool] | None = None) -> dict:
    x = np.asarray(x, dtype=np.float64).reshape(-1, np.shape(x)[-1])
    if len(x) == 0:
        raise ValueError("cannot compute normalisation statistics of an empty array")
    mask = [True] * x.shape[1] if mask is None else list(mask)
    return {
        "q01": np.quantile(x, 0.01, axis=0).tolist(),
        "q99": np.quantile(x, 0.99, axis=0).tolist(),
        "mask": [bool(m) for m in mask],
    }


def check_norm_stats(stats: object, dims: dict[str, int]) -> None:
    """ValueError naming the first part of `stats` that does not follow the layout above (`dims`: part → width)."""
    if not isinstance(stats, dict):
        raise ValueError(f"norm_stats is a {type(stats).__name__}, expected an object with {sorted(dims)}")
    for part, dim in dims.items():
        if not isinstance(stats.get(part), dict):
            raise ValueError(f"norm_stats.{part} is {stats.get(part)!r}, expected an object with q01, q99 and mask")
        for key in ("q01", "q99", "mask"):
            v = stats[part].get(key)
            kind = bool if key == "mask" else (int, float)
            if (not isinstance(v, list) or len(v) != dim
                    or not all(isinstance(x, kind) and (key == "mask" or not isinstance(x, bool)) for x in v)
                    or (key != "mask" and not all(math.isfinite(x) for x in v))):
                what = "booleans" if key == "mask" else "finite numbers"
                raise ValueError(f"norm_stats.{part}.{key} is {str(v)[:80]}, expected a list of {dim} {what}")


def normalize(x: np.ndarray, stats: dict) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    lo, hi = np.asarray(stats["q01"], np.float32), np.asarray(stats["q99"], np.float32)
    y = np.clip(2.0 * (x - lo) / (hi - lo + EPS) - 1.0, -1.0, 1.0)
    # a dimension constant in the data (q01 = q99) maps to -1, as its training value does: through the
    # 1/EPS gain, a test value one float step above it would otherwise jump to +1
    y = np.where(hi - lo < EPS, -1.0, y)
    return np.where(np.asarray(stats["mask"]), y, x).astype(np.float32)


def unnormalize(y: np.ndarray, stats: dict) -> np.ndarray:
    y = np.asarray(y, dtype=np.float32)
    lo, hi = np.asarray(stats["q01"], np.float32), np.asarray(stats["q99"], np.float32)
    # capped at [q01, q99], the range the training targets were clipped to (DESIGN.md §5 only says un-normalise;
    # a prediction past ±1 is outside anything the expert was trained on)
    x = 0.5 * (np.clip(y, -1.0, 1.0) + 1.0) * (hi - lo + EPS) + lo
    return np.where(np.asarray(stats["mask"]), x, y).astype(np.float32)


def gripper_to_train(g_env: np.ndarray) -> np.ndarray:
    """LIBERO's gripper action (-1 open, +1 close) → training label (1 open, 0 close)."""
    return ((1.0 - np.asarray(g_env, np.float32)) / 2.0).clip(0.0, 1.0)


def gripper_to_env(g_train: np.ndarray) -> np.ndarray:
    """Predicted label (1 open, 0 close) → LIBERO's convention: sign(2g - 1), negated (-1 open, +1 close)."""
    s = np.sign(2.0 * np.asarray(g_train, np.float32) - 1.0)
    s = np.where(s == 0, 1.0, s)  # exactly 0.5 counts as open
    return -s
