import json
import subprocess
import sys

import numpy as np
import pytest

from experiments.robot.tabletop import get_task
from experiments.robot.tabletop.demos import read_task_file, task_file
from experiments.robot.tabletop.env import make_env
from experiments.robot.tabletop.expert import ScriptedExpert
from experiments.robot.tabletop.generate import GenerateConfig
from experiments.robot.tabletop.generate import main as generate
from experiments.robot.tabletop_pipeline.blind_replay import (
    BlindReplayConfig,
    BlindReplayError,
    demo_actions,
    main,
    replay,
    source_trajectories,
)


def test_source_trajectories_are_the_recorded_demos(tmp_path):
    out = tmp_path / "data"
    generate(GenerateConfig(out_dir=out, suites=["goal"], task_ids=[0, 7], demos_per_task=3, pretrain_scenes=0,
                            workers=1, seed=2), log=lambda *_: None)
    for task_id in (0, 7):
        recorded = [d["actions"] for d in read_task_file(task_file(out, "goal", task_id))["demos"]]
        sources = source_trajectories("goal", task_id, 3, seed=2, noise=0.1)
        assert len(sources) == 3
        for r, s in zip(recorded, sources):
            np.testing.assert_array_equal(r, s)


def test_replay_succeeds_exactly_when_the_actions_reach_the_goal():
    env = make_env("goal", 0, 3, render=False)
    env.reset()
    expert, actions, done = ScriptedExpert(noise=0.0), [], False
    while not done:
        actions.append(expert.act(env.state))
        done = env.step(actions[-1])[2]
    actions = np.stack(actions)
    assert replay("goal", 0, 3, actions)  # the noise-free expert's own episode, replayed: deterministic
    assert not replay("goal", 0, 3, actions[:-1])  # one step short of the goal
    assert not replay("goal", 0, 3, np.zeros((64, 7)))
    # the episode ends at the task's max_steps: actions that would reach the goal only after it do not count
    hold = np.zeros((get_task("goal", 0).max_steps - len(actions) + 1, 7))
    hold[:, -1] = -1  # still, fingers open
    assert replay("goal", 0, 3, np.concatenate([hold[1:], actions]))
    assert not replay("goal", 0, 3, np.concatenate([hold, actions]))


def test_demo_actions_is_none_where_the_expert_fails(monkeypatch):
    monkeypatch.setattr("experiments.robot.tabletop_pipeline.blind_replay.ScriptedExpert.act",
                        lambda self, s: np.zeros(7))
    assert demo_actions("goal", 0, 0) is None
    with pytest.raises(BlindReplayError, match="goal task 0: the scripted expert failed too often .* with action "
                                               "noise 0.1: lower the demo noise"):
        source_trajectories("goal", 0, 1, seed=0, noise=0.1)


def test_main_reports_the_mean_of_the_replays(tmp_path):
    cfg = BlindReplayConfig(suites=["goal"], source_demos=2, trials_per_task=3, first_init_state=4,
                            out_dir=tmp_path / "out")
    logged = []
    result = main(cfg, log=logged.append)
    per_task = result["suites"]["goal"]["per_task"]
    assert len(per_task) == 10
    sources = source_trajectories("goal", 6, 2, seed=0, noise=0.1)
    by_hand = np.mean([replay("goal", 6, k, a) for a in sources for k in (4, 5, 6)])
    assert per_task[6] == by_hand
    for task_id in range(10):  # every task from init states 4, 5, 6 (not 0, 1, 2)
        sources = source_trajectories("goal", task_id, 2, seed=0, noise=0.1)
        assert per_task[task_id] == np.mean([replay("goal", task_id, k, a) for a in sources for k in (4, 5, 6)])
    assert result["suites"]["goal"]["success"] == pytest.approx(np.mean(per_task))
    assert all(p * 6 == round(p * 6) for p in per_task)  # 2 demos × 3 init states each
    assert json.loads((tmp_path / "out" / "blind_replay.json").read_text())["suites"] == result["suites"]
    mean = 100 * result["suites"]["goal"]["success"]
    assert logged == ["| suite | success % | per task |", "|---|---:|---|",
                      f"| goal | {mean:.1f} | {' '.join(str(round(100 * p)) for p in per_task)} |"]


@pytest.mark.parametrize("kw, match", [
    ({"suites": ["kitchen"]}, "suites is"),
    ({"suites": []}, r"suites is \[\], expected a non-empty subset"),
    ({"trials_per_task": 0}, "positive integers"),
    ({"source_demos": 0}, "positive integers"),
    ({"first_init_state": 45, "trials_per_task": 10}, "within the 50 init states"),
    ({"noise": -0.1}, "noise must be >= 0"),
    ({"noise": float("nan")}, "noise must be >= 0, got seed=0, noise=nan"),
    ({"noise": float("inf")}, "noise must be >= 0, got seed=0, noise=inf"),
    ({"seed": -1}, "seed and noise must be >= 0, got seed=-1"),
])
def test_bad_settings_are_named(kw, match):
    with pytest.raises(BlindReplayError, match=match):
        BlindReplayConfig(**kw).validate()


def test_cli_exits_2_on_a_bad_setting_and_writes_nothing(tmp_path):
    r = subprocess.run([sys.executable, "-m", "experiments.robot.tabletop_pipeline.blind_replay", "--source_demos", "0",
                        "--out_dir", str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode == 2 and "blind_replay: error: source_demos" in r.stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize("open_loop", [8, 3])  # 3: each call's chunk is only partly executed
def test_replay_policy_in_the_harness_scores_what_replay_scores(tmp_path, open_loop):
    from experiments.robot.harness import Protocol, run_episodes
    from experiments.robot.tabletop_pipeline.blind_replay import ReplayPolicy
    from experiments.robot.tabletop_pipeline.evaluation import TableTopEnvFactory, plan

    episodes = plan(["goal"], [0, 5, 6], trials_per_task=3, first_init_state=2)
    rows = run_episodes(TableTopEnvFactory(), ReplayPolicy("goal", seed=1, open_loop_steps=open_loop), episodes,
                        tmp_path / "r.jsonl", num_envs=4, protocol=Protocol(num_open_loop_steps=open_loop),
                        log=lambda _m: None)
    for e, r in zip(episodes, rows):
        first_demo = source_trajectories("goal", e.task_id, 1, seed=1, noise=0.1)[0]
        assert bool(r["success"]) == replay("goal", e.task_id, e.init_state_id, first_demo), e.key
    assert 0 < sum(r["success"] for r in rows) < len(rows)  # a measurement, not a constant


def test_replay_policy_holds_still_after_the_demo_and_names_foreign_instructions():
    from experiments.robot.tabletop_pipeline.blind_replay import ReplayPolicy

    policy = ReplayPolicy("goal")
    instruction = "turn on the stove"
    policy.start_episodes([{}], [instruction], [7])
    demo = source_trajectories("goal", 6, 1, seed=0, noise=0.1)[0]
    chunks = [policy.act([{}], [instruction], [7])[0] for _ in range(len(demo) // 8 + 2)]
    played = np.concatenate(chunks)
    np.testing.assert_array_equal(played[: len(demo)], demo)
    np.testing.assert_array_equal(played[len(demo):, :6], 0.0)
    assert (played[len(demo):, 6] == demo[-1, 6]).all()
    with pytest.raises(BlindReplayError, match="not a task of the goal suite"):
        policy.start_episodes([{}], ["pick up the red cube and place it in the basket"], [8])


def test_an_out_dir_that_is_a_file_is_named_before_any_rollout(tmp_path, monkeypatch):
    from experiments.robot.tabletop_pipeline import blind_replay

    monkeypatch.setattr(blind_replay, "source_trajectories", lambda *a: pytest.fail("rolled out first"))
    (tmp_path / "f").write_text("mine")
    with pytest.raises(NotADirectoryError, match="--out_dir .*f is a file, not a directory"):
        blind_replay.main(BlindReplayConfig(suites=["goal"], out_dir=tmp_path / "f"), log=lambda *_: None)


def test_replay_policy_replays_the_demos_of_its_seed_and_noise():
    from experiments.robot.tabletop_pipeline.blind_replay import ReplayPolicy

    policy = ReplayPolicy("goal", seed=1, noise=0.05, chunk_len=4, open_loop_steps=3)
    policy.start_episodes([{}], ["turn on the stove"], [0])
    demo = source_trajectories("goal", 6, 1, seed=1, noise=0.05)[0]
    assert not np.array_equal(demo, source_trajectories("goal", 6, 1, seed=1, noise=0.1)[0])
    # chunks of 4 actions, each call 3 further on
    np.testing.assert_array_equal(policy.act([{}], ["turn on the stove"], [0])[0], demo[0:4])
    np.testing.assert_array_equal(policy.act([{}], ["turn on the stove"], [0])[0], demo[3:7])


def test_demo_actions_may_use_every_step_of_the_task(monkeypatch):
    import dataclasses

    from experiments.robot.tabletop_pipeline import blind_replay

    demo = demo_actions("goal", 6, 0)
    assert demo is not None and len(demo) == 12  # turn on the stove: solved on step 12
    for max_steps, want in ((12, demo), (11, None)):
        task = dataclasses.replace(get_task("goal", 6), max_steps=max_steps)
        monkeypatch.setattr(blind_replay, "get_task", lambda suite, task_id, _task=task: _task)
        got = demo_actions("goal", 6, 0)
        assert (got is None) if want is None else np.array_equal(got, want)
