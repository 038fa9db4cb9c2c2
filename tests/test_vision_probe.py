import numpy as np
import pytest

from experiments.robot.tabletop.bodies import OBJECT_COLORS, PALETTE
from experiments.robot.tabletop_pipeline.vision_probe import (
    VisionProbeConfig,
    VisionProbeError,
    cli,
    main,
    square_images,
)


def test_square_images_hold_one_square_of_the_named_colour():
    images, colour = square_images(np.random.default_rng(0), 5, 6, 64, 200)
    assert images.shape == (5, 2, 64, 64, 3) and images.dtype == np.uint8
    for img, c in zip(images, colour):
        assert np.array_equal(img[0], img[1])  # both cameras see the same image
        square = np.all(img[0] == PALETTE[OBJECT_COLORS[c]], axis=-1)
        assert square.sum() == 36 and np.all(img[0][~square] == 200)
        ys, xs = np.nonzero(square)
        assert ys.max() - ys.min() == 5 and xs.max() - xs.min() == 5


def test_a_whole_image_of_one_colour_is_learned_in_a_few_dozen_steps():
    logs = []
    out = main(VisionProbeConfig(square_size=64, steps=40, eval_every=40, eval_images=50), log=logs.append)
    assert out["history"][0]["step"] == 0 and out["history"][-1]["step"] == 40
    assert out["final_accuracy"] >= 0.9  # measured 1.0; an untrained model answers no colour (0.0)
    assert out["history"][0]["accuracy"] <= 0.3
    assert "held-out accuracy" in logs[-1]


@pytest.mark.parametrize("field, value, message", [
    ("square_size", 65, "square_size is 65, expected 1..64"),
    ("steps", 0, "steps is 0, expected a positive integer"),
    ("init", "xavier", "init is 'xavier'"),
    ("lr", float("nan"), "lr is nan, expected a finite number"),
    ("seed", -1, "seed is -1, expected >= 0"),
])
def test_bad_settings_name_the_field(field, value, message):
    with pytest.raises(VisionProbeError, match=message):
        main(VisionProbeConfig(**{field: value}))


def test_cli_exits_2_on_a_bad_base(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["vision_probe", "--base_dir", str(tmp_path)])
    assert cli() == 2
    assert f"{tmp_path / 'base.json'} not found" in capsys.readouterr().err
