"""Training-time image augmentation (docs/DESIGN.md §2), in torch so it runs on the training device.

Per image, in this order, each clipped to [0, 1]: random crop of `crop_area` of the image (square, resized
back to full size), brightness ± `brightness`, contrast × U(contrast), saturation × U(saturation), hue ±
`hue` (a fraction of the colour circle). Every image of a batch draws its own parameters from the given
generator, so a seeded generator gives the same augmentation on every run. `center_crop` is the matching
deterministic crop used at evaluation.

Crops follow `tf.image.crop_and_resize` (box corners map onto pixel centres, bilinear), the operation the
published pipeline trained and evaluated with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class ImageAugConfig:
    crop_area: float = 0.9  # fraction of the image area kept by the random crop (1 = no crop)
    brightness: float = 0.2  # max additive brightness shift
    contrast: tuple[float, float] = (0.8, 1.2)  # range of the contrast factor
    saturation: tuple[float, float] = (0.8, 1.2)  # range of the saturation factor
    hue: float = 0.05  # max hue shift, as a fraction of the colour circle

    def validate(self) -> None:
        if not 0.0 < self.crop_area <= 1.0:
            raise ValueError(f"aug.crop_area is {self.crop_area}, expected a fraction in (0, 1]")
        for name in ("contrast", "saturation"):
            lo, hi = getattr(self, name)
            if not 0.0 <= lo <= hi:
                raise ValueError(f"aug.{name} is {(lo, hi)}, expected 0 <= low <= high")
        if self.brightness < 0 or not 0 <= self.hue <= 0.5:
            raise ValueError("aug.brightness must be >= 0 and aug.hue in [0, 0.5]")


def centre_crop_for(image_aug: bool, crop_area: float) -> float:
    """The centre-crop area a model should see at test time: its random-crop area if trained with augmentation."""
    return crop_area if image_aug else 1.0


def trained_crop_area(train_config: dict | None) -> float | None:
    """`centre_crop_for` a checkpoint, from the train_config its manifest records; None when it records none."""
    if not train_config:
        return None
    return centre_crop_for(bool(train_config.get("image_aug")), float(train_config.get("aug", {}).get("crop_area", 1.0)))


def common_crop_area(trained: dict[str, float | None]) -> float | None:
    """The one training crop area of several models (name → `trained_crop_area`, None: unrecorded), as one centre
    crop at evaluation must serve them all; None when none is recorded. ValueError when they differ."""
    known = {a for a in trained.values() if a is not None}
    if len(known) > 1:
        raise ValueError(f"the merged experts were trained with different random crops {trained}; one centre crop "
                         "serves every expert: set --crop_area")
    return known.pop() if known else None


def crop_resize(x: torch.Tensor, scale: torch.Tensor, shift_y: torch.Tensor, shift_x: torch.Tensor) -> torch.Tensor:
    """Bilinear crop of a box of side `scale` (fraction of H, W) whose centre sits at `shift` ([-1, 1] coords),
    resized to the input size. x: (N, 3, H, W); scale, shift_*: (N,)."""
    n = x.shape[0]
    theta = torch.zeros(n, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0], theta[:, 1, 1] = scale, scale
    theta[:, 0, 2], theta[:, 1, 2] = shift_x, shift_y
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)


def center_crop(x: torch.Tensor, area: float = 0.9) -> torch.Tensor:
    """The centred `area` crop resized back, for (..., 3, H, W) images in [0, 1]."""
    if area >= 1.0:
        return x
    flat = x.reshape(-1, *x.shape[-3:])
    n, s = flat.shape[0], math.sqrt(area)
    zero = flat.new_zeros(n)
    return crop_resize(flat, flat.new_full((n,), s), zero, zero).reshape(x.shape)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) RGB in [0, 1] → HSV with hue in [0, 1)."""
    r, g, b = x.unbind(-3)
    v, _ = x.max(-3)
    c = v - x.min(-3).values
    s = torch.where(v > 0, c / v.clamp_min(1e-12), torch.zeros_like(v))
    cz = c.clamp_min(1e-12)
    h = torch.where(v == r, ((g - b) / cz) % 6, torch.where(v == g, (b - r) / cz + 2, (r - g) / cz + 4))
    h = torch.where(c > 0, h / 6.0, torch.zeros_like(h)) % 1.0
    return torch.stack([h, s, v], -3)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(-3)
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], -3)
    return v.unsqueeze(-3) - (v * s).unsqueeze(-3) * (torch.minimum(k, 4 - k).clamp(0, 1))


def _bc(t: torch.Tensor) -> torch.Tensor:
    return t.view(-1, 1, 1, 1)


def adjust_brightness(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    return (x + _bc(delta)).clamp(0, 1)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    mean = x.mean(dim=(-2, -1), keepdim=True)  # per image and channel, as tf.image.adjust_contrast
    return ((x - mean) * _bc(factor) + mean).clamp(0, 1)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    hsv = rgb_to_hsv(x)
    hsv = torch.stack([hsv[:, 0], (hsv[:, 1] * factor.view(-1, 1, 1)).clamp(0, 1), hsv[:, 2]], 1)
    return hsv_to_rgb(hsv).clamp(0, 1)


def adjust_hue(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    hsv = rgb_to_hsv(x)
    hsv = torch.stack([(hsv[:, 0] + delta.view(-1, 1, 1)) % 1.0, hsv[:, 1], hsv[:, 2]], 1)
    return hsv_to_rgb(hsv).clamp(0, 1)


def sample_params(n: int, cfg: ImageAugConfig, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Per-image augmentation parameters, drawn on the CPU from `generator`."""
    u = torch.rand(n, 6, generator=generator, dtype=torch.float64)
    s = math.sqrt(cfg.crop_area)
    return {
        "scale": torch.full((n,), s, dtype=torch.float64),
        "shift_y": (2 * u[:, 0] - 1) * (1 - s),  # the crop box stays inside the image
        "shift_x": (2 * u[:, 1] - 1) * (1 - s),
        "brightness": (2 * u[:, 2] - 1) * cfg.brightness,
        "contrast": cfg.contrast[0] + u[:, 3] * (cfg.contrast[1] - cfg.contrast[0]),
        "saturation": cfg.saturation[0] + u[:, 4] * (cfg.saturation[1] - cfg.saturation[0]),
        "hue": (2 * u[:, 5] - 1) * cfg.hue,
    }


def augment_images(x: torch.Tensor, cfg: ImageAugConfig, generator: torch.Generator) -> torch.Tensor:
    """x: (..., 3, H, W) float in [0, 1] (e.g. the processor's (B, cameras, 3, S, S)); same shape out."""
    flat = x.reshape(-1, *x.shape[-3:])
    p = {k: v.to(device=x.device, dtype=x.dtype) for k, v in sample_params(flat.shape[0], cfg, generator).items()}
    if cfg.crop_area < 1.0:
        flat = crop_resize(flat, p["scale"], p["shift_y"], p["shift_x"]).clamp(0, 1)
    flat = adjust_brightness(flat, p["brightness"])
    flat = adjust_contrast(flat, p["contrast"])
    flat = adjust_saturation(flat, p["saturation"])
    flat = adjust_hue(flat, p["hue"])
    return flat.reshape(x.shape)
