"""The benchmark scripts: their argument checks and what they compute from the times they measure. Clocks,
simulators, models and child processes are replaced by fakes with known costs, so every printed rate can be
computed by hand."""

import dataclasses
import re
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import benchmarks.eval_throughput as et
import benchmarks.merge_speed as ms
import benchmarks.tabletop_speed as ts
import benchmarks.train_throughput as tt


class Clock:
    """Stands in for a benchmark module's `time`: perf_counter reads `now`, which the fakes advance."""

    def __init__(self, ticks=None):
        self.now, self.ticks = 0.0, iter(ticks) if ticks is not None else None

    def perf_counter(self):
        return next(self.ticks) if self.ticks is not None else self.now


def no_run(*_a, **_k):  # stands in for a benchmark's work where a bad setting must stop it first
    raise AssertionError("the benchmark ran")


@pytest.fixture
def torch_state():
    threads, grad = torch.get_num_threads(), torch.is_grad_enabled()
    yield
    torch.set_num_threads(threads)
    torch.set_grad_enabled(grad)


# ---- tabletop_speed -----------------------------------------------------------------------------------------------


class FakeTableTop:
    """observe costs 2 ms, a step 1 ms; an episode from init state 0 reaches its goal on step 3, others never."""

    def __init__(self, clock, made, actions, suite, task_id, init, **kw):
        self.clock, self.actions, self.init, self.n, self.state = clock, actions, init, 0, "state"
        made.append((suite, task_id, init, kw))

    def reset(self):
        self.n = 0

    def observe(self):
        self.clock.now += 0.002

    def step(self, a):
        self.clock.now += 0.001
        self.n += 1
        self.actions.append(np.asarray(a))
        return None, 0.0, self.init == 0 and self.n == 3, {}


@pytest.fixture
def fake_tabletop(monkeypatch):
    clock, made, actions = Clock(), [], []
    monkeypatch.setattr(ts, "time", clock)
    monkeypatch.setattr(ts, "make_env", lambda *a, **kw: FakeTableTop(clock, made, actions, *a, **kw))

    class Expert:
        def __init__(self, noise, rng):
            assert noise == 0.1

        def act(self, state):
            assert state == "state"
            return np.full(7, 0.5)

    monkeypatch.setattr(ts, "ScriptedExpert", Expert)
    return made, actions


def test_tabletop_speed_times_a_frame_pair_and_counts_steps_per_second(fake_tabletop):
    made, actions = fake_tabletop
    assert ts.time_render(32, 3, repeats=4) == pytest.approx(0.002)  # per frame pair, not per repeat loop
    assert made == [("long", 0, 0, {"image_size": 32, "supersample": 3})]
    made.clear()
    # init states 0, 1, 2 …: the first episode ends after 3 steps, the next runs to its task's max_steps
    assert ts.steps_per_second(False, 5, 0, "expert") == pytest.approx(1000.0)  # 1 ms per step
    assert [m[:3] for m in made] == [("spatial", 0, 0), ("object", 1, 1)]
    assert all(m[3] == {"render": False} for m in made)
    assert all((a == 0.5).all() for a in actions)  # the expert's actions
    made.clear()
    actions.clear()
    assert ts.steps_per_second(True, 3, 0, "random") == pytest.approx(1000.0)
    assert made == [("spatial", 0, 0, {"render": True})] and len(actions) == 3
    assert not any((a == 0.5).all() for a in actions) and all(np.abs(a).max() <= 1 for a in actions)


def test_tabletop_speed_expert_success_is_a_fraction_of_every_episode_of_a_suite(fake_tabletop):
    made, _ = fake_tabletop
    got = ts.expert_success(2)  # init state 0 of each of the 10 tasks succeeds in 3 steps, init state 1 never
    assert got == {suite: (0.5, 3.0) for suite in ("spatial", "object", "goal", "long")}
    assert len(made) == 4 * 10 * 2 and all(m[3] == {"render": False} for m in made)


def test_tabletop_speed_prints_what_it_measured(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(ts, "time_render", lambda size, ss, repeats: 0.0015 * ss)
    monkeypatch.setattr(ts, "steps_per_second", lambda render, steps, seed, policy: 1000.0 if render else 4000.0)
    monkeypatch.setattr(ts, "expert_success", lambda n: {"goal": (0.95, 20.25)})
    gens = []

    def generate(gen, log):
        gens.append(gen)
        (Path(gen.out_dir) / "goal").mkdir(parents=True)
        (Path(gen.out_dir) / "goal" / "a_demo.hdf5").write_bytes(b"x" * 12 * 2**20)
        return {"files": {"goal/a_demo.hdf5": {"demos": 2, "env_steps": 50},
                          "long/b_demo.hdf5": {"demos": 3, "env_steps": 70},
                          "pretrain/tabletop4_pretrain.hdf5": {"scenes": 4, "texts": 8}}}

    monkeypatch.setattr(ts, "generate", generate)
    ts.main(ts.SpeedConfig(image_sizes=[32], expert_episodes=2, demos_per_task=5, pretrain_scenes=4, workers=3, seed=9,
                           out_dir=tmp_path / "data"))
    out = capsys.readouterr().out
    assert "    32 px, supersample 1: 1.500 ms per frame pair\n    32 px, supersample 2: 3.000 ms per frame pair" in out
    assert "  physics only  expert policy:     4000 steps/s\n  physics only  random policy:     4000 steps/s\n" in out
    assert "  with cameras  expert policy:     1000 steps/s\n" in out
    assert "scripted expert (noise 0.1), 2 init states x 10 tasks per suite:\n  goal     success  95.0%   mean episode " \
           "length  20.2 steps" in out
    assert re.search(r"generation: 5 demos \(120 env steps\) \+ 4 pretraining scenes, 3 workers: [\d.]+ s, 12 MiB on disk",
                     out), out
    (gen,) = gens
    assert (gen.out_dir, gen.demos_per_task, gen.pretrain_scenes, gen.workers, gen.seed) == (tmp_path / "data", 5, 4, 3, 9)
    # 0 skips the expert table and the generation
    gens.clear()
    ts.main(ts.SpeedConfig(image_sizes=[], expert_episodes=0, demos_per_task=0))
    out = capsys.readouterr().out
    assert "scripted expert" not in out and "generation" not in out and not gens


@pytest.mark.parametrize("field,value", [("render_repeats", 0), ("steps", 0), ("workers", 0), ("expert_episodes", -1),
                                         ("demos_per_task", -1), ("pretrain_scenes", -1)])
def test_tabletop_speed_names_a_bad_count(monkeypatch, field, value):
    monkeypatch.setattr(ts, "time_render", no_run)
    with pytest.raises(ValueError, match=rf"--{field} is {value}, expected >= {0 if value < 0 else 1}"):
        ts.main(ts.SpeedConfig(**{field: value}))


# ---- eval_throughput ----------------------------------------------------------------------------------------------


def test_eval_throughput_step_rate_is_steps_per_second_of_the_chosen_renderer(monkeypatch):
    import experiments.robot.libero.env as libero_env

    clock, built = Clock(), []

    class Env:
        def reset(self):
            clock.now += 100.0  # not timed

        def step(self, a):
            assert list(a) == [0, 0, 0, 0, 0, 0, -1.0]  # a no-op with the gripper open
            clock.now += 0.25

    class Factory:
        def __init__(self, res, fast_render):
            built.append([res, fast_render, False])

        def __call__(self, suite, task_id, init):
            built[-1].append((suite, task_id, init))
            return Env()

        def close(self):
            built[-1][2] = True

    monkeypatch.setattr(et, "time", clock)
    monkeypatch.setattr(libero_env, "LiberoEnvFactory", Factory)
    cfg = et.ThroughputConfig(suite="libero_goal", task_id=3, env_img_res=128, step_rate_steps=6)
    assert et.step_rate(cfg, fast=True) == pytest.approx(4.0)
    assert built == [[128, True, True, ("libero_goal", 3, 0)]]


def test_eval_throughput_reports_episodes_per_hour_and_the_speed_up(monkeypatch, capsys, tmp_path):
    import experiments.robot.libero.run_libero_eval as run_libero_eval

    clock, gens = Clock(), []

    def run_eval(gen):  # 36 s with 1 env, 18 s with 2
        gens.append(gen)
        clock.now += 36.0 / gen.num_envs
        return [{"steps": 30}, {"steps": 40}]

    monkeypatch.setattr(et, "time", clock)
    monkeypatch.setattr(et, "tiny_checkpoint", lambda d: d / "tiny")
    monkeypatch.setattr(et, "step_rate", lambda cfg, fast: 5.0 if fast else 2.0)
    monkeypatch.setattr(run_libero_eval, "main", run_eval)
    cfg = et.ThroughputConfig(suite="libero_object", task_id=2, episodes=2, max_steps=16, num_envs=[1, 2],
                              env_img_res=128, fast_render=False, step_rate_steps=3, seed=11)
    assert et.main(cfg) == {1: pytest.approx(200.0), 2: pytest.approx(400.0)}
    out = capsys.readouterr().out
    assert "env.step at 128 px, default renderer: 2.00 steps/s\nenv.step at 128 px, fast renderer: 5.00 steps/s\n" in out
    wait = gens[0].num_steps_wait  # each episode also spends its no-op settling steps
    assert f"== 1 env(s): 2 episodes in 36.0s → 200.0 episodes/hour, {(70 + 2 * wait) / 36:.2f} env steps/s" in out
    assert f"== 2 env(s): 2 episodes in 18.0s → 400.0 episodes/hour, {(70 + 2 * wait) / 18:.2f} env steps/s" in out
    assert "speed-up 2 vs 1 env(s): 2.00x" in out
    for n, gen in zip((1, 2), gens):
        assert (gen.num_envs, gen.task_suites, gen.task_ids, gen.num_trials_per_task, gen.max_steps) == \
               (n, ["libero_object"], [2], 2, 16)
        assert (gen.env_img_res, gen.fast_render, gen.seed, gen.device) == (128, False, 11, "cpu")
    # 0 skips the raw step rate
    monkeypatch.setattr(et, "step_rate", lambda cfg, fast: pytest.fail("step rate timed"))
    et.main(dataclasses.replace(cfg, num_envs=[2], step_rate_steps=0))
    assert "env.step" not in capsys.readouterr().out


@pytest.mark.parametrize("field,value,low", [("episodes", 0, 1), ("max_steps", 0, 1), ("env_img_res", 0, 1),
                                             ("task_id", -1, 0), ("step_rate_steps", -1, 0)])
def test_eval_throughput_names_a_bad_count(monkeypatch, field, value, low):
    monkeypatch.setattr(et, "step_rate", no_run)
    monkeypatch.setattr(et, "tiny_checkpoint", no_run)
    with pytest.raises(ValueError, match=rf"--{field} is {value}, expected >= {low}"):
        et.main(et.ThroughputConfig(**{field: value}))


def test_eval_throughput_names_bad_num_envs(monkeypatch):
    monkeypatch.setattr(et, "step_rate", no_run)
    monkeypatch.setattr(et, "tiny_checkpoint", no_run)
    for envs in ([], [2, 0]):
        with pytest.raises(ValueError, match=re.escape(f"--num_envs is {envs}, expected a non-empty list of counts")):
            et.main(et.ThroughputConfig(num_envs=envs))


# ---- train_throughput ---------------------------------------------------------------------------------------------


def test_train_throughput_measures_the_median_timed_step_after_warmup(monkeypatch, torch_state):
    # perf_counter: build 0 → 5 s, the warmup step's start (its end is never read), then the timed steps' (start, end):
    # 1 s and 3 s
    monkeypatch.setattr(tt, "time", Clock([0.0, 5.0, 5.0, 15.0, 16.0, 16.0, 19.0]))
    monkeypatch.setattr(tt, "resource", types.SimpleNamespace(
        RUSAGE_SELF=0, getrusage=lambda who: types.SimpleNamespace(ru_maxrss=3 * 2**19)))  # KiB: 1.5 GiB
    real, augmented = tt.augment_images, []

    def augment(pixels, cfg, gen):
        augmented.append(pixels.shape)
        return real(pixels, cfg, gen)

    monkeypatch.setattr(tt, "augment_images", augment)
    r = tt._measure("tiny", tt.ThroughputConfig(batch_size=2, warmup_steps=1, steps=2, device="cpu", cpu_threads=1))
    assert (r["build_s"], r["step_s"], r["samples_per_s"], r["peak_gib"]) == (5.0, 2.0, 1.0, 1.5)
    assert r["peak_kind"] == "process peak RSS"
    assert r["device"] == "cpu × 1 threads" == f"cpu × {torch.get_num_threads()} threads"
    assert r["config"] == "tiny" and 0 < r["params_trainable"] < r["params_total"]
    assert len(augmented) == 3 and augmented[0][0] == 2  # every step, warmup included, augments its batch


def test_train_throughput_prints_one_line_per_config_and_survives_a_failure(monkeypatch, capsys):
    import queue

    class Process:  # runs the child inline
        def __init__(self, target, args):
            self.target, self.args, self.exitcode = target, args, 0

        def start(self):
            if self.args[0] == "dies":
                self.exitcode = -9
            else:
                self.target(*self.args)

        def join(self):
            pass

    monkeypatch.setattr(tt.mp, "get_context", lambda kind: types.SimpleNamespace(Queue=queue.Queue, Process=Process))
    monkeypatch.setattr(tt, "get_config", lambda name: None)

    def measure(name, cfg):
        if name == "raises":
            raise RuntimeError("out of memory")
        return {"config": name, "device": "cpu × 2 threads", "params_total": 3e6, "params_trainable": 1.5e6,
                "build_s": 1.25, "step_s": 0.5, "samples_per_s": 8.0, "peak_gib": 1.5, "peak_kind": "process peak RSS"}

    monkeypatch.setattr(tt, "_measure", measure)
    tt.main(tt.ThroughputConfig(configs=["tiny", "raises", "dies"], batch_size=4, steps=3))
    out = capsys.readouterr().out
    assert "forward+backward, batch 4, random weights, median of 3 timed steps\n" in out
    assert "tiny                       cpu × 2 threads:     8.00 samples/s (0.500 s/step), peak 1.50 GiB (process peak " \
           "RSS), build 1.2 s, 1.5M trainable of 3.0M parameters\n" in out
    assert "raises: FAILED\n" in out and "RuntimeError: out of memory" in out
    assert "dies: FAILED\nprocess died with exit code -9 (killed: out of memory?)" in out


@pytest.mark.parametrize("field,value,low", [("batch_size", 0, 1), ("steps", 0, 1), ("warmup_steps", -1, 0),
                                             ("cpu_threads", -1, 0)])
def test_train_throughput_names_a_bad_count(monkeypatch, field, value, low):
    monkeypatch.setattr(tt.mp, "get_context", no_run)
    with pytest.raises(ValueError, match=rf"--{field} is {value}, expected >= {low}"):
        tt.main(tt.ThroughputConfig(**{field: value}))


def test_train_throughput_names_an_unknown_device(monkeypatch):
    monkeypatch.setattr(tt.mp, "get_context", no_run)
    for device in ("gpu", "cuda:0", "CUDA"):
        with pytest.raises(ValueError, match=f"--device is '{re.escape(device)}', expected auto, cpu or cuda"):
            tt.main(tt.ThroughputConfig(device=device))


def test_train_throughput_names_an_unknown_config_before_any_run(monkeypatch):
    monkeypatch.setattr(tt.mp, "get_context", no_run)
    with pytest.raises(ValueError, match="nope"):
        tt.main(tt.ThroughputConfig(configs=["tiny", "nope"]))


# ---- merge_speed --------------------------------------------------------------------------------------------------


def test_merge_speed_tabulates_each_algorithm_against_the_floor_and_one_model(monkeypatch, capsys, tmp_path):
    made, children = [], []

    def make_experts(cfg_name, m, seed, root):
        made.append((cfg_name, m, seed, root))
        out = []
        for i in range(m):  # 1 MiB and 3 MiB: 2 MiB per expert
            (root / f"e{i}").mkdir()
            (root / f"e{i}" / "w").write_bytes(b"x" * (2 * i + 1) * 2**20)
            out.append((f"task{i}", root / f"e{i}"))
        return out

    def in_child(fn, *args):
        children.append((fn.__name__, args))
        if fn is ms._floor_child:
            return {"wall": 2.0, "rss": 0.5, "rss_base": 0.25}
        if fn is ms._merge_child:
            return {"wall": 3.0, "rss": 1.5, "rss_base": 0.25, "bytes": 2**29}
        return {"alg_s_per_elem": 1e-9, "total_elems": 3e9, "subset": 3, "modules": 55, "rss": 0.75, "rss_base": 0.25}

    monkeypatch.setattr(ms, "_make_experts", make_experts)
    monkeypatch.setattr(ms, "_in_child", in_child)
    monkeypatch.setattr(ms, "_theta0_params", lambda model_cfg: 2**28)  # 1 GiB in fp32
    cfg = ms.BenchConfig(config_name="tiny", num_experts=2, algorithms=["dare", "wudi"], estimate=["dare"], masks=False,
                         estimate_modules=3, wudi_steps=7, torch_threads=1, seed=5, work_dir=tmp_path)
    rows = ms.main(cfg)
    assert made == [("tiny", 2, 5, tmp_path)]
    assert rows == [{"algorithm": "floor (read + form τ)", "wall": 2.0, "rss": 0.5, "note": ""},
                    {"algorithm": "dare", "wall": 5.0, "rss": 0.75, "note": "est. from 3/55 weights"},
                    {"algorithm": "wudi", "wall": 3.0, "rss": 1.5, "note": "artifact 0.50 GiB"}]
    experts = [("task0", tmp_path / "e0"), ("task1", tmp_path / "e1")]
    assert children == [("_floor_child", (experts, 1)), ("_estimate_child", (experts, "dare", 3, 7, 5, 1)),
                        ("_merge_child", (experts, str(tmp_path / "out-wudi"), "wudi", False, 7, 5, 1))]
    out = capsys.readouterr().out
    assert ("one model (θ0, fp32) = 1.000 GiB; one expert checkpoint = 0.002 GiB; process baseline after imports "
            "≈ 0.25 GiB") in out
    assert f"{'dare':<24}{5.0:>9.1f}{2.5:>9.2f}{0.75:>14.2f}{0.75:>9.2f}  est. from 3/55 weights" in out
    assert f"{'wudi':<24}{3.0:>9.1f}{1.5:>9.2f}{1.5:>14.2f}{1.5:>9.2f}  artifact 0.50 GiB" in out
    # wudi estimated: its note names its steps; a temporary work dir is removed afterwards
    work = tmp_path / "w"
    monkeypatch.setattr(ms.tempfile, "mkdtemp", lambda prefix: (work.mkdir(), str(work))[1])
    rows = ms.main(dataclasses.replace(cfg, algorithms=["wudi"], estimate=["wudi"], work_dir=None))
    assert rows[1]["note"] == "est. from 3/55 weights, 7 steps" and not work.exists()


def test_merge_speed_names_an_unknown_algorithm_and_a_bad_count(monkeypatch):
    monkeypatch.setattr(ms, "_make_experts", no_run)
    with pytest.raises(ValueError, match=r"--algorithms: unknown \['nope'\]"):
        ms.main(ms.BenchConfig(config_name="tiny", algorithms=["ties", "nope"]))
    with pytest.raises(ValueError, match="--num_experts is 0, expected >= 1"):
        ms.main(ms.BenchConfig(config_name="tiny", num_experts=0))
    with pytest.raises(ValueError, match="--wudi_steps is 0, expected >= 1"):
        ms.main(ms.BenchConfig(config_name="tiny", wudi_steps=0))


def test_merge_speed_children(monkeypatch, tmp_path, capsys, torch_state):
    import model_merging.algorithms as algorithms
    import model_merging.merge as merge

    experts = ms._make_experts("tiny", 2, 0, tmp_path)
    assert capsys.readouterr().out.count("  wrote expert") == 2
    assert ms._make_experts("tiny", 2, 0, tmp_path) == experts and capsys.readouterr().out == ""  # reused
    w0, w1 = (sorted(p.read_bytes() for p in d.iterdir() if p.suffix == ".safetensors") for _, d in experts)
    assert w0 != w1  # each expert its own seed

    monkeypatch.setattr(ms, "resource", types.SimpleNamespace(
        RUSAGE_SELF=0, getrusage=lambda who: types.SimpleNamespace(ru_maxrss=2**21)))  # KiB: 2 GiB
    assert ms._peak_rss_gb() == 2.0
    assert ms._setup(1) == 2.0 and torch.get_num_threads() == 1 and not torch.is_grad_enabled()

    # the estimate: the algorithm alone on a strided subset, in seconds per dense element
    clock, seen = Clock(), []
    method = dataclasses.replace(algorithms.get_method("ties"), fn=lambda taus, params, ctx: (
        seen.append(ctx.name), setattr(clock, "now", clock.now + 1e-9 * taus[0].numel())))
    monkeypatch.setattr(ms, "time", clock)
    monkeypatch.setattr(algorithms, "get_method", lambda name: method)
    r = ms._estimate_child(experts, "ties", 3, 5, 0, 0)
    from model_merging.experts import ExpertSet

    mods = list(ExpertSet.open(experts, verify_hashes=False).layout.lora_modules.items())
    stride = len(mods) // 3
    assert seen == [f"{m}.weight" for m, _ in mods[::stride][:3]]
    assert r["alg_s_per_elem"] == pytest.approx(1e-9) and (r["subset"], r["modules"]) == (3, len(mods))
    assert r["total_elems"] == sum(o * i for _, (o, i) in mods)
    seen.clear()  # asked for more weights than there are: every one, once
    assert ms._estimate_child(experts, "ties", len(mods) + 5, 5, 0, 0)["subset"] == len(mods) == len(seen)

    # a full merge: its options, and the artifact's size
    opts = []

    def fake_merge(exp, out, o, log):
        opts.append(o)
        Path(out).mkdir()
        (Path(out) / "a").write_bytes(b"x" * 300)
        (Path(out) / "b").write_bytes(b"x" * 20)

    monkeypatch.setattr(merge, "merge_experts", fake_merge)
    r = ms._merge_child(experts, str(tmp_path / "out"), "wudi", False, 7, 3, 0)
    assert r["bytes"] == 320 and not (tmp_path / "out").exists()
    assert (opts[0].algorithm, opts[0].masks, opts[0].seed) == ("wudi", False, 3)
    assert opts[0].params == algorithms.WudiParams(steps=7)
    ms._merge_child(experts, str(tmp_path / "out"), "ties", True, 7, 3, 0)
    assert (opts[1].algorithm, opts[1].masks, opts[1].params) == ("ties", True, None)
