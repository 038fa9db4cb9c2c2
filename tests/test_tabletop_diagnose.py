from types import SimpleNamespace

import numpy as np
import pytest

from experiments.robot.tabletop import make_env
from experiments.robot.tabletop_pipeline.diagnose import (
    DiagnoseConfig,
    attention_shares,
    cli,
    displacement_spread,
    expert_chunk,
    first_chunk_agreement,
    main,
    training_crop_area,
)
from prismatic.models import BaseModelConfig, build_vla, get_config, save_pretrained

STATS = {"action": {"q01": [-1.0] * 7, "q99": [1.0] * 7, "mask": [True] * 6 + [False]},
         "proprio": {"q01": [-1.0] * 8, "q99": [1.0] * 8, "mask": [True] * 8}}


def model_for(arch: str):
    model = build_vla(get_config("tiny", expert_arch=arch), BaseModelConfig(random_seed=0), seed=0)
    model.norm_stats = STATS
    return model.eval()


def test_displacement_spread_by_hand():
    right = np.zeros((8, 7))
    right[:, 0] = 1.0
    chunks = np.stack([right, -right])  # summed x motion +8 and -8: std 8; y and z never move
    assert displacement_spread(chunks) == pytest.approx(8.0 / 3.0)
    assert displacement_spread(np.stack([right, right])) == 0.0


@pytest.mark.parametrize("arch", ["cross_attn", "self_attn"])
def test_attention_shares_add_up_per_block(arch):
    model = model_for(arch)
    cfg = model.config
    env = make_env("goal", 0, 0)
    rows = attention_shares(model, env.reset(), env.instruction)
    assert len(rows) == cfg.num_expert_blocks
    keys = cfg.num_action_queries + 1 + cfg.num_vision_tokens + (cfg.chunk_len if arch == "self_attn" else 0)
    for row in rows:
        total = sum(row[k] for k in ("self", "action_queries", "proprio", "vision") if k in row)
        assert total == pytest.approx(1.0, abs=1e-5)
        assert ("self" in row) == (arch == "self_attn")
        assert row["uniform_weight"] == pytest.approx(1.0 / keys)
        assert row["max_vision_token"] <= row["vision"]
    gate0 = 0.5 if arch == "cross_attn" else 0.0  # sigmoid(0) / tanh(0): gates start at g = 0
    assert rows[0]["vision_gate"] == pytest.approx(gate0)


def test_expert_chunk_is_the_noise_free_scripted_expert():
    a = expert_chunk("goal", 0, 0, 8)
    assert a.shape == (8, 7) and np.array_equal(a, expert_chunk("goal", 0, 0, 8))
    # put the red cube in the bowl: the cube starts at -x of the gripper, so the expert heads to -x
    assert a[0, 0] < 0


def test_main_reports_both_swaps(tmp_path, capsys):
    save_pretrained(model_for("cross_attn"), tmp_path / "ckpt", step=1)
    out = main(DiagnoseConfig(checkpoint=tmp_path / "ckpt", suite="goal", init_states=3, agreement_states=1))
    assert set(out["sensitivity"]) == {"instruction_swap", "scene_swap"}
    assert set(out["agreement"]) == {"x", "y", "z"}
    assert out["sensitivity"]["instruction_swap"]["scripted_expert"] > 0  # ten goals, ten directions
    assert "instruction_swap: first-chunk displacement spread" in capsys.readouterr().out
    with pytest.raises(ValueError, match="init_states must be >= 2"):
        main(DiagnoseConfig(checkpoint=tmp_path / "ckpt", init_states=1))
    with pytest.raises(ValueError, match="agreement_states must be >= 0"):
        main(DiagnoseConfig(checkpoint=tmp_path / "ckpt", agreement_states=-1))


def test_first_chunk_agreement_by_construction(monkeypatch):
    import experiments.robot.tabletop_pipeline.diagnose as d

    class Policy:  # plays back the model's chunks, one per (task, init state)
        def __init__(self, model, _crop):
            self.model = model

        def act(self, obs, instructions, ids):
            return np.stack(self.model.chunks)

    monkeypatch.setattr(d, "VLAPolicy", Policy)
    # a scaled copy of the scripted expert's first chunks: correlation 1, half the spread
    model = SimpleNamespace(config=SimpleNamespace(chunk_len=8),
                            chunks=[0.5 * expert_chunk("goal", t, i, 8) for t in range(10) for i in range(2)])
    out = first_chunk_agreement(model, "goal", 2)
    for axis in "xyz":
        assert out[axis]["correlation"] == pytest.approx(1.0)
        assert out[axis]["policy_spread"] == pytest.approx(0.5 * out[axis]["scripted_expert_spread"])
    model.chunks = [np.zeros((8, 7))] * 20  # a policy that never moves: no correlation to speak of
    assert all(np.isnan(v["correlation"]) and v["policy_spread"] == 0 for v in first_chunk_agreement(model, "goal", 2).values())


def test_cli_names_a_missing_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["diagnose", "--checkpoint", str(tmp_path / "missing")])
    assert cli() == 2
    assert f"checkpoint directory {tmp_path / 'missing'} does not exist" in capsys.readouterr().err


def test_the_crop_shown_by_default_is_the_checkpoints_training_crop(tmp_path):
    model = model_for("cross_attn")
    aug = {"image_aug": True, "aug": {"crop_area": 0.81}}
    save_pretrained(model, tmp_path / "aug", step=1, train_config=aug)
    save_pretrained(model, tmp_path / "noaug", step=1, train_config={**aug, "image_aug": False})
    save_pretrained(model, tmp_path / "untrained", step=1)
    assert [training_crop_area(tmp_path / d) for d in ("aug", "noaug", "untrained")] == [0.81, 1.0, 1.0]
