import numpy as np
import pytest
import torch

from experiments.robot.tabletop.bodies import OBJECT_COLORS, PALETTE
from experiments.robot.tabletop_pipeline.vision_probe import (
    VisionProbeConfig,
    VisionProbeError,
    cli,
    main,
    square_accuracy,
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
    ("background", 256, "background is 256, expected a grey level in 0..255"),
    ("max_grad_norm", 0.0, "need lr > 0, weight_decay >= 0 and max_grad_norm > 0"),
])
def test_bad_settings_name_the_field(field, value, message):
    with pytest.raises(VisionProbeError, match=message):
        main(VisionProbeConfig(**{field: value}))


def test_cli_exits_2_on_a_bad_base(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["vision_probe", "--base_dir", str(tmp_path)])
    assert cli() == 2
    assert f"{tmp_path / 'base.json'} not found" in capsys.readouterr().err


def test_accuracy_counts_each_answers_colour_word_and_restores_the_mode(monkeypatch):
    from experiments.robot.tabletop_pipeline import vlm_pretrain as vp
    from prismatic.models.processing import VLAProcessor, build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    red = tok.token_to_id(OBJECT_COLORS[0])

    def says_the_first_colour(vlm, ids, pixels, target):  # and never closes its answer right
        b, j = target.nonzero(as_tuple=True)
        labels = ids[b, j]
        pred = torch.where(torch.arange(len(labels)) % 2 == 0, red, labels + 1)
        return torch.nn.functional.one_hot(pred, 200).float(), labels

    monkeypatch.setattr(vp, "answer_logits", says_the_first_colour)
    images, _ = square_images(np.random.default_rng(0), 5, 6, 64, 200)
    model, args = torch.nn.Linear(1, 1), (vp.ConversationBuilder(tok), VLAProcessor(tok, 64, 200), images)
    colour = np.array([0, 0, 1, 2, 0])
    assert square_accuracy(model, *args, colour, chunk=2) == pytest.approx(3 / 5) and model.training
    assert square_accuracy(model, *args, colour) == pytest.approx(3 / 5)  # one chunk of the default 50


def test_accuracy_is_measured_every_eval_every_steps_and_after_the_last():
    threads = torch.get_num_threads()
    out = main(VisionProbeConfig(square_size=64, steps=3, eval_every=2, eval_images=2, batch_size=2), log=lambda _: None)
    assert [r["step"] for r in out["history"]] == [0, 2, 3] and out["final_accuracy"] == out["history"][-1]["accuracy"]
    assert torch.get_num_threads() == threads  # cpu_threads (1) for the probe only
