"""The TableTop-4 pipeline behind `make demo`: stage caching, the joint suite, config checks, quick mode end to end."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments.robot.demo import FULL, QUICK, DemoConfig
from experiments.robot.tabletop_pipeline.data import make_joint_suite
from experiments.robot.tabletop_pipeline.pipeline import DEFAULT_BASE_DIR, SUITES, PipelineConfig, PipelineError
from experiments.robot.tabletop_pipeline.stages import Stage, fingerprint
from experiments.robot.tabletop_pipeline.training import TrainJob, TrainSettings, finetune_config

REPO = Path(__file__).resolve().parents[1]


def test_stage_runs_once_per_spec_and_clears_a_stale_directory(tmp_path):
    calls = []

    def body(d: Path) -> dict:
        calls.append(d)
        (d / "artifact.txt").write_text(str(len(calls)))
        return {"n": len(calls)}

    first = Stage(tmp_path, "s", {"steps": 1}).run(body, log=lambda _m: None)
    again = Stage(tmp_path, "s", {"steps": 1}).run(body, log=lambda _m: None)
    assert (first.cached, again.cached, again.outputs, len(calls)) == (False, True, {"n": 1}, 1)
    (tmp_path / "s" / "leftover.txt").write_text("from the old settings")
    changed = Stage(tmp_path, "s", {"steps": 2}).run(body, log=lambda _m: None)
    assert (changed.cached, changed.outputs) == (False, {"n": 2})
    assert not (tmp_path / "s" / "leftover.txt").exists()  # cleared before running again
    kept = Stage(tmp_path, "s", {"steps": 3}, clear_stale=False)
    (tmp_path / "s" / "leftover.txt").write_text("items that check their own identity")
    kept.run(body, log=lambda _m: None)
    assert (tmp_path / "s" / "leftover.txt").exists()
    # a cached record whose outside outputs changed is not trusted
    outside = Stage(tmp_path, "s", {"steps": 3}, clear_stale=False)
    assert outside.run(body, log=lambda _m: None, still_valid=lambda out: True).cached
    redone = outside.run(body, log=lambda _m: None, still_valid=lambda out: False)
    assert (redone.cached, redone.outputs) == (False, {"n": 4})
    # only a stage that did all its work itself records a cold cost
    assert (first.fresh, again.fresh, redone.fresh) == (True, True, False)  # redone kept the old items
    reused = Stage(tmp_path, "r", {}).run(lambda d: {"reused": True}, log=lambda _m: None)
    assert reused.fresh is False and Stage(tmp_path, "r", {}).run(body, log=lambda _m: None).fresh is False


def test_stage_with_a_failing_body_records_nothing(tmp_path):
    def boom(_d):
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        Stage(tmp_path, "s", {"a": 1}).run(boom, log=lambda _m: None)
    assert Stage(tmp_path, "s", {"a": 1}).recorded() is None


def test_fingerprint_ignores_key_order_but_not_values():
    assert fingerprint({"a": 1, "b": [2, 3]}) == fingerprint({"b": [2, 3], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})


def test_joint_suite_links_every_suite_file(tmp_path):
    for suite, names in (("spatial", ["t0", "t1"]), ("goal", ["t0"])):
        (tmp_path / suite).mkdir()
        for n in names:
            (tmp_path / suite / f"{n}_demo.hdf5").write_bytes(suite.encode() + n.encode())
    joint = make_joint_suite(tmp_path, ["spatial", "goal"])
    got = {p.name: p.read_bytes() for p in joint.iterdir()}
    assert got == {"spatial__t0_demo.hdf5": b"spatialt0", "spatial__t1_demo.hdf5": b"spatialt1",
                   "goal__t0_demo.hdf5": b"goalt0"}
    assert all(p.is_symlink() for p in joint.iterdir())
    with pytest.raises(ValueError, match="the joint suite's name 'joint' collides with a suite"):
        make_joint_suite(tmp_path, ["spatial", "joint"])
    (tmp_path / "object").mkdir()
    with pytest.raises(FileNotFoundError, match=r"suite directory .*object holds no \*\.hdf5 files"):
        make_joint_suite(tmp_path, ["object"])


def test_a_data_dir_the_user_named_is_never_replaced(tmp_path):
    from experiments.robot.tabletop.demos import TABLETOP_VERSION
    from experiments.robot.tabletop.generate import MANIFEST, GenerateConfig
    from experiments.robot.tabletop.physics import PHYSICS_VERSION
    from experiments.robot.tabletop_pipeline.data import DataDirError, ensure_dataset, generation_spec, matches

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    gen = GenerateConfig(out_dir=mine, suites=["goal"], task_ids=[0], demos_per_task=1)
    with pytest.raises(DataDirError, match="holds other files; refusing to replace it"):
        ensure_dataset(gen, log=lambda _m: None, owned=True)  # not a TableTop-4 dataset: never deleted
    (mine / "notes.txt").unlink()
    (mine / "goal").mkdir()
    with pytest.raises(DataDirError, match="holds an unfinished TableTop-4 dataset .no manifest: its generation was "
                                           "interrupted, or another run is writing it.; refusing to replace it"):
        ensure_dataset(gen, log=lambda _m: None, owned=False)
    (mine / "notes.txt").write_text("keep me")
    (mine / MANIFEST).write_text(json.dumps({"tabletop_version": TABLETOP_VERSION, "physics_version": PHYSICS_VERSION,
                                             "config": {**generation_spec(gen), "seed": 5}}))
    with pytest.raises(DataDirError, match=r"holds a TableTop-4 dataset generated with other settings: seed 5 \(this "
                                           r"run 0\); refusing"):
        ensure_dataset(gen, log=lambda _m: None, owned=False)
    (mine / MANIFEST).write_text(json.dumps({"tabletop_version": TABLETOP_VERSION, "physics_version": PHYSICS_VERSION,
                                             "config": generation_spec(gen), "files": {"goal/gone.hdf5": {}}}))
    with pytest.raises(DataDirError, match="holds a TableTop-4 dataset with files missing; refusing"):
        ensure_dataset(gen, log=lambda _m: None, owned=False)
    with pytest.raises(ValueError, match="noise must be a finite number >= 0"):  # checked before deleting
        ensure_dataset(GenerateConfig(out_dir=mine, suites=["goal"], noise=-1.0), log=lambda _m: None, owned=True)
    assert sorted(p.name for p in mine.iterdir()) == sorted([MANIFEST, "goal", "notes.txt"])
    # the pipeline's own directory after a killed generation (suite files, no manifest) is generated again
    own = tmp_path / "own"
    (own / "goal").mkdir(parents=True)
    (own / "goal" / ".put_the_red_cube_in_the_bowl_demo.hdf5.x1y2.tmp").write_bytes(b"partial")
    gen = GenerateConfig(out_dir=own, suites=["goal"], task_ids=[0], demos_per_task=1)
    ensure_dataset(gen, log=lambda _m: None, owned=True)
    assert matches(own, gen) and not any(p.name.startswith(".") for p in (own / "goal").iterdir())
    # demos recorded under other simulator rules are not reused
    manifest = json.loads((own / MANIFEST).read_text())
    (own / MANIFEST).write_text(json.dumps({**manifest, "physics_version": manifest["physics_version"] - 1}))
    assert not matches(own, gen)


@pytest.mark.parametrize("change, message", [
    ({"suites": ["spatial", "kitchen"]}, "suites must be distinct"),
    ({"algorithms": ["ties", "magic"]}, "unknown merge algorithm"),
    ({"per_task_algorithms": ["magic"]}, "unknown merge algorithm"),
    ({"task_ids": [10]}, "task_ids"),
    ({"expert_steps": 0}, "expert_steps must be >= 1"),
    ({"k_gate": 200}, "k_gate must be at most the tiny model's hidden width 128, got 200"),
    ({"router_variant": "query"}, "router_variant"),
    ({"router_exemplars": 1}, "router_exemplars must be 0 .* or >= 2"),
    ({"router_exemplars": -1}, "router_exemplars must be a finite number >= 0"),
    ({"router_variant": "exemplar", "router_exemplars": 0}, "router_variant exemplar needs router_exemplars"),
    ({"action_loss": "huber"}, "action_loss must be one of"),
    ({"demo_noise": -0.1}, "demo_noise must be a finite number >= 0"),
    ({"lr": 0.0}, "lr must be a finite number > 0"),
    ({"lr": float("inf")}, "lr must be a finite number > 0, got inf"),
    ({"lr_schedule": "step"}, "lr_schedule must be one of"),
    ({"min_lr_ratio": 3.0}, r"min_lr_ratio must be in \[0, 1\]"),
    ({"mask_lambda": -5.0}, "mask_lambda must be a finite number >= 0"),
    ({"mask_lambda": float("nan")}, "mask_lambda must be a finite number >= 0, got nan"),
    ({"expert_head_layers": 4}, r"expert_head_layers must be in 0..3"),
    ({"algorithms": ["ties", "emr", "ties"]}, r"algorithms lists \['ties'\] more than once"),
    ({"trials_per_task": 49, "first_init_state": 2}, "50 init states"),
    ({"video_episodes": ["goal/*/0", "kitchen/*/*"]}, r"video_episodes \['kitchen/\*/\*'\] match no episode"),
    ({"task_ids": [0, 1], "video_episodes": ["goal/5/0"]}, "match no episode"),
    ({"task_ids": [0, 0]}, r"task_ids must be a non-empty list of distinct task ids in 0..9, got \[0, 0\]"),
    ({"suites": ["goal", "goal"]}, "suites must be distinct"),
    ({"baseline_head_layers": 5}, r"baseline_head_layers must be in 0..4, got 5"),
    ({"warmup_steps": 100, "expert_steps": 200, "joint_steps": 100}, r"warmup_steps \(100\) must be below"),
])
def test_pipeline_config_names_the_bad_field(change, message):
    cfg = PipelineConfig(**change)
    with pytest.raises(PipelineError, match=message):
        cfg.validate()


def test_missing_base_is_a_clear_error(tmp_path):
    with pytest.raises(PipelineError, match="base.json missing"):
        PipelineConfig(base_dir=tmp_path / "nothing").validate()


def test_demo_presets_fill_only_unset_knobs():
    quick = DemoConfig(quick=True).pipeline_config()
    assert (quick.task_ids, quick.expert_steps, quick.out_dir) == (QUICK["task_ids"], QUICK["expert_steps"],
                                                                   Path("runs/demo-quick"))
    full = DemoConfig().pipeline_config()
    plain = PipelineConfig()  # the pipeline's own defaults are the full demo's
    assert {k: getattr(plain, k) for k in FULL} == FULL
    assert (full.task_ids, full.expert_steps, full.out_dir) == (FULL["task_ids"], FULL["expert_steps"], Path("runs/demo"))
    cfg = DemoConfig(quick=True)
    cfg.train.expert_steps = 7
    cfg.train.action_loss = "l1"
    assert (cfg.pipeline_config().expert_steps, cfg.pipeline_config().action_loss) == (7, "l1")
    assert full.action_loss == "mse"  # TableTop-4's default; fine-tuning (FinetuneConfig) keeps the published L1


def test_the_demos_defaults_are_the_pipelines_and_quick_mode_changes_only_its_presets():
    # every knob's default is the pipeline's own (one default per knob); quick mode shrinks only the size knobs,
    # to the presets that the knobs' comments state, and runs in its own directory
    assert DemoConfig().pipeline_config() == PipelineConfig()
    quick, full = (dataclasses.asdict(DemoConfig(quick=q).pipeline_config()) for q in (True, False))
    assert {k: v for k, v in quick.items() if full[k] != v} == {
        "task_ids": [0, 1], "demos_per_task": 6, "expert_steps": 60, "joint_steps": 80, "trials_per_task": 2,
        "out_dir": Path("runs/demo-quick")}
    assert (full["task_ids"], full["demos_per_task"], full["expert_steps"], full["joint_steps"],
            full["trials_per_task"]) == (None, 50, 1500, 3000, 4)


def test_a_size_knob_set_to_an_empty_or_zero_value_is_passed_on_not_replaced_by_the_preset():
    from experiments.robot.demo import DataKnobs, EvalKnobs, TrainKnobs

    cfg = DemoConfig(quick=True, data=DataKnobs(task_ids=[], demos_per_task=0), train=TrainKnobs(expert_steps=0),
                     eval=EvalKnobs(trials_per_task=0)).pipeline_config()  # so that validation names it
    assert (cfg.task_ids, cfg.demos_per_task, cfg.expert_steps, cfg.trials_per_task) == ([], 0, 0, 0)


def test_shipped_base_matches_its_recorded_hash():
    from prismatic.io import state_dict_sha256
    from prismatic.models import get_config
    from prismatic.models.loading import load_base_dir

    sd, meta = load_base_dir(REPO / DEFAULT_BASE_DIR, get_config("tiny"))
    assert state_dict_sha256(sd) == meta["sha256"]
    assert meta["pretraining"]["config"]["steps"] > 0


def _demo(args, cwd, timeout=900):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "experiments.robot.demo", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_demo_cli_refuses_a_missing_base_and_writes_nothing(tmp_path):
    out = tmp_path / "demo"
    r = _demo(["--quick", "true", "--out_dir", str(out), "--base_dir", str(tmp_path / "none")], REPO)
    assert r.returncode == 2
    assert "base.json missing" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


def test_demo_cli_refuses_a_users_directory_and_a_file_as_out_dir(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "pipeline.log").write_text("my log")
    (mine / "thesis.pdf").write_text("mine")
    r = _demo(["--quick", "true", "--out_dir", str(mine)], REPO)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"demo: error: out_dir {mine} holds files this tool did not write (thesis.pdf); refusing" in r.stderr
    assert sorted(p.name for p in mine.iterdir()) == ["pipeline.log", "thesis.pdf"]
    assert (mine / "pipeline.log").read_text() == "my log"
    r = _demo(["--quick", "true", "--out_dir", str(mine / "thesis.pdf")], REPO)
    assert r.returncode == 2 and f"demo: error: out_dir {mine / 'thesis.pdf'} is a file, not a directory" in r.stderr


def test_quick_demo_end_to_end_then_resumes_from_cache(tmp_path):
    """`make demo QUICK=1`: every stage runs, the table has every row, and a second run only reads the cache."""
    out = tmp_path / "demo"
    args = ["--quick", "true", "--out_dir", str(out), "--base_dir", str(REPO / DEFAULT_BASE_DIR)]
    r = _demo(args, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    table = (out / "demo_table.md").read_text()
    assert "## Success rate (%)" in r.stdout and "## Routing accuracy" in r.stdout
    success = table.split("## Success rate (%)")[1].split("\n\n")[1]
    rows = [line.split("|")[1].strip() for line in success.splitlines()[2:]]
    expected = ["FT experts", "Baseline FT experts (self-attn)"] + [
        f"MergeVLA {a} + masks + router" for a in ("TA", "TIES", "TSV", "KnOTS", "WUDI", "EMR")] + [
        f"MergeVLA {a} + masks, per-task action expert + exemplar router" for a in ("TA", "TIES", "EMR")] + [
        "Baseline TA, no masks (self-attn)", "Joint multi-task (upper reference)",
        "Blind replay of a demo (reference, no observations)"]
    assert rows == expected  # the paper's layout: FT experts first, then each merge
    assert "MSE action loss" in table and "| run | steps | final MSE loss |" in table  # the demo's default loss
    assert (out / "summary" / "results.csv").is_file() and (out / "summary" / "success_bars.png").is_file()
    merged = [json.loads(f.read_text()) for f in (out / "merge").rglob("manifest.json")]
    merged = [m for m in merged if m.get("format") == "mergevla-merged"]
    assert merged and all(list(m["trained_frame_size"].values()) == [[64, 64]] * 4 for m in merged)  # as recorded
    timing = json.loads((out / "timing.json").read_text())
    assert set(timing["stages"]) == {"data", "base", "train", "merge", "eval", "report"}
    assert not any(s["cached"] for s in timing["stages"].values())
    for suite, frac in timing["ft_success"].items():  # fractions (what benchmarks/demo_time.py compares to 0.9)
        rows = [json.loads(x) for x in (out / "eval" / "mergevla-experts" / f"{suite}.jsonl").read_text().splitlines()]
        assert frac == sum(r["success"] for r in rows) / len(rows) and len(rows) == 4
        assert timing["success_pct"]["FT experts"][suite] == 100 * frac
    # 2 tasks x 2 trials x 4 suites rolled out per row, each written once as a JSONL row
    results = [json.loads(line) for p in (out / "eval").rglob("*.jsonl") for line in p.read_text().splitlines()]
    assert len(results) == 14 * 16
    routing = json.loads((out / "routing.json").read_text())
    assert len(routing) == 9 and all(0 <= v["first_obs"][r]["all"] <= 1 for v in routing.values()
                                     for r in ("value", "exemplar"))
    for a in ("TA", "TIES", "EMR"):  # the per-task rows roll out with the exemplar router
        pertask = routing[f"MergeVLA {a} + masks, per-task action expert + exemplar router"]
        assert pertask["rollouts"] == pertask["first_obs"]["exemplar"]
    assert "| exemplar (beyond the paper) |" in table.split("## Router variants")[1].splitlines()[2]

    assert json.loads((out / "train" / "stage.json").read_text())["conditions"]["workers"] == 2
    (out / "summary" / "routing_an_earlier_row.png").write_bytes(b"stale")  # a plot of rows this run lacks
    again = _demo(args, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert not (out / "summary" / "routing_an_earlier_row.png").exists()
    timing2 = json.loads((out / "timing.json").read_text())
    assert all(timing2["stages"][s]["cached"] for s in ("data", "base", "train", "merge", "eval"))
    def results_part(text):  # the header holds the run's start time; the tables must be the same
        return text.split("## Success rate")[1].split("## Training")[0]

    assert results_part((out / "demo_table.md").read_text()) == results_part(table)

    # a row's results file deleted (to redo that row): the cached eval stage is not trusted, the row is rolled
    # out again and the table comes out whole, not silently without the row
    (out / "eval" / "joint.jsonl").unlink()
    redo = _demo(args, tmp_path)
    assert redo.returncode == 0, redo.stderr[-3000:]
    assert not json.loads((out / "timing.json").read_text())["stages"]["eval"]["cached"]
    assert results_part((out / "demo_table.md").read_text()) == results_part(table)

    # videos on request: only the eval stage reruns; its rollouts are skipped, the chosen episode is recorded
    videos = _demo([*args, "--eval.video_episodes", '["goal/0/0"]'], tmp_path)
    assert videos.returncode == 0, videos.stderr[-3000:]
    assert results_part((out / "demo_table.md").read_text()) == results_part(table)
    timing3 = json.loads((out / "timing.json").read_text())
    assert all(timing3["stages"][s]["cached"] for s in ("data", "base", "train", "merge"))
    assert not timing3["stages"]["eval"]["cached"]
    import imageio.v2 as imageio

    row_dirs = sorted((out / "eval" / "videos").iterdir())
    assert len(row_dirs) == 14
    for d in row_dirs:
        (mp4,) = d.glob("*.mp4")
        (vrow,) = [json.loads(x) for p in d.glob("*.jsonl") for x in p.read_text().splitlines()]
        assert mp4.name == f"goal--task000--trial000--{'success' if vrow['success'] else 'failure'}.mp4"
        main = out / "eval" / d.name / "goal.jsonl"
        main = main if main.is_file() else out / "eval" / f"{d.name}.jsonl"
        (same,) = [r for r in map(json.loads, main.read_text().splitlines()) if r["key"] == vrow["key"]]
        assert (same["success"], same["steps"]) == (vrow["success"], vrow["steps"])  # the same episode again
        frames = [f for f in imageio.get_reader(str(mp4), format="FFMPEG")]  # its len() is inf
        assert len(frames) == vrow["steps"] + 1 and frames[0].shape == (256, 512, 3)  # both cameras, 4x


def test_each_training_job_gets_the_pipelines_knobs(tmp_path):
    s = TrainSettings(data_root=str(tmp_path), base_dir=str(DEFAULT_BASE_DIR), seed=3, batch_size=4, lr=1e-3,
                      lr_schedule="cosine", warmup_steps=2, min_lr_ratio=0.1, weight_decay=0.0, max_grad_norm=1.0,
                      image_aug=False, log_every=50, action_loss="mse")
    c = finetune_config(TrainJob("mergevla/goal", "cross_attn", "goal", 30, str(tmp_path / "run")), s)
    assert (c.seed, c.suite, c.max_steps, c.save_every, c.lr_schedule, c.image_aug, c.action_loss) == (
        3, "goal", 30, 30, "cosine", False, "mse")
    assert (c.expert_arch, c.grad_accumulation_steps, c.log_every, c.resume) == ("cross_attn", 1, 30, True)
    # every knob differs from FinetuneConfig's default, so a knob that is not passed on shows
    assert (c.batch_size, c.lr, c.warmup_steps, c.min_lr_ratio, c.weight_decay, c.max_grad_norm) == (
        4, 1e-3, 2, 0.1, 0.0, 1.0)
    assert (c.data_root, c.base.base_dir, c.out_dir) == (tmp_path, DEFAULT_BASE_DIR, tmp_path / "run")
    c.validate()
    long_job = finetune_config(TrainJob("mergevla/goal", "cross_attn", "goal", 1500, str(tmp_path / "run")), s)
    assert long_job.save_every == 500  # an interrupted job resumes from its last 500-step checkpoint


def test_a_merge_job_merges_with_its_own_knobs_and_is_redone_when_they_change(tmp_path):
    from experiments.robot.tabletop_pipeline.merging import MergeJob, run_merge
    from model_merging.synthetic import save_perturbed_experts
    from prismatic.models import BaseModelConfig, build_vla

    experts = save_perturbed_experts(build_vla("tiny", BaseModelConfig(random_seed=0), seed=0), tmp_path / "experts",
                                     ["goal", "long"], noise=0.05, seed=1)
    # every knob off MergeOptions' default, so one that is not passed on shows in the manifest
    job = MergeJob("m", "mergevla", "dare", True, 2, tuple((n, str(d)) for n, d in experts), ("a", "b"),
                   str(tmp_path / "m"), mask_lambda=0.3, k_gate=4, seed=5, per_task_parts=("action_queries",),
                   params={"p": 0.2})
    assert run_merge(job)["cached"] is False
    m = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert (m["algorithm"], m["expert_head_layers"], m["masks"]["lambda"], m["router"]["k_gate"], m["seed"],
            m["per_task_parts"], m["params"]["p"]) == ("dare", 2, 0.3, 4, 5, ["action_queries"], 0.2)
    assert run_merge(job)["cached"] is True
    redone = run_merge(dataclasses.replace(job, k_gate=6))
    assert redone["cached"] is False and json.loads((tmp_path / "m" / "manifest.json").read_text())["router"][
        "k_gate"] == 6
    import shutil

    shutil.rmtree(tmp_path / "m")  # the artifact deleted, its sidecar left: merged again
    assert run_merge(dataclasses.replace(job, k_gate=6))["cached"] is False


DATA = {"data_root": "runs/x/tabletop4", "fingerprint": "fp"}


def test_rollouts_of_other_scenes_or_demos_are_new_results(monkeypatch, tmp_path):
    import experiments.robot.tabletop.suites as suites
    from experiments.robot.tabletop_pipeline.evaluation import results_complete
    from experiments.robot.tabletop_pipeline.pipeline import eval_jobs

    trained = {f"{f}/{s}": {"checkpoint": f"ck/{f}/{s}", "weights_sha256": f"{f}{s}"}
               for f in ("mergevla", "baseline") for s in ("goal", "long")} | {
        "joint": {"checkpoint": "ck/joint", "weights_sha256": "j"}}
    cfg = PipelineConfig(suites=["goal", "long"])

    def ids(data=DATA, c=cfg):
        return {j.name: j.policy_id for j in eval_jobs(c, trained, {}, [], data)}

    before = ids()
    assert ids(c=PipelineConfig(suites=["goal", "long"], trials_per_task=2, task_ids=[3])) == before  # same episodes
    blind = ids({**DATA, "fingerprint": "other demos"})  # blind replay makes the dataset's demos again
    assert blind["blind-replay"] != before["blind-replay"] and blind["mergevla-experts"] == before["mergevla-experts"]
    real = suites.init_state

    def moved(suite, task_id, index):  # one initial scene of one task laid out otherwise
        state = real(suite, task_id, index)
        if (suite, task_id, index) == ("long", 9, 49):
            state.gripper_pos = state.gripper_pos + 0.01
        return state

    monkeypatch.setattr(suites, "init_state", moved)
    assert all(a != b for a, b in zip(ids().values(), before.values()))
    monkeypatch.setattr(suites, "init_state", real)
    monkeypatch.setattr("experiments.robot.tabletop.demos.TABLETOP_VERSION", 99)
    assert all(a != b for a, b in zip(ids().values(), before.values()))

    # the stage stays done while its files hold every planned episode, also among rows of more trials
    f = tmp_path / "rows.jsonl"
    f.write_text("".join(json.dumps({"key": k}) + "\n" for k in ("goal/0/0", "goal/0/1", "goal/1/0")))
    results = {"job": {"files": [str(f)], "episodes": 2}}
    assert results_complete(results, {"goal/0/0", "goal/1/0"})
    assert not results_complete(results, {"goal/0/0", "goal/1/1"})


def test_eval_shows_the_training_crop_and_new_crops_are_new_results():
    from experiments.robot.tabletop_pipeline.pipeline import eval_crop_area, eval_jobs

    trained = {f"{f}/{s}": {"checkpoint": f"ck/{f}/{s}", "weights_sha256": f"{f}{s}"}
               for f in ("mergevla", "baseline") for s in ("goal", "long")}
    trained["joint"] = {"checkpoint": "ck/joint", "weights_sha256": "j"}
    ids = {}
    for aug in (True, False):
        cfg = PipelineConfig(suites=["goal", "long"], image_aug=aug)
        ids[aug] = [j.policy_id for j in eval_jobs(cfg, trained, {}, [], DATA)]
    assert eval_crop_area(PipelineConfig(image_aug=True)) == 0.9 and eval_crop_area(PipelineConfig()) == 1.0
    assert len(ids[True]) == 4 and all(a != b for a, b in zip(ids[True], ids[False]))  # old JSONL rows are discarded
    later = [j.policy_id for j in eval_jobs(PipelineConfig(suites=["goal", "long"], first_init_state=4), trained, {}, [], DATA)]
    assert all(a != b for a, b in zip(later, ids[False]))  # other init states: other episodes


def test_demo_time_judges_fractions_against_the_targets(tmp_path, capsys):
    from dataclasses import asdict

    from benchmarks.demo_time import DemoTimeConfig, main
    from experiments.robot.demo import DemoConfig
    from experiments.robot.tabletop_pipeline.stages import jsonable

    stages = {n: {"wall_s": w, "cached": False, "fresh": True} for n, w in (("data", 20.0), ("train", 900.0),
                                                                           ("eval", 80.0))}
    config = jsonable(asdict(DemoConfig(out_dir=tmp_path).pipeline_config()))
    timing = {"stages": stages, "machine_start": {"cpus": 2, "torch": "x", "loadavg_1m": 0.5}, "config": config,
              "ft_success": {"goal": 0.25, "spatial": 0.95, "object": 0.9, "long": 0.91}}

    def judge(**changes):
        for k, v in changes.items():
            timing[k] = v
        (tmp_path / "timing.json").write_text(json.dumps(timing))
        code = main(DemoTimeConfig(run=False, out_dir=tmp_path))
        return code, capsys.readouterr()

    code, out = judge()
    assert code == 1 and "wall time (cold) 1000 s = 16.7 min; target ≤ 20 min: met" in out.out
    assert "FT expert goal     25.0%; target ≥ 90%: MISSED" in out.out and "spatial  95.0%; target ≥ 90%: met" in out.out
    assert judge(ft_success={"goal": 0.9, "spatial": 0.95, "object": 0.9, "long": 0.91})[0] == 0
    code, out = judge(ft_success={"object": 0.95})  # a run without the other suites does not pass
    assert code == 1 and "FT expert goal     –; target ≥ 90%: MISSED" in out.out
    timing["ft_success"] = {"goal": 0.9, "spatial": 0.95, "object": 0.9, "long": 0.91}
    stages["eval"]["fresh"] = False  # rollouts reused after a settings change: 80 s is not their cold cost
    code, out = judge()
    assert code == 2 and "not judged: stage(s) eval reused earlier work" in out.out
    stages["eval"]["fresh"] = True
    code, out = judge(config={**config, "expert_steps": 3000})
    assert code == 2 and "other settings than the full demo's (expert_steps: 3000 → 1500)" in out.err
    # a cached stage counts with the time it took when it ran: only if it ran as this run records it did
    timing["config"] = config
    (tmp_path / "train").mkdir()
    record = {"wall_s": 1500.0, "fresh": True, "conditions": {"workers": 1, "cpus": 2}}
    (tmp_path / "train" / "stage.json").write_text(json.dumps(record))
    stages["train"]["cached"] = True
    code, out = judge()
    assert code == 2 and "not judged: stage(s) train reused earlier work or ran with other settings" in out.out
    (tmp_path / "train" / "stage.json").write_text(json.dumps({**record, "conditions": {"workers": 2, "cpus": 2}}))
    code, out = judge()
    assert code == 1 and "wall time (cold) 1600 s = 26.7 min; target ≤ 20 min: MISSED" in out.out
    for text, says in [("[1]", "does not hold a JSON object"), ("{", "is not valid JSON"),
                       ('{"stages": {}}', "lacks ['config', 'machine_start', 'ft_success']")]:
        (tmp_path / "timing.json").write_text(text)
        assert main(DemoTimeConfig(run=False, out_dir=tmp_path)) == 2
        assert says in capsys.readouterr().err


def test_ft_success_is_a_fraction_per_suite():
    from experiments.robot.harness import success_table
    from experiments.robot.tabletop_pipeline.report import ft_success

    rows = [{"method": "FT experts", "suite": "goal", "success": k == 0} for k in range(4)]
    rows += [{"method": "MergeVLA TA + masks + router", "suite": "long", "success": True}]
    assert ft_success(success_table(rows), ["goal", "long"]) == {"goal": 0.25, "long": None}


def test_video_frame_puts_both_cameras_side_by_side_upscaled():
    from experiments.robot.tabletop_pipeline.evaluation import video_frame

    agent = np.zeros((2, 2, 3), np.uint8)
    agent[0, 1] = 200
    wrist = np.full((2, 2, 3), 7, np.uint8)
    f = video_frame({"agentview_image": agent, "robot0_eye_in_hand_image": wrist}, scale=3)
    assert f.shape == (6, 12, 3) and f.dtype == np.uint8
    assert (f[0:3, 3:6] == 200).all() and (f[0:3, 0:3] == 0).all() and (f[3:6, 0:6] == 0).all()
    assert (f[:, 6:] == 7).all()


def test_the_report_refuses_rows_of_other_weights_in_a_jobs_results_file(tmp_path):
    from experiments.robot.harness import ResultsError
    from experiments.robot.tabletop_pipeline.evaluation import load_rows

    f = tmp_path / "r.jsonl"
    f.write_text(json.dumps({"key": "goal/0/0", "policy_id": "a", "success": True}) + "\n")
    job = {"label": "FT experts", "policy_id": "a", "files": [str(f)]}
    assert [r["key"] for r in load_rows({"ft": job})] == ["goal/0/0"]
    with open(f, "a") as out:  # a row of other weights, appended after the rollouts were recorded
        out.write(json.dumps({"key": "goal/0/1", "policy_id": "b", "success": False}) + "\n")
    with pytest.raises(ResultsError, match=r"holds rows of policies \['a', 'b'\]; FT experts is a"):
        load_rows({"ft": job})


def test_exemplar_settings_and_exemplars_are_part_of_the_merges_and_rows_identity():
    from experiments.robot.tabletop_pipeline.pipeline import eval_jobs, merge_jobs

    trained = {f"{f}/{s}": {"checkpoint": f"ck/{f}/{s}", "weights_sha256": f"{f}{s}"}
               for f in ("mergevla", "baseline") for s in SUITES}
    trained["joint"] = {"checkpoint": "ck/joint", "weights_sha256": "j"}
    data = {"data_root": "runs/x/tabletop4", "fingerprint": "fp"}

    def specs(**kw):
        return {j.name: j.spec() for j in merge_jobs(PipelineConfig(**kw), Path("r"), data, trained)}

    base = specs()
    routed = [n for n in base if n.startswith("mergevla")]
    assert len(routed) == 9 and all((base[n]["exemplars"], base[n]["crop_area"], base[n]["data_fingerprint"])
                                    == (50, 1.0, "fp") for n in routed)
    assert base["baseline-task_arithmetic-nomasks"]["exemplars"] == 0
    for change in ({"router_exemplars": 20}, {"image_aug": True}):  # other frames, or frames shown with a crop
        other = specs(**change)
        assert all(other[n] != base[n] for n in routed)
    assert specs(image_aug=True)["mergevla-ties-masks"]["crop_area"] == 0.9  # the crop the rollouts show

    jobs = merge_jobs(PipelineConfig(), Path("r"), data, trained)
    pertask = [j for j in jobs if j.per_task_parts]
    assert all(j.routed and j.variant == "exemplar" for j in pertask)
    assert [j for j in merge_jobs(PipelineConfig(router_exemplars=0), Path("r"), data, trained) if j.per_task_parts][
        0].label == "MergeVLA TA + masks, per-task action expert, task given"

    def ids(ex_sha):
        merged = {j.name: {"dir": "m", "weights_sha256": "w", "exemplars_sha256": ex_sha} for j in jobs}
        return {e.name: e.policy_id for e in eval_jobs(PipelineConfig(), trained, merged, jobs, data)}

    a, b = ids("e1"), ids("e2")  # recomputed exemplars: every routed row is rolled out again
    assert all(a[n] != b[n] for n in routed) and a["mergevla-experts"] == b["mergevla-experts"]


def test_demo_time_in_quick_mode_judges_only_the_five_minutes(tmp_path, capsys):
    from dataclasses import asdict

    from benchmarks.demo_time import DemoTimeConfig, main
    from experiments.robot.tabletop_pipeline.stages import jsonable

    config = jsonable(asdict(DemoConfig(quick=True, out_dir=tmp_path).pipeline_config()))
    config["plots"] = not config["plots"]  # drawing plots or not is no other demo
    stages = {"train": {"wall_s": 250.0, "cached": False, "fresh": True},
              "eval": {"wall_s": 50.0, "cached": False, "fresh": True}}
    timing = {"stages": stages, "machine_start": {"cpus": 2, "torch": "x", "loadavg_1m": 0.5}, "config": config,
              "ft_success": {"goal": 0.25, "spatial": 0.5, "object": 0.0, "long": 1.0}}  # quick: success not judged
    (tmp_path / "timing.json").write_text(json.dumps(timing))
    assert main(DemoTimeConfig(quick=True, run=False, out_dir=tmp_path)) == 0  # 300 s: exactly the target
    out = capsys.readouterr().out
    assert "wall time (cold) 300 s = 5.0 min; target ≤ 5 min: met" in out
    assert "FT expert goal     25.0%\n" in out and "MISSED" not in out
    stages["eval"]["wall_s"] = 51.0
    (tmp_path / "timing.json").write_text(json.dumps(timing))
    assert main(DemoTimeConfig(quick=True, run=False, out_dir=tmp_path)) == 1
    assert "wall time (cold) 301 s = 5.0 min; target ≤ 5 min: MISSED" in capsys.readouterr().out


def test_report_tables_of_routing_and_wall_time():
    from experiments.robot.tabletop_pipeline.report import routing_tables, timing_table

    eval_out = {
        "FT experts": {"label": "FT experts"},  # not routed: no row
        "TA": {"label": "TA + router", "first_obs_routing": {"value": {"all": 0.75}, "key": {"all": 0.5}},
               "rollout_routing": {"goal": 1.0, "long": 0.5, "all": 0.75}},
        "TIES": {"label": "TIES + router", "first_obs_routing": {"value": {"all": 0.25}},
                 "rollout_routing": {"goal": 0.0, "all": 0.0}},
    }
    per_suite, ablation = routing_tables(eval_out, ["goal", "long"])
    assert per_suite == ("| method | goal | long | all |\n|---|---:|---:|---:|\n"
                         "| TA + router | 100.0 | 50.0 | 75.0 |\n| TIES + router | 0.0 | – | 0.0 |\n")
    assert ablation == ("| method | value-only | key-only |\n|---|---:|---:|\n"
                        "| TA + router | 75.0 | 50.0 |\n| TIES + router | 25.0 | – |\n")
    assert routing_tables({"FT experts": {"label": "FT experts"}}, ["goal"]) == ("", "")
    timing = {"stages": {"data": {"wall_s": 12.34, "cached": True}, "train": {"wall_s": 900, "cached": False}}}
    assert timing_table(timing) == ("| stage | wall (s) | cached |\n|---|---:|---|\n"
                                    "| data | 12.3 | yes |\n| train | 900.0 | no |\n")


def test_the_report_counts_only_this_runs_planned_episodes_in_the_rows_order(tmp_path):
    from types import SimpleNamespace

    from experiments.robot.tabletop_pipeline.report import build_report

    def job(label, outcomes):
        f = tmp_path / f"{label}.jsonl"
        f.write_text("".join(json.dumps({"key": k, "method": label, "suite": "goal", "success": s}) + "\n"
                             for k, s in outcomes))
        return {"label": label, "files": [str(f)]}

    # goal/1/0 was rolled out by an earlier, larger plan: this run's table must not count it
    outputs = {"ta": job("TA + router", [("goal/0/0", True), ("goal/0/1", True), ("goal/1/0", False)]),
               "ties": job("TIES + router", [("goal/0/0", True), ("goal/0/1", False)])}
    results = {"eval": SimpleNamespace(outputs=outputs),
               **{k: SimpleNamespace(outputs={}) for k in ("train", "merge", "base", "data")}}
    report = build_report(SimpleNamespace(suites=["goal"]), results, {"goal/0/0", "goal/0/1"}, {},
                          ["TIES + router", "TA + router"])
    assert report["table_markdown"] == ("| method | Goal | avg |\n|---|---:|---:|\n"
                                        "| TIES + router | 50.0 | 50.0 |\n| TA + router | 100.0 | 100.0 |\n")
    assert list(report["eval"]) == ["TIES + router", "TA + router"]


def test_pipeline_config_accepts_the_edges_of_each_range():
    """The largest k_gate (the tiny model's width), every block shared or kept by the baseline, warmup one step
    below the shorter run: all valid."""
    PipelineConfig(k_gate=128, baseline_head_layers=4, expert_head_layers=3).validate()
    PipelineConfig(warmup_steps=99, expert_steps=200, joint_steps=100).validate()
    PipelineConfig(warmup_steps=500, expert_steps=200, joint_steps=100, lr_schedule="constant").validate()


def _trained(suites=SUITES):
    t = {f"{f}/{s}": {"checkpoint": f"ck/{f}/{s}", "weights_sha256": f"{f}{s}"}
         for f in ("mergevla", "baseline") for s in suites}
    return t | {"joint": {"checkpoint": "ck/joint", "weights_sha256": "j"}}


def test_merge_jobs_give_each_family_its_own_experts_and_knobs():
    from experiments.robot.tabletop_pipeline.pipeline import merge_jobs

    cfg = PipelineConfig(suites=["long", "goal"], algorithms=["ties"], unmasked_algorithms=["emr"],
                         per_task_algorithms=[], baseline_algorithms=["task_arithmetic"], expert_head_layers=1,
                         baseline_head_layers=2, router_exemplars=0)
    jobs = {j.name: j for j in merge_jobs(cfg, Path("r"), DATA, _trained(["long", "goal"]))}
    assert list(jobs) == ["mergevla-ties-masks", "mergevla-emr-nomasks", "baseline-task_arithmetic-nomasks"]
    masked, unmasked, base = jobs.values()
    assert (masked.masks, masked.routed, masked.expert_head_layers) == (True, True, 1)
    assert (unmasked.masks, unmasked.routed, unmasked.expert_head_layers) == (False, True, 1)
    assert (base.masks, base.routed, base.expert_head_layers) == (False, False, 2)  # the naive merge's own depth
    # the suites' order, each family's own checkpoints and hashes
    assert masked.experts == (("long", "ck/mergevla/long"), ("goal", "ck/mergevla/goal"))
    assert masked.expert_hashes == ("mergevlalong", "mergevlagoal")
    assert base.experts == (("long", "ck/baseline/long"), ("goal", "ck/baseline/goal"))
    assert base.expert_hashes == ("baselinelong", "baselinegoal")
    assert masked.out_dir == str(Path("r") / "merge" / "mergevla-ties-masks")


def test_eval_rows_and_their_identities_follow_the_knobs_that_matter():
    from experiments.robot.tabletop_pipeline.pipeline import eval_jobs, merge_jobs

    trained = _trained()

    def rows(**kw):
        cfg = PipelineConfig(**kw)
        jobs = merge_jobs(cfg, Path("r"), DATA, trained)
        merged = {j.name: {"dir": f"m/{j.name}", "weights_sha256": j.name, "exemplars_sha256": "e"} for j in jobs}
        return {e.name: e for e in eval_jobs(cfg, trained, merged, jobs, DATA)}

    base = rows()
    assert (base["mergevla-ties-masks"].kind, base["mergevla-ties-masks"].variant) == ("routed", "value")
    # the per-task rows roll out with the exemplar router whatever router_variant the "+ router" rows use
    assert (base["mergevla-ties-masks-pertask"].kind, base["mergevla-ties-masks-pertask"].variant) == (
        "routed", "exemplar")
    assert base["mergevla-ties-masks-pertask"].label == "MergeVLA TIES + masks, per-task action expert + exemplar router"
    assert (base["baseline-task_arithmetic-nomasks"].kind, base["baseline-task_arithmetic-nomasks"].variant) == (
        "oracle", "value")
    assert base["mergevla-ties-masks"].artifact == "m/mergevla-ties-masks"
    key = rows(router_variant="key")
    assert key["mergevla-ties-masks"].variant == "key" and key["mergevla-ties-masks"].label == (
        "MergeVLA TIES + masks + router (key subspaces)")
    changed = {n for n in base if key[n].policy_id != base[n].policy_id}  # other router: only those rows again
    assert changed == {f"mergevla-{a}-masks" for a in ("task_arithmetic", "ties", "tsv", "knots", "wudi", "emr")}
    for change in ({"seed": 1}, {"noop_steps": 2}):  # other rollouts for every row
        other = rows(**change)
        assert all(other[n].policy_id != base[n].policy_id for n in base), change
    assert set(base) - set(rows(eval_baseline_experts=False, train_joint=False, blind_replay=False)) == {
        "baseline-experts", "joint", "blind-replay"}


def test_the_eval_stage_plans_only_the_configured_episodes(tmp_path, monkeypatch):
    import experiments.robot.tabletop_pipeline.evaluation as evaluation
    from experiments.robot.tabletop_pipeline.pipeline import stage_eval

    seen = []
    monkeypatch.setattr(evaluation, "run_evals", lambda jobs, settings, workers, log: seen.append(settings) or {})
    cfg = PipelineConfig(suites=["goal", "long"], task_ids=[3, 7], trials_per_task=2, first_init_state=5,
                         algorithms=[], per_task_algorithms=[], baseline_algorithms=[], workers=1)
    res, planned, jobs = stage_eval(cfg, tmp_path, DATA, _trained(["goal", "long"]), {}, log=lambda _m: None)
    assert planned == {f"{s}/{t}/{k}" for s in ("goal", "long") for t in (3, 7) for k in (0, 1)}
    (settings,) = seen
    assert (settings.task_ids, settings.trials_per_task, settings.first_init_state) == ((3, 7), 2, 5)
    assert settings.crop_area == 1.0
    stage_eval(dataclasses.replace(cfg, image_aug=True), tmp_path, DATA, _trained(["goal", "long"]), {},
               log=lambda _m: None)
    assert seen[-1].crop_area == 0.9  # models trained on crops see the centre crop
    # the routing accuracy's truth: each episode's expert is its suite's
    assert {(e.suite, e.expected_expert) for e in evaluation.plan(["goal", "long"], [3], 1)} == {
        ("goal", "goal"), ("long", "long")}
    assert [j.name for j in jobs] == ["mergevla-experts", "baseline-experts", "joint", "blind-replay"]


def test_training_is_redone_for_other_data_or_another_base(tmp_path, monkeypatch):
    import experiments.robot.tabletop_pipeline.training as training
    from experiments.robot.tabletop_pipeline.pipeline import stage_train

    calls = []
    monkeypatch.setattr(training, "run_jobs", lambda jobs, settings, workers, log: calls.append(jobs) or {"n": len(calls)})
    cfg = PipelineConfig(suites=["goal"], expert_steps=30, joint_steps=40)

    def train(fp="fp", sha="b"):
        data = {"data_root": str(tmp_path / "d"), "joint_suite": "joint", "fingerprint": fp}
        return stage_train(cfg, tmp_path, data, {"base_dir": "base", "sha256": sha}, log=lambda _m: None)

    assert not train().cached and train().cached
    assert [(j.name, j.expert_arch, j.suite, j.steps) for j in calls[0]] == [
        ("mergevla/goal", "cross_attn", "goal", 30), ("baseline/goal", "self_attn", "goal", 30),
        ("joint", "cross_attn", "joint", 40)]
    assert not train(fp="other demos").cached
    assert not train(fp="other demos", sha="other base").cached
    assert len(calls) == 3


def test_the_data_stage_never_replaces_a_named_dir_and_rechecks_its_dataset(tmp_path):
    from experiments.robot.tabletop.demos import task_file
    from experiments.robot.tabletop_pipeline.pipeline import stage_data

    kw = dict(suites=["goal"], task_ids=[0], demos_per_task=1, workers=1)
    mine = tmp_path / "mine"
    (mine / "goal").mkdir(parents=True)  # looks like an interrupted generation, but the user named it
    with pytest.raises(PipelineError, match="refusing to replace it"):
        stage_data(PipelineConfig(out_dir=tmp_path / "run", data_dir=mine, **kw), tmp_path / "run", lambda _m: None)
    assert list(mine.iterdir()) == [mine / "goal"]
    cfg = PipelineConfig(out_dir=tmp_path / "own", **kw)
    (tmp_path / "own" / "tabletop4" / "goal").mkdir(parents=True)  # the pipeline's own: generated again
    first = stage_data(cfg, tmp_path / "own", lambda _m: None)
    assert not first.cached and first.outputs["demos"] == 1 and first.outputs["reused"] is False
    assert stage_data(cfg, tmp_path / "own", lambda _m: None).cached
    task_file(tmp_path / "own" / "tabletop4", "goal", 0).unlink()  # the dataset changed under the cached record
    again = stage_data(cfg, tmp_path / "own", lambda _m: None)
    assert not again.cached and task_file(tmp_path / "own" / "tabletop4", "goal", 0).is_file()
    assert again.outputs["fingerprint"] == first.outputs["fingerprint"]  # the same demos, made again
    (tmp_path / "own" / "data" / "stage.json").unlink()  # the record lost, the dataset kept: reused, not a cold run
    kept = stage_data(cfg, tmp_path / "own", lambda _m: None)
    assert (kept.cached, kept.outputs["reused"], kept.fresh) == (False, True, False)
    # other demos under the same file names (another seed): another fingerprint, so training is redone
    other = stage_data(dataclasses.replace(cfg, seed=1), tmp_path / "own", lambda _m: None)
    assert not other.cached and other.outputs["fingerprint"] != first.outputs["fingerprint"]


def test_a_stage_record_of_another_format_is_not_trusted(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "stage.json").write_text(json.dumps({"spec": {"a": 1}, "outputs": {"n": 0}}))
    r = Stage(tmp_path, "s", {"a": 1}).run(lambda _d: {"n": 1}, log=lambda _m: None)
    assert (r.cached, r.outputs) == (False, {"n": 1})


def test_what_a_dataset_depends_on_and_what_an_interrupted_generation_leaves(tmp_path):
    from experiments.robot.tabletop.generate import MANIFEST, GenerateConfig
    from experiments.robot.tabletop.generate import main as generate
    from experiments.robot.tabletop_pipeline.data import _differences, _what_is_there, ensure_dataset, matches

    gen = GenerateConfig(out_dir=tmp_path / "d", suites=["goal"], task_ids=[0], demos_per_task=1, pretrain_scenes=0,
                         workers=1)
    # made by the generator's CLI with --overwrite true and other workers: the same content, reused
    generate(dataclasses.replace(gen, overwrite=True, workers=2), log=lambda _m: None)
    assert matches(gen.out_dir, gen)
    manifest = json.loads((gen.out_dir / MANIFEST).read_text())
    assert _differences(manifest, gen) == []
    # a manifest from a generator that did not record a setting: not this dataset, even where the setting is None
    old = {**manifest, "config": {k: v for k, v in manifest["config"].items() if k != "task_ids"}}
    assert _differences(old, dataclasses.replace(gen, task_ids=None)) == ["task_ids not recorded (this run None)"]
    assert _differences({**manifest, "physics_version": 2}, gen)[0].startswith("physics_version 2 (this run ")
    # an owned directory after a killed generation (a joint suite and a manifest's temp beside the suites)
    killed = tmp_path / "killed"
    (killed / "goal").mkdir(parents=True)
    (killed / "joint").mkdir()
    (killed / f".{MANIFEST}.a1b2.tmp").write_text("{")
    assert _what_is_there(killed, gen).startswith("an unfinished TableTop-4 dataset")
    manifest, reused = ensure_dataset(dataclasses.replace(gen, out_dir=killed), log=lambda _m: None, owned=True)
    assert not reused and matches(killed, dataclasses.replace(gen, out_dir=killed))


def test_a_merge_jobs_identity_holds_every_knob_that_changes_its_artifact():
    from experiments.robot.tabletop_pipeline.merging import MergeJob

    job = MergeJob("m", "mergevla", "ties", True, 1, (("goal", "ck/g"), ("long", "ck/l")), ("a", "b"), "out/m")
    for change in ({"mask_lambda": 0.3}, {"seed": 1}, {"expert_hashes": ("a", "c")}, {"k_gate": 4},
                   {"experts": (("goal", "ck/g"), ("long", "ck/other"))}, {"masks": False}, {"expert_head_layers": 2},
                   {"per_task_parts": ("action_queries",)}, {"params": {"k": 50.0}}, {"algorithm": "emr"}):
        assert dataclasses.replace(job, **change).spec() != job.spec(), change
    # where it is written and how it is rolled out are not what it is
    assert dataclasses.replace(job, out_dir="elsewhere", name="n", routed=False).spec() == job.spec()


def test_results_files_of_other_weights_are_discarded_and_every_job_must_be_complete(tmp_path):
    from experiments.robot.harness import ResultsError
    from experiments.robot.tabletop_pipeline.evaluation import load_rows, results_complete, results_of

    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("".join(json.dumps({"key": k, "policy_id": p}) + "\n" for k, p in (("goal/0/0", "a"),
                                                                                        ("goal/0/1", "b"))))
    assert results_of(mixed, "a", log=lambda _m: None) == mixed and not mixed.exists()  # any other row: all gone
    mine = tmp_path / "mine.jsonl"
    mine.write_text(json.dumps({"key": "goal/0/0", "policy_id": "a"}) + "\n")
    assert results_of(mine, "a", log=lambda _m: None).exists()
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"key": "goal/1/0", "policy_id": "b"}) + "\n")
    results = {"full": {"files": [str(mine)]}, "short": {"files": [str(short)]}}
    assert results_complete({"full": results["full"]}, {"goal/0/0"})
    assert not results_complete(results, {"goal/0/0"})  # one job short of a planned episode
    # a record without a policy id still needs each file to be one policy's
    with open(mine, "a") as f:
        f.write(json.dumps({"key": "goal/0/1", "policy_id": "z"}) + "\n")
    with pytest.raises(ResultsError, match=r"holds rows of policies \['a', 'z'\]"):
        load_rows({"old": {"label": "TA", "files": [str(mine)]}})


def test_the_oracle_policy_logs_the_given_task_not_a_routing():
    from experiments.robot.tabletop_pipeline.evaluation import OraclePolicy

    class Inner:
        ended = None

        def start_episodes(self, first_obs, instructions, episode_ids=None):
            self.started = (list(instructions), episode_ids)
            return [{"routed_expert": "goal", "scores": [1.0]} for _ in first_obs]

        def end_episodes(self, episode_ids):
            self.ended = list(episode_ids)

        def act(self, obs, instructions, episode_ids):
            return np.ones((len(obs), 8, 7))

    inner = Inner()
    p = OraclePolicy(inner)
    assert p.start_episodes([{}, {}], ["a", "b"], [0, 1]) == [{"oracle_task": "goal"}, {"oracle_task": "goal"}]
    assert inner.started == (["a", "b"], [0, 1])  # the episodes' ids passed on
    assert p.act([{}], ["a"], [0]).shape == (1, 8, 7)
    p.end_episodes([0, 1])
    assert inner.ended == [0, 1]


def test_every_demo_knob_reaches_the_pipeline():
    from experiments.robot.demo import DataKnobs, EvalKnobs, MergeKnobs, TrainKnobs

    cfg = DemoConfig(
        quick=True, seed=3, out_dir=Path("o"), workers=5, base_dir=Path("b"), suites=["long", "goal"],
        data=DataKnobs(task_ids=[4], demos_per_task=9, demo_noise=0.2, data_dir=Path("dd")),
        train=TrainKnobs(expert_steps=11, joint_steps=12, batch_size=3, lr=2e-3, lr_schedule="linear", warmup_steps=4,
                         min_lr_ratio=0.3, weight_decay=0.05, max_grad_norm=2.0, image_aug=True, action_loss="l1",
                         joint=False),
        merge=MergeKnobs(algorithms=["ties"], unmasked_algorithms=["tsv"], per_task_algorithms=["emr"],
                         router_exemplars=7, baseline_algorithms=["dare"], mask_lambda=0.4, k_gate=6,
                         expert_head_layers=2, baseline_head_layers=3),
        eval=EvalKnobs(trials_per_task=5, first_init_state=6, num_envs=7, noop_steps=2, router_variant="key",
                       baseline_experts=False, blind_replay=False, video_episodes=["goal/4/0"], plots=False))
    got = dataclasses.asdict(cfg.pipeline_config())
    want = dict(out_dir=Path("o"), seed=3, workers=5, base_dir=Path("b"), suites=["long", "goal"], task_ids=[4],
                data_dir=Path("dd"), demos_per_task=9, demo_noise=0.2, expert_steps=11, joint_steps=12, batch_size=3,
                lr=2e-3, lr_schedule="linear", warmup_steps=4, min_lr_ratio=0.3, weight_decay=0.05,
                max_grad_norm=2.0, image_aug=True, action_loss="l1", train_joint=False, algorithms=["ties"],
                unmasked_algorithms=["tsv"], per_task_algorithms=["emr"], router_exemplars=7, mask_lambda=0.4,
                k_gate=6, expert_head_layers=2, baseline_algorithms=["dare"], baseline_head_layers=3,
                trials_per_task=5, first_init_state=6, num_envs=7, noop_steps=2, router_variant="key",
                eval_baseline_experts=False, blind_replay=False, video_episodes=["goal/4/0"], plots=False)
    assert got == want  # every PipelineConfig field set from its knob (none left at the pipeline's default)


@pytest.mark.parametrize("error", ["PipelineError", "MergeError", "DemoFailure", "ResultsError"])
def test_the_demo_reports_a_run_that_cannot_go_on_in_one_line(monkeypatch, capsys, error):
    import experiments.robot.demo as demo
    from experiments.robot.harness import ResultsError
    from experiments.robot.tabletop.demos import DemoFailure
    from model_merging.errors import MergeError

    exc = {"PipelineError": PipelineError, "MergeError": MergeError, "DemoFailure": DemoFailure,
           "ResultsError": ResultsError}[error]  # exit 2 with the message, no traceback
    monkeypatch.setattr(demo, "run_pipeline", lambda cfg: (_ for _ in ()).throw(exc("the run cannot go on")))
    monkeypatch.setattr(sys, "argv", ["demo", "--quick", "true"])
    assert demo.cli() == 2
    assert capsys.readouterr().err == "demo: error: the run cannot go on\n"


def test_every_first_observation_is_routed_under_every_variant_across_batches():
    from types import SimpleNamespace

    import torch

    from experiments.robot.tabletop_pipeline.evaluation import route_all_variants

    tasks = ["goal", "long", "object"]

    class Merged:  # scores favour task (pixel value mod 3) under "value", the next task under "key"
        router_variants = ("value", "key")
        task_names = tasks
        config = SimpleNamespace(proprio_dim=8)

        def multi_expert(self):
            def processor(instr, images, proprio):  # each image comes with its own instruction
                ids = images[:, 0, 0, 0, 0].astype(int)
                assert [f"i{i}" for i in ids] == instr and proprio.shape == (len(ids), 8)
                return ids

            return SimpleNamespace(processor=processor)

        def candidate_states(self, ids):
            return ids

        def candidate_scores(self, ids, variant):
            shift = {"value": 0, "key": 1}[variant]
            return torch.nn.functional.one_hot(torch.as_tensor((ids + shift) % 3), 3)

    obs = [{"agentview_image": np.full((4, 4, 3), i, np.uint8), "robot0_eye_in_hand_image": np.zeros((4, 4, 3), np.uint8)}
           for i in range(7)]
    policy = SimpleNamespace(merged=Merged(), image_transform=None)
    got = route_all_variants(policy, obs, [f"i{i}" for i in range(7)], batch_size=3)  # batches of 3, 3, 1
    assert got == {"value": [tasks[i % 3] for i in range(7)], "key": [tasks[(i + 1) % 3] for i in range(7)]}
    # the frames as the policy shows them (its centre crop), not as rendered
    shown = SimpleNamespace(merged=Merged(), image_transform=lambda img: img + 1)
    assert route_all_variants(shown, obs[:2], ["i1", "i2"])["value"] == ["long", "object"]


def test_the_eval_env_factory_renders_at_its_image_size():
    from experiments.robot.tabletop_pipeline.evaluation import TableTopEnvFactory

    obs = TableTopEnvFactory(image_size=32)("goal", 0, 0).reset()
    assert obs["agentview_image"].shape == obs["robot0_eye_in_hand_image"].shape == (32, 32, 3)
    assert TableTopEnvFactory()("goal", 0, 0).reset()["agentview_image"].shape == (64, 64, 3)


def test_the_eval_plan_starts_each_trial_at_its_own_init_state_with_its_suites_names_and_horizon():
    from experiments.robot.tabletop import SUITE_MAX_STEPS, get_suite
    from experiments.robot.tabletop_pipeline.evaluation import plan

    episodes = plan(["goal", "long"], [3, 7], 2, first_init_state=5)
    assert [e.key for e in episodes] == [f"{s}/{t}/{k}" for s in ("goal", "long") for t in (3, 7) for k in (0, 1)]
    assert [e.init_state_id for e in episodes] == [5, 6] * 4  # trial k from init state first + k
    assert {e.suite: e.max_steps for e in episodes} == {"goal": SUITE_MAX_STEPS["goal"], "long": SUITE_MAX_STEPS["long"]}
    assert SUITE_MAX_STEPS["goal"] != SUITE_MAX_STEPS["long"]
    assert [e.task for e in episodes if e.suite == "long"] == [get_suite("long")[t].instruction for t in (3, 3, 7, 7)]
    assert len(plan(["object"], None, 1)) == len(get_suite("object"))  # no task ids: every task


def _fake_eval(monkeypatch):
    """run_eval with every model and rollout faked: what each call got, and rows made up from its episodes."""
    import experiments.robot.policy as policy_mod
    import experiments.robot.tabletop_pipeline.blind_replay as blind_replay
    import experiments.robot.tabletop_pipeline.evaluation as evaluation
    import model_merging
    import model_merging.routed_policy as routed_policy
    import prismatic.models as models

    calls = []

    class Model:
        def __init__(self, d):
            self.dir = d

        def eval(self):
            return self

    class Policy:
        def __init__(self, *args, **kw):
            self.args, self.kw = args, kw

    def run_episodes(factory, policy, eps, path, **kw):
        calls.append({"factory": factory, "policy": policy, "eps": list(eps), "path": Path(path), **kw})
        rows = [{"key": e.key, "suite": e.suite, "success": e.trial == 0, "steps": 10 + e.task_id,
                 "expected_expert": e.expected_expert, "routed_expert": "goal"} for e in eps]
        if kw.get("video_dir"):
            for r in rows:
                r["video"] = str(Path(kw["video_dir"]) / f"{r['key'].replace('/', '-')}.mp4")
        return rows

    monkeypatch.setattr(models, "from_pretrained", Model)
    monkeypatch.setattr(policy_mod, "VLAPolicy", Policy)
    monkeypatch.setattr(model_merging, "load_merged", lambda a: f"merged:{a}")
    monkeypatch.setattr(routed_policy, "RoutedPolicy", Policy)
    monkeypatch.setattr(blind_replay, "ReplayPolicy", Policy)
    monkeypatch.setattr(evaluation, "run_episodes", run_episodes)
    monkeypatch.setattr(evaluation, "first_observations", lambda eps, s: ([{}] * len(eps), ["i"] * len(eps)))
    # value routes every first observation to its suite, key everything to "long"
    monkeypatch.setattr(evaluation, "route_all_variants", lambda p, obs, instr: {
        "value": [e.suite for e in evaluation.plan(("goal", "long"), (1,), 2)], "key": ["long"] * len(obs)})
    return calls


def _eval_settings(tmp_path, **kw):
    from experiments.robot.tabletop_pipeline.evaluation import EvalSettings

    return EvalSettings(**{**dict(suites=("goal", "long"), task_ids=(1,), trials_per_task=2, first_init_state=3,
                                  num_envs=3, noop_steps=2, seed=9, image_size=32, crop_area=0.9,
                                  out_dir=str(tmp_path)), **kw})


def test_each_eval_kind_rolls_out_its_own_policy_per_suite_with_the_settings(tmp_path, monkeypatch):
    from experiments.robot.tabletop_pipeline.evaluation import EvalJob, OraclePolicy, run_eval

    calls = _fake_eval(monkeypatch)
    s = _eval_settings(tmp_path)
    # a results file of other weights is discarded before the rollouts
    (tmp_path / "ft").mkdir()
    (tmp_path / "ft" / "long.jsonl").write_text(json.dumps({"key": "long/1/0", "policy_id": "old"}) + "\n")
    ft = run_eval(EvalJob("ft", "FT experts", "experts", "p1", (("long", "ck/l"), ("goal", "ck/g"))), s)
    assert not (tmp_path / "ft" / "long.jsonl").exists()
    assert [(c["policy"].args[0].dir, [e.key for e in c["eps"]], c["path"]) for c in calls] == [
        ("ck/g", ["goal/1/0", "goal/1/1"], tmp_path / "ft" / "goal.jsonl"),
        ("ck/l", ["long/1/0", "long/1/1"], tmp_path / "ft" / "long.jsonl")]
    c = calls[0]
    assert [e.init_state_id for e in c["eps"]] == [3, 4]
    assert (c["num_envs"], c["num_workers"], c["seed"], c["run_info"]) == (
        3, 0, 9, {"method": "FT experts", "policy_id": "p1"})
    assert (c["protocol"].num_noop_steps, c["factory"].image_size, c["policy"].args[1].area) == (2, 32, 0.9)
    assert (ft["episodes"], ft["success"], ft["env_steps"], ft["files"]) == (
        4, 0.5, 44, [str(tmp_path / "ft" / "goal.jsonl"), str(tmp_path / "ft" / "long.jsonl")])
    assert "rollout_routing" not in ft and "first_obs_routing" not in ft and "videos" not in ft

    calls.clear()
    single = run_eval(EvalJob("joint", "Joint", "single", "p2", (("all", "ck/j"),)), s)
    ((c,),) = [calls]
    assert (c["policy"].args[0].dir, len(c["eps"]), c["path"]) == ("ck/j", 4, tmp_path / "joint.jsonl")
    assert single["files"] == [str(tmp_path / "joint.jsonl")]

    calls.clear()
    run_eval(EvalJob("blind", "Blind", "blind", "p3", demos=(4, 0.2)), s)
    assert [(c["policy"].args, c["policy"].kw, c["eps"][0].suite) for c in calls] == [
        (("goal", 4, 0.2), {"open_loop_steps": 8}, "goal"), (("long", 4, 0.2), {"open_loop_steps": 8}, "long")]

    calls.clear()
    oracle = run_eval(EvalJob("base", "Baseline", "oracle", "p4", artifact="m/base"), s)
    assert all(isinstance(c["policy"], OraclePolicy) for c in calls)
    assert [(c["policy"].inner.args[0], c["policy"].inner.kw["force_task"], c["eps"][0].suite, c["path"])
            for c in calls] == [("merged:m/base", x, x, tmp_path / "base" / f"{x}.jsonl") for x in ("goal", "long")]
    assert calls[0]["policy"].inner.args[1].area == 0.9 and "rollout_routing" not in oracle

    with pytest.raises(ValueError, match="unknown evaluation kind 'nope'"):
        run_eval(EvalJob("x", "X", "nope", "p5"), s)


def test_a_routed_row_scores_its_router_on_first_observations_and_in_its_rollouts(tmp_path, monkeypatch):
    from experiments.robot.tabletop_pipeline.evaluation import EvalJob, run_eval

    calls = _fake_eval(monkeypatch)
    r = run_eval(EvalJob("ta", "TA + router", "routed", "p", artifact="m/ta", variant="key"), _eval_settings(tmp_path))
    ((c,),) = [calls]
    assert (c["policy"].args[0], c["policy"].kw["variant"], len(c["eps"]), c["path"]) == (
        "merged:m/ta", "key", 4, tmp_path / "ta.jsonl")
    assert r["first_obs_routing"] == {"value": {"goal": 1.0, "long": 1.0, "all": 1.0},
                                      "key": {"goal": 0.0, "long": 1.0, "all": 0.5}}
    assert r["rollout_routing"] == {"goal": 1.0, "long": 0.0, "all": 0.5}  # the rows' routed_expert: always goal
    written = json.loads((tmp_path / "ta.routing.json").read_text())
    assert written == {"method": "TA + router", "policy_id": "p", "episodes": ["goal/1/0", "goal/1/1", "long/1/0",
                       "long/1/1"], "routed": {"value": ["goal", "goal", "long", "long"], "key": ["long"] * 4},
                       "accuracy": r["first_obs_routing"]}


def test_chosen_episodes_are_recorded_again_and_videos_of_other_weights_are_dropped(tmp_path, monkeypatch):
    from experiments.robot.harness.video import video_name
    from experiments.robot.tabletop_pipeline.evaluation import EvalJob, run_eval

    calls = _fake_eval(monkeypatch)
    s = _eval_settings(tmp_path, video_episodes=("goal/1/0", "long/*/1"), video_scale=2)
    vdir = tmp_path / "videos" / "ft"
    vdir.mkdir(parents=True)
    stale = [vdir / video_name("goal", 1, 0, ok) for ok in (True, False)]
    other = vdir / video_name("goal", 1, 1, True)  # not chosen now, yet also of other weights
    kept = vdir / video_name("spatial", 1, 0, True)  # a suite this row does not evaluate
    for p in [*stale, other, kept]:
        p.write_bytes(b"old")
    job = EvalJob("ft", "FT experts", "experts", "p1", (("goal", "ck/g"), ("long", "ck/l")))
    r = run_eval(job, s)
    assert r["videos"] == [str(vdir / "goal-1-0.mp4"), str(vdir / "long-1-1.mp4")]
    assert len(calls) == 4 and [[e.key for e in c["eps"]] for c in calls[2:]] == [["goal/1/0"], ["long/1/1"]]
    v = calls[2]
    assert (v["path"], v["video_dir"], v["video_episodes"], v["seed"], v["num_envs"], v["policy"]) == (
        vdir / "goal.jsonl", vdir, ("goal/1/0", "long/*/1"), 9, 3, calls[0]["policy"])
    assert (v["protocol"].num_noop_steps, v["protocol"].video_fps, calls[3]["path"]) == (2, 10, vdir / "long.jsonl")
    cams = {"agentview_image": np.zeros((2, 3, 3), np.uint8), "robot0_eye_in_hand_image": np.ones((2, 3, 3), np.uint8)}
    assert v["frame_fn"](cams).shape == (4, 12, 3)  # both cameras, video_scale 2
    assert not any(p.exists() for p in [*stale, other]) and kept.exists()

    # recorded by these weights: the MP4s stay, chosen now or not; by other weights: their rows and MP4s go
    (vdir / "goal.jsonl").write_text(json.dumps({"key": "goal/1/0", "policy_id": "p1"}) + "\n")
    stale[0].write_bytes(b"mine")
    other.write_bytes(b"mine")
    run_eval(job, s)
    assert stale[0].exists() and other.exists() and (vdir / "goal.jsonl").exists()
    run_eval(dataclasses.replace(job, policy_id="p2"), s)
    assert not stale[0].exists() and not other.exists() and not (vdir / "goal.jsonl").exists() and kept.exists()


def test_first_observations_are_what_the_policy_sees_after_the_noop_steps(monkeypatch):
    import experiments.robot.tabletop_pipeline.evaluation as evaluation

    made, actions = [], []

    class Env:  # each observation tells how many steps it follows
        def __init__(self, suite, task_id, init_state_id):
            self.instruction, self.n = f"{suite} {task_id} {init_state_id}", 0

        def reset(self):
            return {"steps": 0}

        def step(self, action):
            actions.append(list(action))
            self.n += 1
            return {"steps": self.n}, 0.0, False, {}

    def factory(image_size):
        made.append(image_size)
        return Env

    monkeypatch.setattr(evaluation, "TableTopEnvFactory", factory)
    episodes = evaluation.plan(["goal", "long"], [2], 2, first_init_state=4)
    obs, instr = evaluation.first_observations(episodes, _eval_settings(Path("."), noop_steps=3, image_size=32))
    assert obs == [{"steps": 3}] * 4 and made == [32]
    assert instr == ["goal 2 4", "goal 2 5", "long 2 4", "long 2 5"]  # each episode's own env
    assert actions == [[0, 0, 0, 0, 0, 0, -1.0]] * 12  # the protocol's no-op: gripper open


def _report_inputs(tmp_path):
    from types import SimpleNamespace

    def job(label, outcomes, **extra):
        f = tmp_path / f"{label}.jsonl"
        f.write_text("".join(json.dumps({"key": k, "method": label, "suite": k.split("/")[0], "success": ok,
                                         "task_id": int(k.split("/")[1]), "expected_expert": k.split("/")[0],
                                         "routed_expert": "goal"}) + "\n" for k, ok in outcomes))
        return {"label": label, "files": [str(f)], **extra}

    routing = {"first_obs_routing": {"value": {"all": 0.5}, "exemplar": {"all": 1.0}},
               "rollout_routing": {"goal": 1.0, "long": 0.0, "all": 0.5}}
    outputs = {"ft": job("FT experts", [("long/0/1", True), ("goal/0/0", True), ("goal/0/1", False),
                                       ("long/0/0", True)]),
               "ta": job("TA + router", [("goal/0/0", True), ("long/0/0", False)], **routing)}
    train = {n: {"name": n, "steps": 10, "final_loss": 0.5, "wall_s": 2.0, "steps_per_s": 5.0}
             for n in ("joint", "baseline/long", "mergevla/long", "mergevla/goal", "other")}
    results = {"eval": SimpleNamespace(outputs=outputs), "train": SimpleNamespace(outputs=train),
               "merge": SimpleNamespace(outputs={"m": 1}), "base": SimpleNamespace(outputs={"b": 2}),
               "data": SimpleNamespace(outputs={"d": 3})}
    cfg = SimpleNamespace(suites=["goal", "long"], task_ids=[0], trials_per_task=2, demos_per_task=5, expert_steps=30,
                          joint_steps=40, batch_size=4, action_loss="l1", seed=7, router_variant="key", plots=False)
    timing = {"started": "2026-01-01T00:00:00+00:00", "total_wall_s": 99.4,
              "stages": {"train": {"wall_s": 90.0, "cached": False}, "eval": {"wall_s": 9.4, "cached": True}},
              "machine_start": {"cpus": 2, "platform": "Linux", "torch": "2.x", "loadavg_1m": 0.25},
              "machine_end": {"cpus": 2, "platform": "Linux", "torch": "2.x", "loadavg_1m": 1.5}}
    return cfg, results, timing


PLANNED = {"goal/0/0", "goal/0/1", "long/0/0", "long/0/1"}


def test_the_demo_table_renders_every_section_of_the_run():
    import tempfile

    from experiments.robot.tabletop_pipeline.report import build_report, render

    cfg, results, timing = _report_inputs(Path(tempfile.mkdtemp()))
    report = build_report(cfg, results, PLANNED, timing, ["FT experts", "TA + router"]) | {"timing": timing}
    assert (report["merge"], report["base"], report["data"]) == ({"m": 1}, {"b": 2}, {"d": 3})
    assert [(r["method"], r["key"]) for r in report["rows"]] == [  # by row, then episode, whatever the files' order
        ("FT experts", k) for k in sorted(PLANNED)] + [("TA + router", "goal/0/0"), ("TA + router", "long/0/0")]
    assert render(cfg, report) == (
        "# TableTop-4 demo (2026-01-01T00:00:00+00:00)\n\n"
        "Suites goal, long; tasks per suite: 1 (0); 2 episode(s) per task (2 per suite and row); 5 demos per task; "
        "30 steps per expert, 40 for the joint model (batch 4, L1 action loss); seed 7.\n\n"
        "## Success rate (%)\n\n| method | Goal | Long | avg |\n|---|---:|---:|---:|\n"
        "| FT experts | 50.0 | 100.0 | 75.0 |\n| TA + router | 100.0 | 0.0 | 50.0 |\n\n"
        "## Routing accuracy (%) per suite (first observation of each rollout, routed as the row says: "
        "\"+ router\" = key-only)\n\n| method | goal | long | all |\n|---|---:|---:|---:|\n"
        "| TA + router | 100.0 | 0.0 | 50.0 |\n\n"
        "## Router variants (%, all suites, first observations)\n\n"
        "| method | value-only | exemplar (beyond the paper) |\n|---|---:|---:|\n| TA + router | 50.0 | 100.0 |\n\n"
        "## Training\n\n| run | steps | final L1 loss | wall (s) | steps/s |\n|---|---:|---:|---:|---:|\n"
        + "".join(f"| {n} | 10 | 0.5 | 2.0 | 5.0 |\n" for n in ("mergevla/goal", "mergevla/long", "baseline/long",
                                                              "joint", "other"))  # in job order, others last
        + "\n## Wall time\n\n| stage | wall (s) | cached |\n|---|---:|---|\n| train | 90.0 | no |\n"
        "| eval | 9.4 | yes |\n\nTotal 99 s on 2 CPU(s) (Linux; torch 2.x), load average 0.25 at the start and "
        "1.50 at the end.\n")
    # every task, and no routed row: no routing sections
    del results["eval"].outputs["ta"]
    cfg.task_ids = None
    text = render(cfg, build_report(cfg, results, PLANNED, timing, ["FT experts"]) | {"timing": timing})
    assert "tasks per suite: all 10;" in text and "## Rout" not in text


def test_the_report_files_hold_this_runs_table_routing_and_timing(tmp_path):
    from experiments.robot.tabletop_pipeline.report import build_report, render, write_report

    cfg, results, timing = _report_inputs(tmp_path)
    report = build_report(cfg, results, PLANNED, timing, ["FT experts", "TA + router"]) | {"timing": timing}
    root = tmp_path / "run"
    (root / "summary").mkdir(parents=True)
    (root / "summary" / "routing_an_earlier_row.png").write_bytes(b"stale")
    logged = []
    write_report(cfg, report, root, log=logged.append)
    assert (root / "demo_table.md").read_text() == render(cfg, report) and logged[0] == "\n" + render(cfg, report)
    assert sorted(p.name for p in (root / "summary").iterdir() if not p.name.startswith(".")) == [
        "results.csv", "results.md", "results_by_task.csv"]  # no plots asked for; the earlier run's plot gone
    assert json.loads((root / "routing.json").read_text()) == {"TA + router": {
        "first_obs": {"value": {"all": 0.5}, "exemplar": {"all": 1.0}},
        "rollouts": {"goal": 1.0, "long": 0.0, "all": 0.5}}}
    written = json.loads((root / "timing.json").read_text())
    assert written["ft_success"] == {"goal": 0.5, "long": 1.0} and written["stages"] == timing["stages"]
    assert written["success_pct"] == {"FT experts": {"goal": 50.0, "long": 100.0},
                                      "TA + router": {"goal": 100.0, "long": 0.0}}
    write_report(cfg, report, root, log=logged.append)  # a second run adds a line to the history
    history = [json.loads(x) for x in (root / "timing_history.jsonl").read_text().splitlines()]
    assert len(history) == 2 and history[1]["ft_success"] == {"goal": 0.5, "long": 1.0}
    assert (history[1]["total_wall_s"], history[1]["loadavg_1m_start"], history[1]["stages"]) == (
        99.4, 0.25, timing["stages"])


def test_a_merge_spec_holds_every_hyper_parameter_defaults_included():
    from experiments.robot.tabletop_pipeline.merging import MergeJob
    from model_merging import get_method

    job = MergeJob("m", "mergevla", "ties", True, 1, (("goal", "ck/g"),), ("a",), "out/m")
    defaults = dataclasses.asdict(get_method("ties").params())
    assert defaults and job.spec()["params"] == defaults  # a changed default redoes the merge
    assert dataclasses.replace(job, params={"k": 50.0}).spec()["params"] == {**defaults, "k": 50.0}


def _fake_merge(monkeypatch):
    """merge_experts and the exemplar calibration faked: the artifact is a manifest, its exemplars a file."""
    from types import SimpleNamespace

    import model_merging
    import model_merging.exemplar_router as exemplar_router
    import model_merging.exemplars as exemplars
    import model_merging.merged_model as merged_model

    seen = {"merges": [], "calibrations": []}

    def merge_experts(experts, out, opts, log=None):
        assert not out.exists()  # as the real one: it refuses an existing directory
        seen["merges"].append((experts, opts))
        out.mkdir()
        (out / "manifest.json").write_text(json.dumps({"weights_sha256": f"w{len(seen['merges'])}",
                                                       "masks": {"stats": {"selfish_ratio": 0.25}}}))

    def calibrate(merged, sources, per_task, view):
        seen["calibrations"].append((sources, per_task, view))
        return "exemplars", "provenance"

    def write_exemplars(merged, ex, provenance, view):
        (merged.dir / "exemplars.json").write_text(json.dumps({"weights_sha256": "e1"}))

    monkeypatch.setattr(model_merging, "merge_experts", merge_experts)
    monkeypatch.setattr(exemplar_router, "calibrate", calibrate)
    monkeypatch.setattr(exemplars, "write_exemplars", write_exemplars)
    monkeypatch.setattr(exemplars, "exemplar_record", lambda d: json.loads((Path(d) / "exemplars.json").read_text())
                        if (Path(d) / "exemplars.json").is_file() else None)
    monkeypatch.setattr(merged_model, "load_merged", lambda out, exemplars=True: SimpleNamespace(
        dir=Path(out), task_names=["goal", "long"]))
    return seen


def test_an_exemplar_merge_is_calibrated_recorded_reused_and_redone_when_its_exemplars_change(tmp_path, monkeypatch):
    from experiments.robot.tabletop_pipeline.merging import MergeJob, run_merge, run_merges
    from model_merging.exemplar_router import DataSource
    from model_merging.exemplars import FrameView

    seen = _fake_merge(monkeypatch)
    job = MergeJob("m", "mergevla", "ties", True, 1, (("goal", "ck/g"), ("long", "ck/l")), ("a", "b"),
                   str(tmp_path / "m"), exemplars=3, data_root="data", crop_area=0.81, variant="exemplar")
    r = run_merge(job)
    assert {k: v for k, v in r.items() if k != "wall_s"} == {
        "name": "m", "label": "MergeVLA TIES + masks + exemplar router", "dir": str(tmp_path / "m"),
        "weights_sha256": "w1", "exemplars_sha256": "e1", "selfish_ratio": 0.25, "cached": False}
    ((sources, per_task, view),) = seen["calibrations"]
    assert sources == {t: DataSource(Path("data"), t) for t in ("goal", "long")}
    assert (per_task, view) == (3, FrameView("crop", 0.81))  # the frames as the rollouts show them
    assert json.loads((tmp_path / "m.spec.json").read_text()) == job.spec() | {"exemplars_sha256": "e1"}
    assert run_merge(job)["cached"] is True and len(seen["merges"]) == 1
    (tmp_path / "m" / "exemplars.json").write_text(json.dumps({"weights_sha256": "by hand"}))
    assert run_merge(job)["cached"] is False and len(seen["merges"]) == 2  # not the exemplars it recorded
    # without exemplars: none recorded, and none of the earlier artifact's left behind
    plain = run_merge(dataclasses.replace(job, exemplars=0))
    assert (plain["exemplars_sha256"], plain["weights_sha256"], len(seen["calibrations"])) == (None, "w3", 2)

    # the jobs' results in the jobs' order, each logged once
    logged = []
    other = dataclasses.replace(job, name="n", out_dir=str(tmp_path / "n"), exemplars=0, masks=False)
    out = run_merges([other, job], workers=1, log=logged.append)
    assert list(out) == ["n", "m"] and out["m"]["cached"] is False and out["n"]["weights_sha256"] == "w4"
    assert [m.split(" in ")[0] for m in logged] == ["[merge] MergeVLA TIES (no masks) + exemplar router: merged",
                                                   "[merge] MergeVLA TIES + masks + exemplar router: merged"]
    assert logged[0].endswith(", selfish ratio 0.250")
    assert run_merges([job], workers=1, log=logged.append)["m"]["cached"] and logged[-1].startswith(
        "[merge] MergeVLA TIES + masks + exemplar router: reused in ")


def test_merge_labels_name_the_family_masks_expert_and_router():
    from experiments.robot.tabletop_pipeline.merging import MergeJob

    job = MergeJob("m", "mergevla", "knots", True, 1, (), (), "out/m")
    assert job.label == "MergeVLA KnOTS + masks + router"  # no variant: the value router
    assert dataclasses.replace(job, variant="key_value").label == "MergeVLA KnOTS + masks + router (key_value subspaces)"
    assert dataclasses.replace(job, masks=False, routed=False, algorithm="new").label == "MergeVLA new (no masks), task given"
    assert dataclasses.replace(job, per_task_parts=("action_queries",), variant="exemplar").label == (
        "MergeVLA KnOTS + masks, per-task action expert + exemplar router")
    base = dataclasses.replace(job, family="baseline", algorithm="task_arithmetic", masks=False)
    assert base.label == "Baseline TA, no masks (self-attn)"
    assert dataclasses.replace(base, masks=True).label == "Baseline TA + masks (self-attn)"


def test_eval_jobs_run_routed_rows_first_and_come_back_in_the_jobs_order(monkeypatch, tmp_path):
    import experiments.robot.tabletop_pipeline.evaluation as evaluation

    ran = []

    def run_eval(job, settings):
        ran.append(job.name)
        r = {"name": job.name, "label": job.label, "success": 0.5, "episodes": 4, "wall_s": 3.2}
        if job.kind == "routed":
            r |= {"first_obs_routing": {"value": {"all": 1.0}, "key": {"all": 0.5}},
                  "videos": [str(tmp_path / "v" / "ta" / "a.mp4"), str(tmp_path / "v" / "ta" / "b.mp4")]}
        return r

    monkeypatch.setattr(evaluation, "run_eval", run_eval)
    jobs = [evaluation.EvalJob("ft", "FT experts", "experts", "p"), evaluation.EvalJob("ta", "TA", "routed", "q")]
    logged = []
    out = evaluation.run_evals(jobs, _eval_settings(tmp_path), workers=1, log=logged.append)
    assert ran == ["ta", "ft"] and list(out) == ["ft", "ta"]  # the slowest first; the table's order back
    assert logged == ["[eval] TA: 50.0% of 4 episodes in 3s, routing value=100% key=50%, 2 video(s) in "
                      f"{tmp_path / 'v' / 'ta'}", "[eval] FT experts: 50.0% of 4 episodes in 3s"]


def test_a_results_file_wholly_of_other_weights_is_refused_and_every_file_counts(tmp_path):
    from experiments.robot.harness import ResultsError
    from experiments.robot.tabletop_pipeline.evaluation import load_rows, results_of

    files = []
    for suite in ("goal", "long"):
        files.append(tmp_path / f"{suite}.jsonl")
        files[-1].write_text(json.dumps({"key": f"{suite}/0/0", "policy_id": "a"}) + "\n")
    job = {"label": "FT experts", "policy_id": "a", "files": [str(f) for f in files]}
    assert [r["key"] for r in load_rows({"ft": job})] == ["goal/0/0", "long/0/0"]
    with pytest.raises(ResultsError, match=r"long.jsonl holds rows of policies \['a'\]; FT experts is b"):
        load_rows({"ft": job | {"policy_id": "b", "files": [str(files[1])]}})
    logged = []
    results_of(files[0], "b", log=logged.append)
    assert logged == [f"[eval] {files[0]}: discarding 1 episode(s) of other weights or settings (policy a, now b)"]
    # a file mixing the current weights' rows with others' names the others, not whichever row came first
    files[1].write_text("".join(json.dumps({"key": f"long/0/{i}", "policy_id": p}) + "\n"
                                for i, p in enumerate("bcb")))
    results_of(files[1], "b", log=logged.append)
    assert logged[1] == f"[eval] {files[1]}: discarding 3 episode(s) of other weights or settings (policy c, now b)"
    assert not files[1].exists()
