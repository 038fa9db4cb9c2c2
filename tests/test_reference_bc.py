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
