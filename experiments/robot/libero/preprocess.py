"""LIBERO camera frames → the images the model was trained on (docs/DESIGN.md §5).

LIBERO renders upside down relative to the RLDS training data, so frames are rotated 180°. The RLDS data is
stored as JPEG and resized to the model's 224 with a Lanczos filter when training reads it
(`prismatic.vla.images`), so evaluation frames take the same path: a JPEG round trip, then that filter. Models
trained with random-crop augmentation (0.9 of the area) see, at test time, the centre crop of that area
resized back to full size. The model's own processor then resizes to its input size (64 for `tiny`).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from prismatic.vla.images import lanczos_resize

JPEG_QUALITY = 95  # the quality the RLDS conversion used when it encoded frames


def rotate_180(img: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(img[::-1, ::-1])


def jpeg_round_trip(img: np.ndarray, quality: int = JPEG_QUALITY) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def center_crop_resize(img: np.ndarray, area_scale: float, size: int | None = None) -> np.ndarray:
    """Centre crop covering `area_scale` of the area, bilinearly resized to `size` (default: input size).

    Sampling follows the corner-aligned convention of a crop-and-resize op: output pixel i samples input
    coordinate y1·(H−1) + i·(y2−y1)·(H−1)/(size−1) with y1, y2 = (1 ∓ √area_scale)/2, so a linear ramp stays
    exactly linear (that is what the tests check by hand).
    """
    if not 0.0 < area_scale <= 1.0:
        raise ValueError(f"area_scale must be in (0, 1], got {area_scale}")
    h, w = img.shape[:2]
    size = size or h
    side = np.sqrt(area_scale)
    lo, hi = (1.0 - side) / 2.0, (1.0 + side) / 2.0
    steps = np.arange(size) / max(size - 1, 1)
    ys = (lo + steps * (hi - lo)) * (h - 1)
    xs = (lo + steps * (hi - lo)) * (w - 1)
    y0 = np.clip(np.floor(ys).astype(int), 0, h - 1)
    x0 = np.clip(np.floor(xs).astype(int), 0, w - 1)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    f = img.astype(np.float64)
    top = f[y0][:, x0] * (1 - fx) + f[y0][:, x1] * fx
    bottom = f[y1][:, x0] * (1 - fx) + f[y1][:, x1] * fx
    out = top * (1 - fy) + bottom * fy
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class LiberoImageTransform:
    """Callable (H, W, 3) uint8 raw LIBERO frame → (size, size, 3) uint8 upright model image."""

    size: int = 224
    jpeg: bool = True  # JPEG round trip + Lanczos resize, as the RLDS data was made
    center_crop: bool = True  # for models trained with random-crop augmentation
    crop_area: float = 0.9
    upside_down: bool = True  # rendered frames are; dataset frames (the exemplar router's) are already upright

    def __call__(self, img: np.ndarray) -> np.ndarray:
        img = np.asarray(img)
        if img.ndim != 3 or img.shape[-1] != 3 or img.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 camera frame, got {img.shape} {img.dtype}")
        if self.upside_down:
            img = rotate_180(img)
        if self.jpeg:
            img = lanczos_resize(jpeg_round_trip(img), self.size)
        elif img.shape[:2] != (self.size, self.size):
            img = lanczos_resize(img, self.size)
        if self.center_crop:
            img = center_crop_resize(img, self.crop_area, self.size)
        return img


def upright_agentview(obs: dict) -> np.ndarray:
    """Video frame: the third-person camera the right way up."""
    return rotate_180(obs["agentview_image"])
