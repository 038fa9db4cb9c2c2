import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from experiments.robot.tabletop.generate import GenerateConfig
from experiments.robot.tabletop.generate import main as generate
from experiments.robot.tabletop_pipeline.reference_bc import (
    ReferenceBCConfig,
    ReferenceBCError,
    ReferencePolicy,
    TaskConditionedCNN,
    main,
    task_index,
    train_reference,
)
from prismatic.vla.datasets import load_suite
from prismatic.vla.normalization import normalize


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "data"
    generate(GenerateConfig(out_dir=out, suites=["goal"], task_ids=[0, 1], demos_per_task=3, pretrain_scenes=0,
                            workers=1), log=lambda *_: None)
    return out


def full_batch_mse(model, ds) -> float:
    raw = ds.get_batch(np.arange(len(ds)))
    index = task_index("goal")
    with torch.no_grad():
        pred = model(torch.as_tensor(raw["images"]), torch.tensor([index[i] for i in raw["instructions"]]),
                     torch.as_tensor(normalize(raw["proprio"], ds.norm_stats["proprio"]), dtype=torch.float32))
    return F.mse_loss(pred, torch.as_tensor(normalize(raw["actions"], ds.norm_stats["action"]),
                                            dtype=torch.float32)).item()


def test_training_fits_the_demos_and_is_deterministic(data_root):
    ds = load_suite(data_root, "goal")
    cfg = ReferenceBCConfig(data_root=data_root, steps=60)
    torch.manual_seed(cfg.seed)
    untrained = full_batch_mse(TaskConditionedCNN(10).eval(), ds)
    a, b = (train_reference(ds, "goal", cfg, log=lambda *_: None) for _ in range(2))
    assert full_batch_mse(a, ds) < 0.4 * untrained  # 0.26 measured
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_action_expert_head_reads_the_same_inputs_and_fits(data_root):
    """The VLA's action expert as the head: 16 task tokens and the conv features reach every block."""
    ds = load_suite(data_root, "goal")
    cfg = ReferenceBCConfig(data_root=data_root, steps=60, head="action_expert")
    torch.manual_seed(cfg.seed)
    untrained = TaskConditionedCNN(10, head="action_expert").eval()
    seen = []
    for block in untrained.head.blocks:
        block.register_forward_pre_hook(lambda _m, args: seen.append((args[1].shape[1], args[2].shape[1])))
    untrained_mse = full_batch_mse(untrained, ds)
    assert set(seen) == {(16 + 1, 2 * 8 * 8)}  # (task tokens + proprio, vision tokens of 2 cameras) per block
    model = train_reference(ds, "goal", cfg, log=lambda *_: None)
    assert full_batch_mse(model, ds) < 0.5 * untrained_mse


def test_policy_maps_instructions_to_task_indices_and_env_actions():
    model = TaskConditionedCNN(10).eval()
    seen, calls = [], []
    model.task.register_forward_hook(lambda _m, args, _o: seen.append(args[0].tolist()))
    model.register_forward_hook(lambda _m, args, out: calls.append((args[2].numpy(), out.numpy())))
    obs = {"agentview_image": np.zeros((64, 64, 3), np.uint8), "robot0_eye_in_hand_image": np.zeros((64, 64, 3), np.uint8),
           "robot0_eef_pos": np.zeros(3), "robot0_eef_quat": np.array([1.0, 0, 0, 0]),
           "robot0_gripper_qpos": np.array([0.04, -0.04])}
    stats = {"action": {"q01": [-2.0] * 6 + [0.0], "q99": [2.0] * 6 + [1.0], "mask": [True] * 6 + [False]},
             "proprio": {"q01": [0.0] * 8, "q99": [2.0] * 8, "mask": [True] * 8}}
    acts = ReferencePolicy(model, "goal", stats).act([obs, obs], ["turn on the stove", "put the red cube in the bowl"],
                                                     [0, 1])
    assert seen == [[6, 0]]
    (proprio, pred), = calls
    # raw [0, 0, 0, π, 0, 0, .04, -.04] (180° about x) mapped from [0, 2] to [-1, 1]: x - 1, clipped
    np.testing.assert_allclose(proprio, [[-1, -1, -1, 1, -1, -1, -0.96, -1]] * 2, atol=1e-6)
    assert acts.shape == (2, 8, 7)
    np.testing.assert_allclose(acts[..., :6], 2 * pred[..., :6], atol=1e-6)  # [-1, 1] → [-2, 2]
    np.testing.assert_array_equal(acts[..., 6], np.where(pred[..., 6] > 0.5, -1.0, 1.0))  # 1 open → -1


def test_main_writes_rows_and_summary_and_resumes(data_root, tmp_path):
    cfg = ReferenceBCConfig(data_root=data_root, suites=["goal"], steps=20, trials_per_task=1, num_envs=10,
                            out_dir=tmp_path / "ref")
    summary = main(cfg, log=lambda *_: None)
    rows = [json.loads(line) for line in open(tmp_path / "ref" / "goal.jsonl")]
    # the demos cover tasks 0 and 1 of the goal suite: only those are rolled out
    assert sorted(r["task_id"] for r in rows) == [0, 1] and summary["suites"]["goal"]["episodes"] == 2
    assert summary["suites"]["goal"]["success"] == sum(r["success"] for r in rows) / 2
    assert json.loads((tmp_path / "ref" / "summary.json").read_text()) == summary
    before = (tmp_path / "ref" / "goal.jsonl").read_bytes()
    logged = []
    assert main(cfg, log=logged.append) == summary  # every episode already done: nothing trained or rolled out
    assert not any("step" in line for line in logged)
    assert (tmp_path / "ref" / "goal.jsonl").read_bytes() == before
    # fewer parallel envs roll out the same policy: still nothing to do
    logged = []
    assert main(dataclasses.replace(cfg, num_envs=2), log=logged.append)["suites"] == summary["suites"]
    assert not any("step" in line for line in logged)
    # the summary counts the rows' successes (these 20 steps solve nothing; one row marked solved by hand)
    path = tmp_path / "ref" / "goal.jsonl"
    path.write_text("".join(json.dumps({**r, "success": r["task_id"] == 1}) + "\n" for r in rows))
    before, logged = path.read_bytes(), []
    assert main(cfg, log=logged.append)["suites"]["goal"]["success"] == 0.5
    assert "[reference] goal: 1/2 episodes solved" in logged
    # other weights (another seed): refused, the rows kept, unless asked to replace them; then it says so
    with pytest.raises(ReferenceBCError, match="goal.jsonl holds 2 episode.s. of other settings or demos .*"
                                               "pass --overwrite true"):
        main(dataclasses.replace(cfg, seed=1), log=logged.append)
    assert (tmp_path / "ref" / "goal.jsonl").read_bytes() == before
    main(dataclasses.replace(cfg, seed=1, overwrite=True), log=logged.append)
    assert any("discarding 2 episode(s) of other weights or settings" in line for line in logged)


def test_bad_input_names_the_field(data_root, tmp_path):
    with pytest.raises(ReferenceBCError, match=r"suites is \['kitchen'\]"):
        ReferenceBCConfig(suites=["kitchen"]).validate()
    with pytest.raises(ReferenceBCError, match="steps is 0"):
        ReferenceBCConfig(steps=0).validate()
    with pytest.raises(ReferenceBCError, match="head is 'transformer'"):
        ReferenceBCConfig(head="transformer").validate()
    with pytest.raises(ReferenceBCError, match="lr is nan, expected a finite number"):
        ReferenceBCConfig(lr=float("nan")).validate()
    with pytest.raises(ReferenceBCError, match=r"must lie within the 50 init states, got 0 \+ 60"):
        ReferenceBCConfig(trials_per_task=60).validate()
    with pytest.raises(ReferenceBCError, match="seed is -1, expected >= 0"):
        ReferenceBCConfig(seed=-1).validate()
    with pytest.raises(ReferenceBCError, match="instructions not in the spatial suite"):
        train_reference(load_suite(data_root, "goal"), "spatial", ReferenceBCConfig(steps=1))
    r = subprocess.run([sys.executable, "-m", "experiments.robot.tabletop_pipeline.reference_bc", "--data_root",
                        str(tmp_path / "none"), "--out_dir", str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode == 2 and "reference_bc:" in r.stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize("kw, match", [
    ({"suites": []}, r"suites is \[\], expected a non-empty subset"),
    ({"batch_size": 0}, "batch_size is 0, expected a positive integer"),
    ({"cpu_threads": 0}, "cpu_threads is 0, expected a positive integer"),
    ({"lr": 0.0}, "need lr > 0"),
    ({"weight_decay": -0.01}, "weight_decay >= 0"),
    ({"min_lr_ratio": 1.5}, r"min_lr_ratio in \[0, 1\]"),
    ({"min_lr_ratio": -0.1}, r"min_lr_ratio in \[0, 1\]"),
    ({"warmup_steps": 10, "steps": 10}, "need 0 <= warmup_steps < steps .* got 10, 10 and 0.0"),
    ({"warmup_steps": -1}, "need 0 <= warmup_steps < steps"),
    ({"max_grad_norm": -1.0}, "max_grad_norm >= 0, got 0, 1500 and -1.0"),
])
def test_bad_settings_are_refused(kw, match):
    with pytest.raises(ReferenceBCError, match=match):
        ReferenceBCConfig(**kw).validate()


def test_edge_settings_are_accepted():
    ReferenceBCConfig(steps=1, min_lr_ratio=0.0, weight_decay=0.0, max_grad_norm=0.0).validate()
    ReferenceBCConfig(steps=10, warmup_steps=9, min_lr_ratio=1.0, first_init_state=49, trials_per_task=1).validate()


def test_the_encoder_sees_both_cameras_channel_first_in_0_1_at_any_size():
    model = TaskConditionedCNN(10, image_size=36).eval()  # 36 → 18 → 9 → 5: a 5 × 5 map, not 36 // 8 = 4
    seen = []
    model.encoder.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    images = torch.as_tensor(np.random.default_rng(0).integers(0, 256, (2, 2, 36, 36, 3), dtype=np.uint8))
    with torch.no_grad():
        out = model(images, torch.tensor([0, 3]), torch.zeros(2, 8))
    assert out.shape == (2, 8, 7)
    (x,) = seen
    assert x.shape == (4, 3, 36, 36)  # (batch × cameras, channels, height, width)
    torch.testing.assert_close(x[1, 2], images[0, 1, :, :, 2].float() / 255)  # sample 0, camera 1, blue
    torch.testing.assert_close(x[2, 0], images[1, 0, :, :, 0].float() / 255)


def test_action_expert_head_needs_the_tiny_vlas_shapes():
    with pytest.raises(ReferenceBCError, match="needs the tiny VLA's chunk_len, action_dim and proprio_dim"):
        TaskConditionedCNN(10, chunk_len=4, head="action_expert")


def test_training_schedule_clip_decay_and_normalised_batches(data_root, monkeypatch):
    ds = load_suite(data_root, "goal")
    batches, steps, losses = [], [], []
    get_batch = ds.get_batch
    monkeypatch.setattr(ds, "get_batch", lambda idx: batches.append(get_batch(idx)) or batches[-1])
    step = torch.optim.AdamW.step

    def record(opt, *a, **kw):
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        g = opt.param_groups[0]
        steps.append((g["lr"], g["weight_decay"], torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(x) for x in grads])).item()))
        return step(opt, *a, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", record)
    mse, forward, inputs = F.mse_loss, TaskConditionedCNN.forward, []

    def loss(pred, target):
        losses.append((target, mse(pred, target)))
        return losses[-1][1]

    monkeypatch.setattr(F, "mse_loss", loss)
    monkeypatch.setattr(TaskConditionedCNN, "forward",
                        lambda self, images, task, proprio: inputs.append(proprio) or forward(self, images, task, proprio))
    logged = []
    cfg = ReferenceBCConfig(steps=4, batch_size=2, lr=0.01, warmup_steps=2, min_lr_ratio=0.5, weight_decay=0.05,
                            max_grad_norm=1e-3)
    train_reference(ds, "goal", cfg, log=logged.append)
    # lr: warm-up 0.005, 0.01; then cosine from 0.01 to 0.005 over 2 steps: 0.01, 0.0075
    assert [s[0] for s in steps] == pytest.approx([0.005, 0.01, 0.01, 0.0075])
    assert [s[1] for s in steps] == [0.05] * 4
    assert all(0 < s[2] <= 1e-3 * (1 + 1e-5) for s in steps)  # clipped to max_grad_norm
    assert logged == [f"[reference] goal step 4/4 loss {losses[-1][1].item():.4f}"]  # the last step is logged
    assert len(batches) == len(losses) + 1 == len(inputs) + 1 == 5
    for raw, (target, _), proprio in zip(batches[1:], losses, inputs):  # batches[0]: the image-size probe
        np.testing.assert_allclose(target.numpy(), normalize(raw["actions"], ds.norm_stats["action"]), atol=1e-6)
        np.testing.assert_allclose(proprio.numpy(), normalize(raw["proprio"], ds.norm_stats["proprio"]), atol=1e-6)
    steps.clear()
    model = train_reference(ds, "goal", dataclasses.replace(cfg, max_grad_norm=0.0), log=lambda *_: None)
    assert all(s[2] > 1e-2 for s in steps)  # 0: no clipping
    assert not model.training  # handed back for evaluation (the action expert's input noise is off)


def test_main_hands_its_settings_to_the_rollouts_and_extends_a_run(data_root, tmp_path, monkeypatch):
    from types import SimpleNamespace

    import experiments.robot.harness
    import experiments.robot.tabletop_pipeline.reference_bc as ref
    import prismatic.vla.datasets
    from experiments.robot.harness import read_rows

    trained, rollouts = [], []
    monkeypatch.setattr(ref, "train_reference", lambda ds, suite, cfg, log: trained.append(
        (suite, cfg.steps, torch.get_num_threads())) or SimpleNamespace(image_size=64))

    def run_episodes(factory, policy, episodes, path, num_envs, seed, log, protocol, run_info):
        rollouts.append({"episodes": [(e.task_id, e.init_state_id) for e in episodes], "num_envs": num_envs, "seed": seed,
                         "noop_steps": protocol.num_noop_steps})
        done = {r["key"]: r for r in read_rows(path)}
        new = [{"key": e.key, "task_id": e.task_id, "success": e.task_id == 1, **run_info}
               for e in episodes if e.key not in done]
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in new)
        return [done.get(e.key) or next(r for r in new if r["key"] == e.key) for e in episodes]

    monkeypatch.setattr(experiments.robot.harness, "run_episodes", run_episodes)
    threads = torch.get_num_threads()
    cfg = ReferenceBCConfig(data_root=data_root, suites=["goal"], steps=3, trials_per_task=1, first_init_state=5,
                            num_envs=3, seed=7, cpu_threads=threads + 1, out_dir=tmp_path / "ref")
    summary = main(cfg, log=lambda *_: None)
    assert torch.get_num_threads() == threads  # set back after the run
    assert trained == [("goal", 3, threads + 1)]
    assert rollouts == [{"episodes": [(0, 5), (1, 5)], "num_envs": 3, "seed": 7, "noop_steps": 0}]
    assert summary["suites"]["goal"]["success"] == 0.5
    # two trials per task: the same policy, so the finished episodes are kept and the new ones rolled out
    summary = main(dataclasses.replace(cfg, trials_per_task=2), log=lambda *_: None)
    assert rollouts[-1]["episodes"] == [(0, 5), (0, 6), (1, 5), (1, 6)]
    assert summary["suites"]["goal"]["episodes"] == 4 and len(read_rows(tmp_path / "ref" / "goal.jsonl")) == 4
    # another number of optimizer steps trains other weights: refused
    with pytest.raises(ReferenceBCError, match="other settings or demos"):
        main(dataclasses.replace(cfg, steps=4), log=lambda *_: None)
    # so do other demos
    load = prismatic.vla.datasets.load_suite
    monkeypatch.setattr(prismatic.vla.datasets, "load_suite",
                        lambda root, suite: setattr(ds := load(root, suite), "fingerprint", "other demos") or ds)
    with pytest.raises(ReferenceBCError, match="other settings or demos"):
        main(cfg, log=lambda *_: None)


def test_cli_names_a_bad_setting(monkeypatch, capsys):
    from experiments.robot.tabletop_pipeline.reference_bc import cli

    monkeypatch.setattr("sys.argv", ["reference_bc", "--steps", "0"])
    assert cli() == 2
    assert "reference_bc: error: steps is 0, expected a positive integer" in capsys.readouterr().err
