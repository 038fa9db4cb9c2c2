"""TableTop-4 data: demo files in LIBERO's raw HDF5 layout (keys, shapes, dtypes, attrs), exact replay of
every recorded episode, byte-identical regeneration, refusal to overwrite, bad input, and the pretraining
pool (vocabulary, facts consistent with the scenes)."""

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest

from experiments.robot.tabletop import SceneState, TableTopEnv, get_task
from experiments.robot.tabletop.demos import read_task_file, task_file
from experiments.robot.tabletop.generate import MANIFEST, PRETRAIN_FILE, GenerateConfig, main
from experiments.robot.tabletop.language import NUMBERS, unknown_words
from experiments.robot.tabletop.pretrain import pretrain_rng, pretrain_scene, read_pretrain_pool
from prismatic.io import sha256_file

JOBS = [("goal", 5), ("long", 1)]  # a push task and a press-then-place task


def small(out_dir, **kw) -> GenerateConfig:
    base = dict(out_dir=out_dir, suites=["goal", "long"], task_ids=[1], demos_per_task=3, pretrain_scenes=12,
                workers=1)
    base.update(kw)
    return GenerateConfig(**base)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("tt") / "data"
    cfg = small(out, suites=["goal"], task_ids=[5])
    manifest = main(cfg, log=lambda *_: None)
    main(small(out / "more", suites=["long"], task_ids=[1], pretrain_scenes=0), log=lambda *_: None)
    return out, manifest


def files(dataset):
    out, _ = dataset
    return [task_file(out, "goal", 5), task_file(out / "more", "long", 1)]


def test_demo_file_layout(dataset):
    for (suite, task_id), path in zip(JOBS, files(dataset)):
        assert path.name == get_task(suite, task_id).name + "_demo.hdf5" and path.parent.name == suite
        with h5py.File(path, "r") as f:
            data = f["data"]
            info = json.loads(data.attrs["problem_info"])
            assert info["language_instruction"] == get_task(suite, task_id).instruction
            assert bool(data.attrs["mergevla_images_upright"]) is True and bool(data.attrs["mergevla_keep_noops"]) is True
            assert sorted(data) == ["demo_0", "demo_1", "demo_2"]
            assert data.attrs["total"] == sum(data[d].attrs["num_samples"] for d in data)
            for d in data.values():
                t = d.attrs["num_samples"]
                obs = d["obs"]
                for cam in ("agentview_rgb", "eye_in_hand_rgb"):
                    assert obs[cam].shape == (t, 64, 64, 3) and obs[cam].dtype == np.uint8
                shapes = {"ee_states": 6, "ee_pos": 3, "ee_ori": 3, "gripper_states": 2, "joint_states": 3}
                for k, n in shapes.items():
                    assert obs[k].shape == (t, n) and obs[k].dtype == np.float64, k
                a = d["actions"][()]
                assert a.shape == (t, 7) and a.dtype == np.float64
                assert set(np.unique(a[:, 6])) <= {-1.0, 1.0} and np.abs(a[:, :3]).max() <= 1.0
                assert not a[:, 3:6].any()
                ee = obs["ee_states"][()]
                np.testing.assert_array_equal(ee[:, :3], obs["ee_pos"][()])
                np.testing.assert_allclose(ee[:, 3:], np.tile([np.pi, 0.0, 0.0], (t, 1)))
                g = obs["gripper_states"][()]
                np.testing.assert_array_equal(g[:, 0], -g[:, 1])
                assert d["dones"][()].tolist() == [0] * (t - 1) + [1]


def test_recorded_episodes_replay_exactly(dataset):
    for (suite, task_id), path in zip(JOBS, files(dataset)):
        demos = read_task_file(path)["demos"]
        for d in demos:
            init = SceneState.from_dict(json.loads(d["attrs"]["init_state"]))
            env = TableTopEnv(get_task(suite, task_id), init)
            obs = env.reset()
            t = len(d["actions"])
            for i, a in enumerate(d["actions"]):
                np.testing.assert_array_equal(obs["agentview_image"], d["obs/agentview_rgb"][i])
                np.testing.assert_array_equal(obs["robot0_eye_in_hand_image"], d["obs/eye_in_hand_rgb"][i])
                np.testing.assert_array_equal(env.state.vector(), d["states"][i])
                obs, _, done, _ = env.step(a)
                assert done is (i == t - 1)


def test_noise_free_demos_keep_the_steps_that_wait_for_the_fingers(tmp_path):
    """A scripted grasp holds still while the fingers close; the release's no-op filter, meant for teleoperators'
    idle steps, would drop that step and leave a demo whose replay lets go of the object."""
    from prismatic.vla.datasets.episodes import noop_keep_mask
    from prismatic.vla.datasets.hdf5 import KEEP_NOOPS_ATTR, read_hdf5_file

    main(small(tmp_path / "d", suites=["goal"], task_ids=[0], noise=0.0, pretrain_scenes=0), log=lambda *_: None)
    path = task_file(tmp_path / "d", "goal", 0)
    demos = read_task_file(path)["demos"]
    assert all(not noop_keep_mask(d["actions"]).all() for d in demos)  # each has a step the filter would drop
    episodes = read_hdf5_file(path, filter_noops=True, preload=True)
    assert [len(e.actions) for e in episodes] == [len(d["actions"]) for d in demos]
    for d in demos:  # and the kept actions are what solves the task
        env = TableTopEnv(get_task("goal", 0), SceneState.from_dict(json.loads(d["attrs"]["init_state"])))
        env.reset()
        assert [env.step(a)[2] for a in d["actions"]][-1] is True
    with h5py.File(path, "r+") as f:  # a file without the mark (LIBERO's own) is filtered as the release did
        del f["data"].attrs[KEEP_NOOPS_ATTR]
    lengths = [len(e.actions) for e in read_hdf5_file(path, filter_noops=True, preload=True)]
    assert lengths == [int(noop_keep_mask(d["actions"]).sum()) for d in demos]


def test_manifest_hashes_and_byte_identical_regeneration(dataset, tmp_path):
    out, manifest = dataset
    for rel, st in manifest["files"].items():
        assert sha256_file(out / rel) == st["sha256"]
        assert st.get("failures", 0) == 0
    assert json.loads((out / MANIFEST).read_text())["files"] == manifest["files"]
    again = main(small(tmp_path / "b", suites=["goal"], task_ids=[5], workers=2), log=lambda *_: None)
    assert again["files"] == manifest["files"]  # the worker pool changes nothing
    other = main(small(tmp_path / "c", suites=["goal"], task_ids=[5], seed=1), log=lambda *_: None)
    for rel in manifest["files"]:
        assert other["files"][rel]["sha256"] != manifest["files"][rel]["sha256"]


def test_refuses_to_write_into_a_non_empty_dir(tmp_path):
    out = tmp_path / "d"
    main(small(out, pretrain_scenes=0), log=lambda *_: None)
    path = task_file(out, "goal", 1)
    before = sha256_file(path)
    with pytest.raises(FileExistsError, match="not empty.*--overwrite true"):
        main(small(out, pretrain_scenes=0, seed=3), log=lambda *_: None)
    assert sha256_file(path) == before
    main(small(out, pretrain_scenes=0, seed=3, overwrite=True), log=lambda *_: None)
    assert sha256_file(path) != before
    # an overwrite replaces the dataset whole: training reads every file of a suite's directory
    main(small(out, suites=["goal"], task_ids=[2], pretrain_scenes=0, overwrite=True), log=lambda *_: None)
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*.hdf5"))
    assert left == [str(task_file(out, "goal", 2).relative_to(out))]
    assert sorted(json.loads((out / MANIFEST).read_text())["files"]) == left


def test_a_failed_generation_leaves_nothing_and_can_be_rerun(tmp_path, monkeypatch):
    import experiments.robot.tabletop.generate as generate

    def fail(*_a, **_k):
        raise RuntimeError("expert failed")

    out = tmp_path / "d"
    monkeypatch.setattr(generate, "generate_task", fail)
    with pytest.raises(RuntimeError, match="expert failed"):
        main(small(out), log=lambda *_: None)
    assert not out.exists()
    out.mkdir()  # a directory that was there before is left alone
    with pytest.raises(RuntimeError, match="expert failed"):
        main(small(out), log=lambda *_: None)
    assert out.is_dir() and not any(out.iterdir())
    monkeypatch.undo()
    manifest = main(small(out, pretrain_scenes=0), log=lambda *_: None)
    assert len(manifest["files"]) == 2
    # an overwrite that dies halfway: the old manifest must not vouch for files it may no longer describe
    monkeypatch.setattr(generate, "generate_task", fail)
    with pytest.raises(RuntimeError, match="expert failed"):
        main(small(out, pretrain_scenes=0, seed=3, overwrite=True), log=lambda *_: None)
    assert not (out / MANIFEST).exists()


@pytest.mark.parametrize("field,value,match", [
    ("suites", ["goal", "libero_goal"], r"suites: unknown TableTop-4 suite\(s\) \['libero_goal'\]"),
    ("suites", [], "suites is empty"),
    ("demos_per_task", 0, "demos_per_task must be >= 1"),
    ("task_ids", [10], r"task_ids \[10\] out of range"),
    ("compression", "zip", "compression must be gzip, lzf or none"),
    ("noise", float("nan"), "noise must be a finite number >= 0, got nan"),
    ("seed", -1, "seed must be >= 0, got -1"),
    ("suites", ["goal", "goal"], r"suites lists a suite twice: \['goal', 'goal'\]"),
    ("image_size", 7, "image_size must be >= 8, got 7"),
    ("supersample", 0, "supersample must be >= 1, got 0"),
    ("workers", 0, "workers must be >= 1, got 0"),
    ("texts_per_scene", 0, "texts_per_scene must be >= 1, got 0"),
    ("noise", float("inf"), "noise must be a finite number >= 0, got inf"),
    ("task_ids", [-1], r"task_ids \[-1\] out of range for suite 'goal' \(0..9\)"),
    ("task_ids", [], "task_ids is empty; give some task ids, or leave it unset for every task"),
    ("task_ids", [1, 1], r"task_ids lists a task twice: \[1, 1\]"),
])
def test_bad_config_fails_before_writing(tmp_path, monkeypatch, field, value, match):
    import experiments.robot.tabletop.generate as generate

    def no_work(*_a, **_k):  # a bad setting is reported before any demo or pool is made
        raise AssertionError("generation started")

    monkeypatch.setattr(generate, "generate_task", no_work)
    monkeypatch.setattr(generate, "write_pretrain_pool", no_work)
    cfg = small(tmp_path / "x", **{field: value})
    with pytest.raises(ValueError, match=match):
        main(cfg, log=lambda *_: None)
    assert not (tmp_path / "x").exists()


def test_cli_reports_bad_input_with_nonzero_exit(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.robot.tabletop.generate", "--out_dir", str(tmp_path / "y"),
         "--suites", "[spatial,nope]"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert "unknown TableTop-4 suite(s) ['nope']" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "y").exists()


def test_pretrain_pool(dataset):
    out, _ = dataset
    pool = read_pretrain_pool(out / PRETRAIN_FILE)
    n = pool["attrs"]["num_scenes"]
    assert n == 12 and pool["images"].shape == (12, 2, 64, 64, 3) and pool["images"].dtype == np.uint8
    assert len(pool["prompts"]) == len(pool["targets"]) == len(pool["kinds"]) == len(pool["scene"])
    assert set(pool["scene"].tolist()) == set(range(n))
    assert set(pool["kinds"]) <= {"qa", "caption"}
    for text in pool["prompts"] + pool["targets"]:
        assert unknown_words(text) == [], text
    seed = pool["attrs"]["seed"]
    counted = 0
    for prompt, target, i in zip(pool["prompts"], pool["targets"], pool["scene"]):
        s = pretrain_scene(pretrain_rng(seed, int(i)))
        objects = [b for b in s.bodies if b.spec.movable]
        if prompt == "how many objects are there ?":
            assert target == NUMBERS[len(objects)]
            counted += 1
        if prompt == "what is in the gripper ?":
            assert target == (f"the {s.body(s.held).label}" if s.held else "no object")
    assert counted > 0


def test_pretraining_scenes_never_put_closed_fingers_inside_an_object():
    for i in range(400):  # scene 155 of seed 0 once had (partly) closed fingers inside an object
        s = pretrain_scene(pretrain_rng(0, i))
        if s.finger >= 0.04:
            continue  # open fingers straddle objects
        for b in s.bodies:
            near = np.hypot(*(s.gripper_pos[:2] - b.pos[:2])) < max(b.spec.half) + 0.014
            assert not (b.spec.movable and b.name != s.held and near and b.pos[2] <= s.gripper_pos[2] < b.top), i


def test_pretraining_scenes_cover_what_the_pool_promises():
    # 1-3 fixtures, 1-4 objects, objects stacked on a cube or cylinder standing on the table, stoves on and off,
    # and now and then an object held up in the gripper
    fixtures, objects, stoves, stacked, held = set(), set(), set(), 0, 0
    for i in range(200):
        s = pretrain_scene(pretrain_rng(0, i))
        by_name = {b.name: b for b in s.bodies}
        fixtures.add(sum(not b.spec.movable for b in s.bodies))
        objects.add(sum(b.spec.movable for b in s.bodies))
        stoves |= {b.on for b in s.bodies if b.kind == "stove"}
        for b in s.bodies:
            under = by_name.get(b.support)
            if under is not None and under.spec.movable:
                stacked += 1
                assert under.kind in ("cube", "cylinder") and under.support == "" and under.name != s.held, i
        if s.held:
            held += 1
            b = by_name[s.held]
            assert b.support == "" and not any(c.support == b.name for c in s.bodies), i  # nothing rides on it
            assert s.gripper_pos[2] >= 0.12 and s.finger == b.spec.half[0], i
            assert np.allclose(b.pos, s.gripper_pos - (0.0, 0.0, 0.5 * b.spec.height)), i  # below the fingers
    assert fixtures == {1, 2, 3} and objects == {1, 2, 3, 4} and stoves == {False, True}
    assert stacked > 0 and held > 0


def test_a_pool_holds_each_seeded_scene_its_two_renders_and_its_texts(tmp_path):
    from experiments.robot.tabletop.language import scene_texts
    from experiments.robot.tabletop.pretrain import write_pretrain_pool
    from experiments.robot.tabletop.render import AgentView, WristView

    path = tmp_path / "pool.hdf5"
    assert write_pretrain_pool(path, 3, seed=5, texts_per_scene=3) == {"scenes": 3, "texts": 9}
    pool = read_pretrain_pool(path)
    assert pool["attrs"]["cameras"] == ["agentview", "eye_in_hand"] and pool["attrs"]["mergevla_images_upright"] is True
    for i in range(3):
        rng = pretrain_rng(5, i)  # one stream per scene: its layout, then its texts
        s = pretrain_scene(rng)
        assert np.array_equal(pool["images"][i, 0], AgentView(64).render(s, 2))
        assert np.array_equal(pool["images"][i, 1], WristView(64).render(s, 2))
        texts = [(k, p, t) for k, p, t, j in zip(pool["kinds"], pool["prompts"], pool["targets"], pool["scene"]) if j == i]
        assert texts == scene_texts(s, rng, 3)
    # the seed and the scene index are not interchangeable: pool 1's first scene is not pool 0's second
    assert pretrain_rng(0, 1).random() != pretrain_rng(1, 0).random()


def test_reading_a_foreign_file_is_a_clear_error(tmp_path):
    path = tmp_path / "other.hdf5"
    with h5py.File(path, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(ValueError, match="not a LIBERO-layout demo file"):
        read_task_file(path)
    with pytest.raises(ValueError, match="not a TableTop-4 pretraining pool"):
        read_pretrain_pool(path)


def test_every_task_of_every_suite_by_default():
    from experiments.robot.tabletop.generate import validate

    assert validate(GenerateConfig(suites=["long", "goal"])) == [(s, i) for s in ("long", "goal") for i in range(10)]
    assert validate(GenerateConfig(suites=["goal"], task_ids=[7, 2])) == [("goal", 7), ("goal", 2)]
    assert GenerateConfig().demos_per_task == 50  # the module's usage: all 4 suites x 10 tasks x 50 demos


def test_the_expert_gets_at_most_max_failures_misses_per_task():
    from experiments.robot.tabletop.demos import MAX_FAILURES, DemoFailure, first_successes

    tried = []
    with pytest.raises(DemoFailure, match=r"goal task 3: the scripted expert failed too often \(21 "
                                          r"times, after 0 successes\) with action noise 0.5"):
        first_successes("goal", 3, 1, lambda i: tried.append(i), noise=0.5)
    assert MAX_FAILURES == 20 and tried == list(range(21))
    assert first_successes("goal", 3, 0, lambda i: tried.append(i), noise=0.1) == [] and len(tried) == 21
    # exactly MAX_FAILURES misses are still fine; results come in scene order, skipping the misses
    late = first_successes("goal", 3, 2, lambda i: f"s{i}" if i >= MAX_FAILURES else None, noise=0.1)
    assert late == [(MAX_FAILURES, f"s{MAX_FAILURES}"), (MAX_FAILURES + 1, f"s{MAX_FAILURES + 1}")]
    assert first_successes("goal", 3, 3, lambda i: i if i % 2 == 0 else None, noise=0.1) == [(0, 0), (2, 2), (4, 4)]


def test_a_scene_the_expert_fails_is_skipped_and_recorded_as_skipped(tmp_path, monkeypatch):
    import dataclasses

    import experiments.robot.tabletop.demos as demos

    real, calls = demos.record_episode, []

    def fail_second(env, expert):  # the expert times out (after 9 steps) in demo scene 1
        calls.append(1)
        return (None, 9) if len(calls) == 2 else real(env, expert)

    monkeypatch.setattr(demos, "record_episode", fail_second)
    episodes, stats = demos.generate_task("goal", 0, 3, seed=0)
    lengths = [len(e.actions) for e in episodes]
    assert [e.scene_index for e in episodes] == [0, 2, 3]
    assert stats == {"demos": 3, "attempts": 4, "failures": 1, "env_steps": sum(lengths) + 9,
                     "mean_length": float(np.mean(lengths)), "max_length": max(lengths)}
    # 11 demos: read back in index order (demo_10 after demo_9), each with its own scene index and length
    many = [dataclasses.replace(episodes[k % 3], scene_index=3 * k + 1) for k in range(11)]
    path = tmp_path / "t.hdf5"
    demos.write_task_file(path, "goal", 0, many, seed=0, noise=0.1, image_size=64, supersample=2)
    got = read_task_file(path)
    assert [d["attrs"]["scene_index"] for d in got["demos"]] == [3 * k + 1 for k in range(11)]
    assert [len(d["actions"]) for d in got["demos"]] == [lengths[k % 3] for k in range(11)]
    assert (got["attrs"]["num_demos"], got["attrs"]["total"]) == (11, sum(lengths[k % 3] for k in range(11)))


def test_an_episode_that_succeeds_on_its_last_allowed_step_is_kept():
    from experiments.robot.tabletop.demos import record_episode
    from experiments.robot.tabletop.env import make_env
    from experiments.robot.tabletop.expert import ScriptedExpert

    env = make_env("goal", 0, 3)
    env.reset()
    expert, n, done = ScriptedExpert(noise=0.0), 0, False
    while not done:  # how long the noise-free expert takes from this scene
        done, n = env.step(expert.act(env.state))[2], n + 1

    class Late:  # holds still (fingers open) first, so that the goal is reached on step `pad + n`
        def __init__(self, pad):
            self.pad, self.inner = pad, ScriptedExpert(noise=0.0)

        def reset(self):
            self.inner.reset()

        def act(self, state):
            self.pad -= 1
            return np.array([0, 0, 0, 0, 0, 0, -1.0]) if self.pad >= 0 else self.inner.act(state)

    ep, steps = record_episode(env, Late(env.max_steps - n))
    assert ep is not None and len(ep.actions) == steps == env.max_steps
    assert record_episode(env, Late(env.max_steps - n + 1)) == (None, env.max_steps)


def test_the_expert_noise_has_its_own_stream_per_demo_scene():
    from experiments.robot.tabletop.demos import noise_rng
    from experiments.robot.tabletop.suites import SEED_DOMAIN, SPLIT_DEMO, SUITE_NAMES

    def draws(rng):
        return rng.random(4).tolist()

    # stream 3 over (seed, suite, task, scene): what every recorded demo's noise was drawn from
    spec = [SEED_DOMAIN, 3, 5, SUITE_NAMES.index("goal"), 2, 4]
    assert draws(noise_rng("goal", 2, 5, 4)) == draws(np.random.default_rng(np.random.SeedSequence(spec)))
    base = draws(noise_rng("goal", 2, 5, 4))
    others = [noise_rng("long", 2, 5, 4), noise_rng("goal", 3, 5, 4), noise_rng("goal", 2, 6, 4),
              noise_rng("goal", 2, 5, 5), noise_rng("goal", 4, 5, 2)]  # the last: task and scene swapped
    assert all(draws(r) != base for r in others)
    # never the stream the same scene's layout was drawn from
    layout = np.random.default_rng(np.random.SeedSequence([SEED_DOMAIN, SPLIT_DEMO, 5, SUITE_NAMES.index("goal"), 2, 4]))
    assert draws(layout) != base


def _episode(t: int, seed: int = 0):
    from experiments.robot.tabletop.demos import Episode
    from experiments.robot.tabletop.suites import demo_scene

    rng = np.random.default_rng(seed)
    init = demo_scene("goal", 2, 7, 4)
    return Episode(4, init, rng.integers(0, 256, (t, 8, 8, 3), dtype=np.uint8),
                   rng.integers(0, 256, (t, 8, 8, 3), dtype=np.uint8), rng.uniform(-1, 1, (t, 3)),
                   np.tile([0.02, -0.02], (t, 1)), rng.uniform(-1, 1, (t, len(init.vector()))),
                   np.concatenate([rng.uniform(-1, 1, (t, 3)), np.zeros((t, 3)), np.ones((t, 1))], axis=1))


@pytest.mark.parametrize("compression,filters", [("gzip", ("gzip", 1)), ("lzf", ("lzf", None)), ("none", (None, None))])
def test_a_task_file_holds_its_task_settings_and_arrays(tmp_path, compression, filters):
    from experiments.robot.tabletop.demos import write_task_file
    from experiments.robot.tabletop.physics import MAX_DELTA, PHYSICS_VERSION

    ep = _episode(3)
    path = tmp_path / "t.hdf5"
    write_task_file(path, "goal", 2, [ep], seed=7, noise=0.25, image_size=8, supersample=3, compression=compression)
    got = read_task_file(path)
    task = get_task("goal", 2)
    assert got["instruction"] == task.instruction == "put the blue ball in the bowl"
    assert got["problem_info"] == {"language_instruction": task.instruction, "problem_name": "tabletop_goal",
                                   "domain_name": "tabletop4", "suite": "goal", "task_id": 2, "task_name": task.name}
    attrs = got["attrs"]
    assert json.loads(attrs.pop("env_args")) == {"env_name": "TableTop4", "suite": "goal", "task_id": 2,
                                                 "image_size": 8, "supersample": 3, "max_steps": 64,
                                                 "action_scale_m": MAX_DELTA}
    del attrs["problem_info"]
    assert attrs == {"mergevla_images_upright": True, "mergevla_keep_noops": True, "total": 3, "num_demos": 1,
                     "tabletop_version": 1, "physics_version": PHYSICS_VERSION, "seed": 7, "noise": 0.25}
    (d,) = got["demos"]
    init = json.loads(d["attrs"].pop("init_state"))
    assert init == ep.init.to_dict() and SceneState.from_dict(init).vector().tolist() == ep.init.vector().tolist()
    assert d["attrs"] == {"num_samples": 3, "scene_index": 4} and all(type(v) is int for v in d["attrs"].values())
    ori = np.tile([np.pi, 0.0, 0.0], (3, 1))
    want = {"actions": ep.actions, "states": ep.states.astype(np.float32), "rewards": [0, 0, 1], "dones": [0, 0, 1],
            "obs/agentview_rgb": ep.agentview, "obs/eye_in_hand_rgb": ep.wrist, "obs/ee_pos": ep.ee_pos,
            "obs/ee_ori": ori, "obs/ee_states": np.concatenate([ep.ee_pos, ori], axis=1),
            "obs/gripper_states": ep.gripper, "obs/joint_states": ep.ee_pos}
    assert sorted(d) == sorted([*want, "attrs"])
    for k, v in want.items():
        np.testing.assert_array_equal(d[k], v, err_msg=k)
    assert (d["states"].dtype, d["rewards"].dtype, d["dones"].dtype) == (np.float32, np.uint8, np.uint8)
    with h5py.File(path, "r") as f:
        obs = f["data/demo_0/obs"]  # links listed in the order they were written, as in the layout's docstring
        assert list(obs) == ["agentview_rgb", "eye_in_hand_rgb", "ee_pos", "ee_ori", "ee_states", "gripper_states",
                             "joint_states"]
        for name in ("agentview_rgb", "eye_in_hand_rgb"):  # only the images are compressed
            assert (obs[name].compression, obs[name].compression_opts) == filters, name
        for ds in (obs["ee_pos"], f["data/demo_0/actions"], f["data/demo_0/states"]):
            assert ds.compression is None


def test_attrs_read_back_as_plain_python_values(tmp_path):
    from experiments.robot.tabletop.demos import attrs_dict

    with h5py.File(tmp_path / "a.hdf5", "w") as f:
        f.attrs["name"] = np.bytes_(b"goal")  # fixed-length strings (as LIBERO's files hold them) read as bytes
        f.attrs["names"] = np.array([b"ab", b"cd"])
        f.attrs["n"] = np.int64(3)
        f.attrs["xs"] = np.array([1.5, 2.0])
        f.attrs["text"] = "plain"
        got = attrs_dict(f.attrs)
    assert got == {"name": "goal", "names": ["ab", "cd"], "n": 3, "xs": [1.5, 2.0], "text": "plain"}
    assert type(got["name"]) is str and all(type(x) is str for x in got["names"]) and type(got["n"]) is int


def test_an_overwrite_without_a_pool_removes_the_old_pool(tmp_path):
    out = tmp_path / "d"
    main(small(out, suites=["goal"], demos_per_task=1, pretrain_scenes=2), log=lambda *_: None)
    assert (out / PRETRAIN_FILE).is_file()
    manifest = main(small(out, suites=["goal"], demos_per_task=1, pretrain_scenes=0, overwrite=True), log=lambda *_: None)
    assert not (out / PRETRAIN_FILE).exists() and str(PRETRAIN_FILE) not in manifest["files"]


def test_every_setting_reaches_the_files_and_the_log(tmp_path):
    import re

    from experiments.robot.tabletop.pretrain import pool_identity, pool_mismatches

    out, logs = tmp_path / "d", []
    cfg = small(out, suites=["goal", "long"], task_ids=[1], demos_per_task=1, pretrain_scenes=2, workers=2,
                compression="lzf", seed=3, supersample=1, texts_per_scene=2, noise=0.05)
    manifest = main(cfg, log=logs.append)
    assert manifest["config"] == {"out_dir": str(out), "suites": ["goal", "long"], "task_ids": [1], "demos_per_task": 1,
                                  "image_size": 64, "supersample": 1, "seed": 3, "noise": 0.05, "workers": 2,
                                  "pretrain_scenes": 2, "texts_per_scene": 2, "compression": "lzf", "overwrite": False}
    for suite in ("goal", "long"):
        with h5py.File(task_file(out, suite, 1), "r") as f:
            data = f["data"]
            assert (data.attrs["seed"], data.attrs["noise"]) == (3, 0.05)
            assert json.loads(data.attrs["env_args"])["supersample"] == 1
            assert data["demo_0/obs/agentview_rgb"].compression == "lzf"
    assert pool_mismatches(out / PRETRAIN_FILE, pool_identity(2, 3, 64, 1, 2)) == []
    with h5py.File(out / PRETRAIN_FILE, "r") as f:
        assert f["images"].compression == "lzf"
    files = manifest["files"]
    goal, long = (files[str(task_file(out, s, 1).relative_to(out))] for s in ("goal", "long"))
    # with a worker pool: one line per task as it finishes, in job order, then the total
    assert re.fullmatch(r"\[tabletop\] goal     task 1: 1 demos \(0 expert failures\), mean length "
                        rf"{goal['mean_length']:.1f}, \d+\.\ds", logs[0]), logs[0]
    assert logs[1].startswith("[tabletop] long     task 1: 1 demos (0 expert failures)") and len(logs) == 3
    assert re.fullmatch(rf"\[tabletop\] wrote 2 demos of 2 tasks \({goal['env_steps'] + long['env_steps']} expert env "
                        rf"steps\) and 2 pretraining scenes to {re.escape(str(out))} in \d+\.\ds with 2 worker\(s\)",
                        logs[2]), logs[2]


def test_cli_reports_a_failing_expert_in_one_line(tmp_path, monkeypatch, capsys):
    import experiments.robot.tabletop.generate as generate
    from experiments.robot.tabletop.demos import DemoFailure

    def fail(*_a, **_k):
        raise DemoFailure("goal task 1: the scripted expert failed too often")

    monkeypatch.setattr(generate, "generate_task", fail)
    monkeypatch.setattr(sys, "argv", ["generate", "--out_dir", str(tmp_path / "z"), "--suites", "[goal]",
                                      "--task_ids", "[1]", "--pretrain_scenes", "0", "--workers", "1"])
    assert generate.cli() == 2
    assert capsys.readouterr().err == "tabletop generate: error: goal task 1: the scripted expert failed too often\n"
    assert not (tmp_path / "z").exists()
