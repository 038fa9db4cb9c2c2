from pathlib import Path
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
    training_fit,
    vla_predict,
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
    from experiments.robot.tabletop import ScriptedExpert, make_env

    a = expert_chunk("goal", 0, 0, 8)
    # by hand: a noise-free expert with any random stream (a noisy one differs from it by ~0.1 per axis)
    env, expert = make_env("goal", 0, 0, render=False), ScriptedExpert(noise=0.0, rng=np.random.default_rng(99))
    env.reset()
    want = []
    for _ in range(8):
        want.append(expert.act(env.state))
        env.step(want[-1])
    assert a.shape == (8, 7) and np.array_equal(a, np.stack(want))
    # put the red cube in the bowl: the cube starts at -x of the gripper, so the expert heads to -x
    assert a[0, 0] < 0


def test_main_reports_both_swaps(tmp_path, capsys):
    save_pretrained(model_for("cross_attn"), tmp_path / "ckpt", step=1)
    out = main(DiagnoseConfig(checkpoint=tmp_path / "ckpt", suite="goal", init_states=3, agreement_states=1,
                              grasp_states=1, fit_steps=0))
    assert set(out["sensitivity"]) == {"instruction_swap", "scene_swap"}
    assert set(out["agreement"]) == {"x", "y", "z"}
    assert out["grasps"]["summary"]["episodes"] == len(out["grasps"]["episodes"]) > 0
    assert out["sensitivity"]["instruction_swap"]["scripted_expert"] > 0  # ten goals, ten directions
    assert "instruction_swap: first-chunk displacement spread" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"init_states must be in 2\.\.50 .*got 1"):
        main(DiagnoseConfig(checkpoint=tmp_path / "ckpt", init_states=1))
    with pytest.raises(ValueError, match=r"init_states must be in 2\.\.50 .*got 999"):
        main(DiagnoseConfig(checkpoint=tmp_path / "ckpt", init_states=999))
    with pytest.raises(ValueError, match=r"agreement_states must be in 0\.\.50, got -1"):
        main(DiagnoseConfig(checkpoint=tmp_path / "ckpt", agreement_states=-1))
    with pytest.raises(ValueError, match=r"grasp_states must be in 0\.\.50, got 51"):
        main(DiagnoseConfig(checkpoint=tmp_path / "ckpt", grasp_states=51))
    with pytest.raises(ValueError, match="fit_steps must be >= 0"):
        main(DiagnoseConfig(checkpoint=tmp_path / "ckpt", fit_steps=-1))
    with pytest.raises(ValueError, match="names no training data_root; pass --data_root"):
        main(DiagnoseConfig(checkpoint=tmp_path / "ckpt", init_states=2, agreement_states=0, grasp_states=0))


def fit_dataset(image_size: int = 4):
    """Two tasks × two episodes of two steps; step-0 x actions a: 0.2, 0.6 and b: -0.5, -0.1, all else 0."""
    from prismatic.vla.datasets import Episode, VLADataset
    from prismatic.vla.datasets.episodes import ArrayImages

    eps = []
    for task, xs in (("a", (0.2, 0.6)), ("b", (-0.5, -0.1))):
        for x in xs:
            actions = np.zeros((2, 7), np.float32)
            actions[0, 0] = x
            eps.append(Episode(task, actions, np.zeros((2, 8), np.float32),
                               ArrayImages(np.zeros((2, 2, image_size, image_size, 3), np.uint8)), f"{task}{x}"))
    return VLADataset(eps, chunk_len=1)


def test_training_fit_by_hand():
    ds = fit_dataset()
    first_x = {("a", 0.2), ("a", 0.6), ("b", -0.5), ("b", -0.1)}
    means = {"a": 0.4, "b": -0.3}

    def chunks(raw, x_of):
        out = np.zeros((len(raw["instructions"]), 1, 7), np.float32)
        out[:, 0, 0] = [x_of(i, a) for i, a in zip(raw["instructions"], raw["actions"][:, 0, 0])]
        return out

    def at_step_0(fn):
        return lambda raw: chunks(raw, lambda i, a: fn(i, a) if (i, round(float(a), 1)) in first_x else 0.0)

    truth, task_mean, zero = (training_fit(at_step_0(f), ds, STATS, 1)[0]
                              for f in (lambda i, a: a, lambda i, a: means[i], lambda i, a: 0.0))
    var = 0.04 / 3  # deviations ±0.2 in x, none in y and z
    assert truth["samples"] == 4 and truth["within_task_var"] == pytest.approx(var, rel=1e-3)
    assert truth["mse"] == pytest.approx(0.0, abs=1e-6) and truth["r2"] == pytest.approx(1.0, abs=1e-3)
    assert task_mean["r2"] == pytest.approx(0.0, abs=1e-3)  # each task's mean opening move explains nothing
    assert zero["mse"] == pytest.approx((0.04 + 0.36 + 0.25 + 0.01) / 4 / 3, rel=1e-3)
    assert zero["r2"] == pytest.approx(1 - 0.165 / 0.04, rel=1e-3)
    assert [r["step"] for r in training_fit(at_step_0(lambda i, a: a), ds, STATS, 5)] == [0, 1]  # 2-step episodes


def test_vla_predict_gives_normalised_chunks_for_a_dataset_batch():
    model = model_for("cross_attn")
    ds = fit_dataset(image_size=64)
    batch = ds.get_batch([0, 1, 2])
    pred = vla_predict(model)(batch)
    assert pred.shape == (3, model.config.chunk_len, 7) and np.isfinite(pred).all()
    # the model's own output, before un-normalising: action statistics ten times wider leave it as it was
    model.norm_stats = {**STATS, "action": {**STATS["action"], "q01": [-10.0] * 7, "q99": [10.0] * 7}}
    assert np.array_equal(vla_predict(model)(batch), pred) and np.abs(pred).max() > 0.01


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


class ScriptedPolicy:
    """The noise-free scripted expert as a one-action-chunk policy on whichever env it is pointed at."""

    def __init__(self):
        from experiments.robot.tabletop.expert import ScriptedExpert

        self.env, self.expert = None, ScriptedExpert(noise=0.0)

    def act(self, obs, instructions, ids):
        return self.expert.act(self.env.state)[None, None]


def test_first_grasp_of_the_scripted_expert_is_on_the_named_object():
    from experiments.robot.tabletop.physics import GRASP_TOL
    from experiments.robot.tabletop_pipeline.diagnose import first_grasp

    policy = ScriptedPolicy()
    for task_id in (0, 5):  # red cube, orange cylinder, among three distractors
        policy.env = env = make_env("object", task_id, 1)
        policy.expert.reset()
        g = first_grasp(env, policy, env.instruction)
        assert g["closed"] and g["nearest_is_named"] and g["objects"] == 4
        assert g["distance_to_named"] <= GRASP_TOL


def test_grasp_report_scores_a_policy_that_goes_for_the_wrong_object(monkeypatch):
    import experiments.robot.tabletop_pipeline.diagnose as d

    class WrongObject:  # closes straight above the first movable body that is not the named one
        def act(self, obs, instructions, ids):
            s = self.env.state
            other = next(b for b in s.bodies if b.spec.movable and b.name != s.goals[0].obj)
            a = np.zeros(7)
            a[:2] = np.clip((other.pos[:2] - s.gripper_pos[:2]) / 0.03, -1, 1)
            a[6] = 1.0 if np.hypot(*(other.pos[:2] - s.gripper_pos[:2])) < 1e-3 else -1.0
            return a[None, None]

    class Never:
        def act(self, obs, instructions, ids):
            a = np.zeros(7)
            a[6] = -1.0
            return a[None, None]

    for policy in (WrongObject(), Never()):
        def env_for(*args, _policy=policy, **kw):
            _policy.env = make_env(*args, **kw)
            return _policy.env

        monkeypatch.setattr(d, "make_env", env_for)
        out = d.grasp_report(policy, "object", 1)
        assert out["summary"]["episodes"] == 10 and len(out["episodes"]) == 10
        if isinstance(policy, Never):
            assert out["summary"] == {"episodes": 10, "closed": 0}
        else:
            s = out["summary"]
            assert s["closed"] == 10 and s["nearest_is_named"] == 0.0 and s["within_grasp_tol"] == 0.0
            assert s["chance"] == pytest.approx(0.25) and s["median_distance_m"] > 0.05  # slots 10 cm apart


def test_grasp_report_skips_tasks_without_a_pick_and_place_first():
    from experiments.robot.tabletop_pipeline.diagnose import grasp_report

    class Never:
        def act(self, obs, instructions, ids):
            return np.array([[[0, 0, 0, 0, 0, 0, -1.0]]])

    places = sum(make_env("goal", t, 0).state.goals[0].verb == "place" for t in range(10))
    assert 0 < places < 10
    assert grasp_report(Never(), "goal", 1)["summary"]["episodes"] == places


def test_attention_shares_by_construction(monkeypatch):
    import torch

    import experiments.robot.tabletop_pipeline.diagnose as d

    class Block(torch.nn.Module):  # attention weights given by hand, (batch 1, heads 1, chunk slots 2, keys)
        def __init__(self, has_self_attn, weights):
            super().__init__()
            self.has_self_attn, self.weights = has_self_attn, torch.tensor(weights)[None, None]
            self.gate = torch.nn.Parameter(torch.tensor(0.5))

        def attention(self, x):
            return self.weights, None

        def forward(self, x):
            return x

    class Policy:
        def __init__(self, model, crop):
            self.model, self.crop = model, crop

        def act(self, obs, instructions, ids):
            crops.append(self.crop.area)
            for block in self.model.action_expert.blocks:
                block(torch.zeros(1))

    crops = []
    monkeypatch.setattr(d, "VLAPolicy", Policy)
    # keys: [self × 2], action queries × 2, proprio, vision × 3
    cross = Block(False, [[0.1, 0.1, 0.2, 0.3, 0.2, 0.1], [0.2, 0.0, 0.4, 0.1, 0.1, 0.2]])
    self_attn = Block(True, [[0.1, 0.2, 0.1, 0.1, 0.2, 0.05, 0.2, 0.05]] * 2)
    model = SimpleNamespace(config=SimpleNamespace(chunk_len=2, num_action_queries=2),
                            action_expert=SimpleNamespace(blocks=[cross, self_attn]))
    rows = attention_shares(model, {}, "x", crop_area=0.5)
    # cross: the slot mean is [0.15, 0.05, 0.3, 0.2, 0.15, 0.15]
    want_cross = {"action_queries": 0.2, "proprio": 0.3, "vision": 0.5, "max_vision_token": 0.2,
                  "uniform_weight": 1 / 6, "vision_gate": float(torch.sigmoid(torch.tensor(0.5)))}
    want_self = {"self": 0.3, "action_queries": 0.2, "proprio": 0.2, "vision": 0.3, "max_vision_token": 0.2,
                 "uniform_weight": 1 / 8, "vision_gate": float(torch.tanh(torch.tensor(0.5)))}
    for row, want in zip(rows, (want_cross, want_self)):
        assert set(row) == set(want)
        for k, v in want.items():
            assert row[k] == pytest.approx(v, abs=1e-6), k
    assert crops == [0.5] and not cross._forward_hooks and not self_attn._forward_hooks  # hooks removed


def test_sensitivity_swaps_only_the_instruction_or_only_the_scene(monkeypatch):
    import experiments.robot.tabletop_pipeline.diagnose as d
    from experiments.robot.tabletop import get_suite
    from experiments.robot.tabletop_pipeline.diagnose import sensitivity

    calls = []

    class Policy:  # first call: summed x motion 8·k for chunk k; second call: 16·k
        def __init__(self, model, crop):
            self.crop = crop.area

        def act(self, obs, instructions, ids):
            calls.append((obs, list(instructions), self.crop))
            out = np.zeros((len(obs), 8, 7))
            out[:, :, 0] = len(calls) * np.arange(len(obs))[:, None]
            return out

    monkeypatch.setattr(d, "VLAPolicy", Policy)
    out = sensitivity(SimpleNamespace(config=SimpleNamespace(chunk_len=8)), "goal", 3, 3, image_size=32,
                      crop_area=0.5)
    (by_instruction, instructions, crop1), (by_scene, scene_instructions, crop2) = calls
    assert instructions == [t.instruction for t in get_suite("goal")] and crop1 == crop2 == 0.5
    assert scene_instructions == [get_suite("goal")[3].instruction] * 3

    def same(a, b):
        return set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)

    first = make_env("goal", 3, 0, image_size=32).reset()  # every instruction on task 3's init state 0
    assert first["agentview_image"].shape == (32, 32, 3) and all(same(o, first) for o in by_instruction)
    assert all(same(o, make_env("goal", 3, i, image_size=32).reset()) for i, o in enumerate(by_scene))
    assert not same(by_scene[0], by_scene[1])
    assert out["instruction_swap"]["policy"] == pytest.approx(8 * np.std(np.arange(10)) / 3)
    assert out["scene_swap"]["policy"] == pytest.approx(16 * np.std(np.arange(3)) / 3)
    assert out["instruction_swap"]["scripted_expert"] == displacement_spread(
        np.stack([expert_chunk("goal", t, 0, 8) for t in range(10)]))
    assert out["scene_swap"]["scripted_expert"] == displacement_spread(
        np.stack([expert_chunk("goal", 3, i, 8) for i in range(3)]))


def test_first_grasp_names_the_first_goals_object_and_stops_at_max_steps():
    from experiments.robot.tabletop.physics import GRASP_TOL
    from experiments.robot.tabletop_pipeline.diagnose import first_grasp

    policy = ScriptedPolicy()
    policy.env = env = make_env("long", 0, 0)  # red cube first, then the blue ball
    assert [g.obj for g in env.state.goals] == ["red_cube", "blue_ball"]
    g = first_grasp(env, policy, env.instruction)
    assert g["closed"] and g["nearest_is_named"] and g["distance_to_named"] <= GRASP_TOL

    class LateClose:  # one chunk: still with the fingers open up to max_steps, then a close past it
        def act(self, obs, instructions, ids):
            chunk = np.zeros((env.max_steps + 1, 7))
            chunk[:, 6] = -1.0
            chunk[-1, 6] = 1.0
            return chunk[None]

    env = make_env("object", 0, 0)
    assert first_grasp(env, LateClose(), env.instruction) == {"closed": False} and env.steps == env.max_steps


def test_grasp_report_summary_by_hand(monkeypatch):
    import experiments.robot.tabletop_pipeline.diagnose as d
    from experiments.robot.tabletop.physics import GRASP_TOL

    closed = [(0.001, True, 4), (0.002, True, 4), (GRASP_TOL, True, 2), (GRASP_TOL + 0.001, False, 4),
              (0.05, False, 4), (0.06, False, 2), (0.07, False, 4), (0.5, False, 4)]
    rows = iter([{"closed": False}] * 2 + [{"closed": True, "distance_to_named": x, "nearest_is_named": n,
                                            "objects": k} for x, n, k in closed])
    monkeypatch.setattr(d, "first_grasp", lambda env, policy, instruction: next(rows))
    out = d.grasp_report(None, "object", 1)  # ten pick-and-place tasks, one init state each
    assert out["summary"] == pytest.approx({
        "episodes": 10, "closed": 8, "nearest_is_named": 3 / 8, "chance": (6 * 0.25 + 2 * 0.5) / 8,
        "median_distance_m": (GRASP_TOL + 0.001 + 0.05) / 2, "within_grasp_tol": 3 / 8})
    assert [(r["task_id"], r["init_state"]) for r in out["episodes"]] == [(t, 0) for t in range(10)]


def test_training_fit_normalises_the_targets_in_any_batch_size():
    ds = fit_dataset()
    # q01 / q99 = ∓2: the step-0 x actions 0.2, 0.6, -0.5, -0.1 normalise to 0.1, 0.3, -0.25, -0.05
    wide = {**STATS, "action": {**STATS["action"], "q01": [-2.0] * 7, "q99": [2.0] * 7}}

    def zero(raw):
        return np.zeros((len(raw["instructions"]), 1, 7), np.float32)

    rows = training_fit(zero, ds, wide, 2)
    assert rows[0]["mse"] == pytest.approx((0.01 + 0.09 + 0.0625 + 0.0025) / 4 / 3, rel=1e-3)
    assert rows[0]["within_task_var"] == pytest.approx(0.01 / 3, rel=1e-3)  # deviations ±0.1 in x
    assert rows[0]["r2"] == pytest.approx(1 - 0.1650 / 4 / 0.01, rel=1e-3)
    # step 1: every action 0, so no variance within a task to explain
    assert rows[1]["within_task_var"] == 0.0 and rows[1]["mse"] == 0.0 and np.isnan(rows[1]["r2"])
    one_by_one = training_fit(zero, ds, wide, 2, batch_size=1)
    assert [r["samples"] for r in one_by_one] == [4, 4]
    assert one_by_one[0] == pytest.approx(rows[0])


def test_vla_predict_shows_the_model_its_crop():
    from experiments.robot.policy import CenterCrop, VLAPolicy

    model = model_for("cross_attn")
    batch = fit_dataset(image_size=64).get_batch([0, 1])
    batch["images"] = np.random.default_rng(0).integers(0, 256, batch["images"].shape, dtype=np.uint8)
    cropped = vla_predict(model, crop_area=0.5)(batch)
    want = VLAPolicy(model, CenterCrop(0.5)).normalised_chunks(batch["images"], batch["proprio"],
                                                               batch["instructions"])
    assert np.array_equal(cropped, want) and not np.allclose(cropped, vla_predict(model)(batch))


def test_main_hands_its_settings_to_every_measurement(tmp_path, monkeypatch):
    import experiments.robot.tabletop_pipeline.diagnose as d
    import prismatic.models
    from experiments.robot.tabletop import get_task

    seen = {}
    model = SimpleNamespace(eval=lambda: model, config=SimpleNamespace(chunk_len=8))
    monkeypatch.setattr(prismatic.models, "from_pretrained", lambda path: model)
    monkeypatch.setattr(d, "training_crop_area", lambda path: pytest.fail("the crop was given"))
    monkeypatch.setattr(d, "attention_shares", lambda m, obs, instruction, crop: seen.update(
        attention=(instruction, crop, obs["agentview_image"].shape)) or [{"vision": 1.0}])
    monkeypatch.setattr(d, "sensitivity", lambda *a: seen.update(sensitivity=a[1:]) or {})
    monkeypatch.setattr(d, "first_chunk_agreement", lambda *a: seen.update(agreement=a[1:]) or {})
    monkeypatch.setattr(d, "grasp_report", lambda policy, *a: seen.update(grasps=a) or {"summary": {"episodes": 0}})
    monkeypatch.setattr(d, "training_fit_of", lambda m, cfg, crop: seen.update(fit=(cfg.fit_steps, crop)) or [])
    out = main(DiagnoseConfig(checkpoint=tmp_path, suite="spatial", task_id=4, init_states=50, image_size=32,
                              crop_area=0.64, agreement_states=50, grasp_states=50, fit_steps=3))
    assert seen == {"attention": (get_task("spatial", 4).instruction, 0.64, (32, 32, 3)),
                    "sensitivity": ("spatial", 4, 50, 32, 0.64), "agreement": ("spatial", 50, 32, 0.64),
                    "grasps": ("spatial", 50, 32), "fit": (3, 0.64)}
    assert out["training_fit"] == [] and out["agreement"] == {}


def test_training_fit_of_reads_the_checkpoints_demos_unless_told(tmp_path, monkeypatch):
    import experiments.robot.tabletop_pipeline.diagnose as d
    import prismatic.vla.datasets

    loaded = []
    monkeypatch.setattr(d, "train_config_of", lambda path: {"data_root": "trained/here", "suite": "object"})
    monkeypatch.setattr(prismatic.vla.datasets, "load_suite", lambda root, suite, chunk_len: loaded.append(
        (root, suite, chunk_len)) or "ds")
    monkeypatch.setattr(d, "training_fit", lambda predict, ds, stats, steps: [(ds, stats, steps)])
    model = SimpleNamespace(config=SimpleNamespace(chunk_len=5), norm_stats=STATS)
    cfg = DiagnoseConfig(checkpoint=tmp_path, suite="goal", fit_steps=2)
    assert d.training_fit_of(model, cfg, 1.0) == [("ds", STATS, 2)]
    d.training_fit_of(model, DiagnoseConfig(checkpoint=tmp_path, data_root=tmp_path / "mine"), 1.0)
    assert loaded == [(Path("trained/here"), "object", 5), (tmp_path / "mine", "object", 5)]


def test_cli_names_a_bad_setting(monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["diagnose", "--init_states", "1"])
    assert cli() == 2
    assert "diagnose: error: init_states must be in 2..50" in capsys.readouterr().err
