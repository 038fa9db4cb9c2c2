"""Image augmentation: hand-computed values of each operation, determinism, ranges."""

from __future__ import annotations

import math

import torch

from prismatic.vla.augmentation import (
    ImageAugConfig,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    augment_images,
    center_crop,
    hsv_to_rgb,
    rgb_to_hsv,
)


def test_brightness_adds_and_clips():
    x = torch.full((2, 3, 2, 2), 0.5)
    y = adjust_brightness(x, torch.tensor([0.2, 0.6]))
    assert torch.allclose(y[0], torch.full((3, 2, 2), 0.7)) and torch.all(y[1] == 1.0)


def test_contrast_scales_around_the_per_channel_mean():
    x = torch.tensor([0.25, 0.75]).view(1, 1, 1, 2).expand(1, 3, 1, 2)
    y = adjust_contrast(x, torch.tensor([1.2]))
    assert torch.allclose(y[0, :, 0], torch.tensor([0.2, 0.8]).expand(3, 2))


def test_saturation_zero_gives_gray_at_the_max_channel():
    x = torch.tensor([0.9, 0.3, 0.6]).view(1, 3, 1, 1)
    y = adjust_saturation(x, torch.tensor([0.0]))
    assert torch.allclose(y.flatten(), torch.full((3,), 0.9))
    half = adjust_saturation(x, torch.tensor([0.5])).flatten()  # S 2/3 → 1/3, V stays: min = 0.9·(1 − 1/3)
    assert torch.allclose(half.max(), torch.tensor(0.9)) and torch.allclose(half.min(), torch.tensor(0.6))


def test_hue_rotates_colours():
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    assert torch.allclose(adjust_hue(red, torch.tensor([1 / 3])).flatten(), torch.tensor([0.0, 1.0, 0.0]), atol=1e-6)
    assert torch.allclose(adjust_hue(red, torch.tensor([-1 / 3])).flatten(), torch.tensor([0.0, 0.0, 1.0]), atol=1e-6)


def test_hsv_round_trip():
    x = torch.rand(4, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(hsv_to_rgb(rgb_to_hsv(x)), x, atol=1e-6)


def test_center_crop_matches_tf_crop_and_resize_on_a_ramp():
    w = 11
    ramp = torch.linspace(0, 1, w).view(1, 1, 1, w).expand(1, 3, w, w)  # value = x / (w - 1)
    y = center_crop(ramp, area=0.81)  # side 0.9: box [0.05, 0.95]
    expected = 0.05 + 0.9 * torch.arange(w) / (w - 1)
    assert torch.allclose(y[0, 0, 0], expected, atol=1e-6)
    assert torch.equal(center_crop(ramp, 1.0), ramp)


def test_augment_is_deterministic_per_generator_and_stays_in_range():
    x = torch.rand(3, 2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    cfg = ImageAugConfig()
    a = augment_images(x, cfg, torch.Generator().manual_seed(5))
    b = augment_images(x, cfg, torch.Generator().manual_seed(5))
    c = augment_images(x, cfg, torch.Generator().manual_seed(6))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1
    # each image draws its own parameters: the two cameras of a sample differ in how they changed
    assert not torch.allclose(a[0, 0] - x[0, 0], a[0, 1] - x[0, 1])


def test_identity_settings_leave_images_unchanged():
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    cfg = ImageAugConfig(crop_area=1.0, brightness=0.0, contrast=(1.0, 1.0), saturation=(1.0, 1.0), hue=0.0)
    assert torch.allclose(augment_images(x, cfg, torch.Generator().manual_seed(0)), x, atol=1e-5)
    assert math.isclose(ImageAugConfig().crop_area, 0.9)
