"""Learning-rate schedule, the resumable sampler and config validation (no model involved)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from prismatic.training import ConfigError, FinetuneConfig, lr_at
from prismatic.training.config import run_identity
from prismatic.training.sampler import ResumableBatchSampler


def test_constant_and_warmup():
    assert [lr_at(s, 1e-3, 100) for s in (0, 50, 99)] == [1e-3] * 3
    assert [lr_at(s, 1e-3, 100, warmup_steps=4) for s in range(6)] == pytest.approx(
        [2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])


def test_cosine_and_linear_decay_hit_hand_computed_points():
    assert lr_at(0, 1.0, 10, "cosine") == pytest.approx(1.0)
    assert lr_at(5, 1.0, 10, "cosine") == pytest.approx(0.5)
    assert lr_at(5, 1.0, 10, "cosine", min_lr_ratio=0.1) == pytest.approx(0.55)
    assert lr_at(10, 1.0, 10, "cosine", min_lr_ratio=0.1) == pytest.approx(0.1)
    assert lr_at(7, 1.0, 12, "linear", warmup_steps=2) == pytest.approx(0.5)  # halfway through 10 decay steps
    assert lr_at(1, 1.0, 12, "linear", warmup_steps=2) == pytest.approx(1.0)


def test_sampler_visits_each_sample_once_per_epoch_and_crosses_epochs():
    s = ResumableBatchSampler(10, 3, seed=0)
    first = np.concatenate([s.next_batch() for _ in range(3)])  # 9 of epoch 0
    assert len(set(first.tolist())) == 9
    crossing = s.next_batch()  # last of epoch 0 + two of epoch 1
    assert set(first.tolist()) | {int(crossing[0])} == set(range(10))
    assert crossing[1:].tolist() == np.random.default_rng([0, 1]).permutation(10)[:2].tolist()


def test_sampler_ranks_split_the_global_batch_and_resume_anywhere():
    whole = ResumableBatchSampler(50, 4, seed=3)
    r0 = ResumableBatchSampler(50, 2, seed=3, rank=0, world_size=2)
    r1 = ResumableBatchSampler(50, 2, seed=3, rank=1, world_size=2)
    for _ in range(20):
        assert np.concatenate([r0.next_batch(), r1.next_batch()]).tolist() == whole.next_batch().tolist()
    resumed = ResumableBatchSampler(50, 4, seed=3, start=whole.position)
    fresh = ResumableBatchSampler(50, 4, seed=3)
    for _ in range(20):
        fresh.next_batch()
    assert resumed.next_batch().tolist() == fresh.next_batch().tolist()


def test_config_validation_names_the_field():
    for field, value, msg in [("batch_size", 0, "batch_size is 0"), ("config_name", "huge", "config_name is 'huge'"),
                              ("warmup_steps", -1, "warmup_steps is -1"),
                              ("action_loss", "huber", "action_loss is 'huber'"),
                              ("lr", float("nan"), "lr is nan, expected a finite number"),
                              ("max_grad_norm", float("inf"), "max_grad_norm is inf, expected a finite number")]:
        cfg = FinetuneConfig()
        setattr(cfg, field, value)
        with pytest.raises(ConfigError, match=msg):
            cfg.validate()
    cfg = FinetuneConfig()
    cfg.aug.crop_area = 1.5
    with pytest.raises(ConfigError, match="crop_area"):
        cfg.validate()


def test_design_defaults():
    c = FinetuneConfig()
    assert (c.batch_size, c.grad_accumulation_steps, c.lr, c.weight_decay, c.lr_schedule) == (8, 2, 2e-4, 0.01, "constant")
    assert c.image_aug and (c.aug.crop_area, c.aug.brightness, c.aug.contrast, c.aug.saturation, c.aug.hue) == (
        0.9, 0.2, (0.8, 1.2), (0.8, 1.2), 0.05)


def test_run_identity_ignores_how_a_run_is_run_but_not_what_it_learns():
    a = FinetuneConfig().to_dict()
    b = FinetuneConfig(save_every=7, num_workers=3, max_steps=99, resume=True).to_dict()
    assert run_identity(a) == run_identity(b)
    assert run_identity(a) != run_identity(FinetuneConfig(lr=1e-3).to_dict())
    cos = FinetuneConfig(lr_schedule="cosine").to_dict()  # a decaying schedule depends on max_steps
    assert run_identity(cos) != run_identity({**cos, "max_steps": 10})


def test_runs_recorded_before_action_loss_existed_resume_as_l1_runs():
    new = FinetuneConfig().to_dict()
    old = {k: v for k, v in new.items() if k != "action_loss"}
    assert run_identity(old) == run_identity(new)
    assert run_identity(old) != run_identity(FinetuneConfig(action_loss="mse").to_dict())


def test_training_frames_are_resized_with_the_evaluation_filter():
    """RLDS frames (256 px) reach the 224-px model through the Lanczos filter LIBERO evaluation frames take."""
    from experiments.robot.libero.preprocess import LiberoImageTransform
    from prismatic.training.trainer import fetch

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (3, 2, 256, 256, 3), dtype=np.uint8)  # (steps, cameras, H, W, 3)

    class Steps:
        def get_batch(self, idx):
            return {"images": frames[idx]}

    out = fetch(Steps(), np.array([2, 0]), 224)["images"]
    assert out.shape == (2, 2, 224, 224, 3) and out.dtype == np.uint8
    upright_no_jpeg = LiberoImageTransform(224, jpeg=False, center_crop=False, upside_down=False)
    assert np.array_equal(out[0, 1], upright_no_jpeg(frames[2, 1]))
    assert np.array_equal(out[1, 0], upright_no_jpeg(frames[0, 0]))
    # bilinear (what the processor does for other sizes) differs: the filter is a real choice
    import torch
    import torch.nn.functional as F

    bilinear = F.interpolate(torch.as_tensor(frames[2, 1]).permute(2, 0, 1)[None].float(), size=(224, 224),
                             mode="bilinear", antialias=True)[0].permute(1, 2, 0).round().clamp(0, 255).byte().numpy()
    assert np.abs(bilinear.astype(int) - out[0, 1]).mean() > 1
    assert np.array_equal(fetch(Steps(), np.array([1]), 256)["images"], frames[[1]])  # the right size: untouched


def test_sampler_refuses_an_empty_dataset():
    with pytest.raises(ValueError, match="cannot sample from an empty dataset"):
        ResumableBatchSampler(0, 2, seed=0)


def test_lr_schedule_names_an_unknown_schedule_and_stays_at_the_floor_past_max_steps():
    with pytest.raises(ValueError, match=r"lr_schedule is 'exp', expected one of \('constant', 'cosine', 'linear'\)"):
        lr_at(3, 1.0, 10, "exp")
    assert lr_at(15, 1.0, 10, "linear", min_lr_ratio=0.1) == pytest.approx(0.1)  # not below lr × min_lr_ratio
    assert lr_at(15, 1.0, 10, "cosine", min_lr_ratio=0.1) == pytest.approx(0.1)  # not back up


@pytest.mark.parametrize("overrides, msg", [
    ({"keep_train_states": 0}, "keep_train_states is 0, expected a positive integer"),
    ({"num_workers": -1}, "num_workers is -1, expected >= 0"),
    ({"lr": 0.0}, "need lr > 0"),
    ({"min_lr_ratio": 1.5}, r"min_lr_ratio in \[0, 1\]"),
    ({"min_lr_ratio": -0.1}, r"min_lr_ratio in \[0, 1\]"),
    ({"lr_schedule": "cosine", "warmup_steps": 10, "max_steps": 10}, r"warmup_steps \(10\) must be below max_steps \(10\)"),
])
def test_config_validation_refuses_values_training_cannot_use(overrides, msg):
    cfg = FinetuneConfig(**overrides)
    with pytest.raises(ConfigError, match=msg):
        cfg.validate()



@pytest.mark.parametrize("field, value, choices", [
    ("lr_schedule", "exponential", "['constant', 'cosine', 'linear']"),
    ("action_loss", "huber", "['l1', 'mse']"),
    ("expert_arch", "lstm", "['cross_attn', 'self_attn']"),
    ("dataset_format", "zarr", "['hdf5', 'rlds']"),
    ("device", "tpu", "['auto', 'cpu', 'cuda']"),
    ("attn_implementation", "xformers", "['auto', 'sdpa', 'eager', 'flash_attention_2']"),
    ("wandb_mode", "disabled", "['offline', 'online']"),
])
def test_a_config_built_in_python_is_held_to_the_clis_choices(tmp_path, field, value, choices):
    # draccus refuses these on the command line; from Python they must fail before run.json is written
    from data_fixtures import tiny_config

    from prismatic.training import train

    with pytest.raises(ConfigError, match=f"^{field} is '{value}', expected one of {re.escape(choices)}$"):
        train(tiny_config(tmp_path / "no-data", tmp_path / "run", **{field: value}))
    assert not (tmp_path / "run").exists()


def test_the_configs_action_losses_are_the_models():
    import typing

    from prismatic.models.modeling import ACTION_LOSSES
    from prismatic.training.config import ActionLoss

    assert set(typing.get_args(ActionLoss)) == set(ACTION_LOSSES)

def test_config_validation_accepts_the_edges():
    FinetuneConfig(min_lr_ratio=0.0).validate()
    FinetuneConfig(min_lr_ratio=1.0, lr_schedule="linear").validate()
    FinetuneConfig(warmup_steps=10, max_steps=10).validate()  # constant: the warm-up may outlast the run
    FinetuneConfig(lr_schedule="cosine", warmup_steps=9, max_steps=10).validate()


def test_default_run_dir_names_suite_config_architecture_and_seed():
    """As the bash script names runs: a second seed or the self-attention baseline gets its own directory."""
    from pathlib import Path

    cfg = FinetuneConfig(suite="libero_goal", config_name="tiny", expert_arch="self_attn", seed=3)
    assert cfg.run_dir() == Path("runs") / "libero_goal-tiny-self_attn-seed3"
    assert FinetuneConfig().run_dir() == Path("runs") / "libero_spatial-qwen25-dinosiglip-224px-cross_attn-seed7"
    assert FinetuneConfig(out_dir=Path("elsewhere")).run_dir() == Path("elsewhere")
