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
