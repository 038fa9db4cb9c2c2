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


def test_contrast_uses_each_channels_own_mean():
    x = torch.tensor([[0.2, 0.4], [0.6, 0.8], [0.5, 0.5]]).view(1, 3, 1, 2)  # channel means 0.3, 0.7, 0.5
    y = adjust_contrast(x, torch.tensor([2.0]))
    assert torch.allclose(y[0, :, 0], torch.tensor([[0.1, 0.5], [0.5, 0.9], [0.5, 0.5]]), atol=1e-6)


def test_crop_resize_shifts_along_the_named_axis():
    from prismatic.vla.augmentation import crop_resize

    w = 9
    ramp_x = torch.linspace(0, 1, w).view(1, 1, 1, w).expand(1, 3, w, w)  # value = column / (w - 1)
    half, zero = torch.tensor([0.5]), torch.tensor([0.0])
    # a box of half the side centred at x = +0.5 ([-1, 1] coords): the right half of the image
    y = crop_resize(ramp_x, half, zero, half)
    assert torch.allclose(y[0, 0], torch.linspace(0.5, 1, w).expand(w, w), atol=1e-6)
    # the same box shifted down instead: the columns are those of the centre crop, [0.25, 0.75]
    ramp_y = ramp_x.transpose(-1, -2)
    y = crop_resize(ramp_y, half, half, zero)
    assert torch.allclose(y[0, 0], torch.linspace(0.5, 1, w).view(w, 1).expand(w, w), atol=1e-6)
    assert torch.allclose(crop_resize(ramp_x, half, half, zero)[0, 0], torch.linspace(0.25, 0.75, w).expand(w, w),
                          atol=1e-6)


def test_sampled_parameters_cover_their_ranges_in_both_directions():
    from prismatic.vla.augmentation import sample_params

    cfg = ImageAugConfig(crop_area=0.81, brightness=0.2, contrast=(0.8, 1.2), saturation=(0.5, 1.5), hue=0.05)
    p = sample_params(4000, cfg, torch.Generator().manual_seed(0))
    assert torch.allclose(p["scale"], torch.full((4000,), 0.9, dtype=torch.float64))  # side √area
    for k, lo, hi in [("shift_y", -0.1, 0.1), ("shift_x", -0.1, 0.1), ("brightness", -0.2, 0.2),
                      ("contrast", 0.8, 1.2), ("saturation", 0.5, 1.5), ("hue", -0.05, 0.05)]:
        v = p[k]
        span = hi - lo
        assert v.min() >= lo and v.max() <= hi, k  # the crop box stays inside the image, etc.
        assert v.min() < lo + 0.01 * span and v.max() > hi - 0.01 * span, k  # and reaches both ends
    # every parameter draws its own number
    names = list(p)[1:]
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert abs(torch.corrcoef(torch.stack([p[a], p[b]]))[0, 1]) < 0.1, (a, b)


def test_aug_config_validation_names_the_setting():
    import pytest

    for bad, match in [(dict(hue=0.6), r"aug.hue in \[0, 0.5\]"), (dict(brightness=-0.1), "aug.brightness must be >= 0"),
                       (dict(contrast=(1.2, 0.8)), r"aug.contrast is \(1.2, 0.8\), expected 0 <= low <= high"),
                       (dict(saturation=(-0.1, 1.0)), r"aug.saturation is \(-0.1, 1.0\)"),
                       (dict(crop_area=0.0), r"aug.crop_area is 0.0, expected a fraction in \(0, 1\]")]:
        with pytest.raises(ValueError, match=match):
            ImageAugConfig(**bad).validate()
    ImageAugConfig(crop_area=1.0, hue=0.5, contrast=(1.0, 1.0)).validate()


def test_evaluation_crop_follows_how_each_model_was_trained():
    import pytest

    from prismatic.vla.augmentation import common_crop_area, trained_crop_area

    assert trained_crop_area({"image_aug": True, "aug": {"crop_area": 0.81}}) == 0.81
    assert trained_crop_area({"image_aug": False, "aug": {"crop_area": 0.81}}) == 1.0  # never cropped: no crop
    assert trained_crop_area(None) is None and trained_crop_area({}) is None
    assert common_crop_area({"a": 0.81, "b": None, "c": 0.81}) == 0.81
    assert common_crop_area({"a": None}) is None
    with pytest.raises(ValueError, match="trained with different random crops"):
        common_crop_area({"a": 0.81, "b": 1.0})
