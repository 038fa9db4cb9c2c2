"""The whole TableTop-4 experiment, stage by stage, each stage cached in `out_dir`.

    data     generate the demonstrations (or reuse them) and the joint suite        <out_dir>/tabletop4
    base     check the pretrained tiny base (shipped in pretrained_models/)         <out_dir>/base
    train    4 MergeVLA experts, 4 self-attention baseline experts, 1 joint model   <out_dir>/train
    merge    MergeVLA experts with every algorithm (+ masks, router exemplars);     <out_dir>/merge
             naive baseline
    eval     roll out every row on TableTop-4; router accuracy per suite            <out_dir>/eval
    report   the table (markdown, CSV, PNG), routing accuracy, wall time            <out_dir>/summary, timing.json

`run_pipeline(PipelineConfig)` returns the report. Everything is seeded by `seed`; all experts (and the joint
model) use that seed, so they start from the same trainable weights on the same base.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
import typing
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from experiments.robot.harness.summary import BASELINE_FT_METHOD, FT_METHOD
from experiments.robot.tabletop_pipeline.stages import Stage, fingerprint, jsonable

SUITES = ("spatial", "object", "goal", "long")
DEMO_ALGORITHMS = ("task_arithmetic", "ties", "tsv", "knots", "wudi", "emr")
PER_TASK_ALGORITHMS = ("task_arithmetic", "ties", "emr")
FT_LABEL = FT_METHOD  # listed first in tables
BASELINE_FT_LABEL = BASELINE_FT_METHOD
JOINT_LABEL = "Joint multi-task (upper reference)"
BLIND_LABEL = "Blind replay of a demo (reference, no observations)"
DEFAULT_BASE_DIR = Path("pretrained_models/tabletop4-tiny-base")


class PipelineError(RuntimeError):
    """A stage cannot run (missing base, bad setting)."""


@dataclass
class PipelineConfig:
    out_dir: Path = Path("runs/demo")
    seed: int = 0  # data, initialisation (the same for every expert), data order, merges, rollouts
    workers: int = 2  # processes for data generation, training, merging and rollouts
    base_dir: Path = DEFAULT_BASE_DIR  # pretrained tiny VLM (vla-scripts/pretrain_tabletop.py)
    suites: list[str] = field(default_factory=lambda: list(SUITES))
    task_ids: Optional[list[int]] = None  # tasks of every suite used for data and evaluation (None: all 10)
    # data
    data_dir: Optional[Path] = None  # default <out_dir>/tabletop4
    demos_per_task: int = 50
    demo_noise: float = 0.1  # scripted expert's action noise
    # training (prismatic.training.FinetuneConfig fields)
    expert_steps: int = 1500  # = make demo's FULL preset
    joint_steps: int = 3000
    batch_size: int = 8
    lr: float = 1e-3
    lr_schedule: str = "cosine"
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    # off: at ~1 epoch the experts do not overfit, and random crops blur where things are (64 px, 16-px patches);
    # goal expert 1500 steps: 18/40 episodes without, 10/40 with (docs/TABLETOP4_FINDINGS.md)
    image_aug: bool = False
    action_loss: str = "mse"  # mse | l1 (as published; learns far slower at the demo's budget: docs/TABLETOP4_FINDINGS.md)
    train_joint: bool = True
    # merging (model_merging.MergeOptions fields)
    algorithms: list[str] = field(default_factory=lambda: list(DEMO_ALGORITHMS))  # MergeVLA, masks + router
    unmasked_algorithms: list[str] = field(default_factory=list)  # MergeVLA without masks (+ router for heads)
    # MergeVLA + masks with every from-scratch part kept per task (only the VLM merged), routed by the exemplar
    # router (the task given when router_exemplars is 0): what the masked VLM merge keeps of each expert when the
    # action pathway is not averaged
    per_task_algorithms: list[str] = field(default_factory=lambda: list(PER_TASK_ALGORITHMS))
    # first frames of each expert's demos that calibrate the exemplar router of every routed merge (0: none)
    router_exemplars: int = 50
    mask_lambda: float = 0.6
    k_gate: int = 8
    expert_head_layers: int = 1
    baseline_algorithms: list[str] = field(default_factory=lambda: ["task_arithmetic"])  # naive, no masks
    baseline_head_layers: int = 0  # naive merge: every parameter shared
    # evaluation
    trials_per_task: int = 4  # episodes per task (trial k starts from the task's init state first_init_state + k)
    first_init_state: int = 0
    num_envs: int = 16  # concurrent episodes per policy (the policy's batch)
    noop_steps: int = 0  # TableTop-4 needs no settling steps
    # router of the "+ router" rows' rollouts: value | key | key_value | value_update subspaces, or exemplar
    router_variant: str = "value"
    eval_baseline_experts: bool = True  # also roll out the baseline experts themselves
    # also replay each task's first demo open-loop on the same episodes: what a policy that never looks solves
    blind_replay: bool = True
    # MP4s of chosen episodes of every row: globs over keys suite/task_id/trial, e.g. ["goal/*/0"] (none by default)
    video_episodes: list[str] = field(default_factory=list)
    plots: bool = True

    def resolved_data_dir(self) -> Path:
        return Path(self.data_dir) if self.data_dir is not None else Path(self.out_dir) / "tabletop4"

    def validate(self) -> None:
        from experiments.robot.tabletop.suites import check_trial_range
        from model_merging import METHODS
        from model_merging.router import ALL_VARIANTS, EXEMPLAR
        from prismatic.models import get_config
        from prismatic.training.config import ActionLoss  # the model's losses (a test checks); not the model itself
        from prismatic.training.schedule import LR_SCHEDULES

        unknown = [s for s in self.suites if s not in SUITES]
        if not self.suites or unknown or len(set(self.suites)) != len(self.suites):
            raise PipelineError(f"suites must be distinct TableTop-4 suites {list(SUITES)}, got {self.suites}")
        if self.task_ids is not None and (not self.task_ids or any(not 0 <= t < 10 for t in self.task_ids)
                                          or len(set(self.task_ids)) != len(self.task_ids)):
            raise PipelineError(f"task_ids must be a non-empty list of distinct task ids in 0..9, got {self.task_ids}")
        for name in ("workers", "demos_per_task", "expert_steps", "joint_steps", "batch_size", "trials_per_task",
                     "num_envs", "k_gate"):
            if getattr(self, name) < 1:
                raise PipelineError(f"{name} must be >= 1, got {getattr(self, name)}")
        width = get_config("tiny").llm.hidden_size  # the router's subspaces live in the LLM's width
        if self.k_gate > width:
            raise PipelineError(f"k_gate must be at most the tiny model's hidden width {width}, got {self.k_gate}")
        for name in ("noop_steps", "first_init_state", "seed", "warmup_steps", "baseline_head_layers", "demo_noise",
                     "weight_decay", "mask_lambda", "router_exemplars"):
            if not 0 <= getattr(self, name) < math.inf:  # written so that NaN fails too
                raise PipelineError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        for name in ("lr", "max_grad_norm"):
            if not 0 < getattr(self, name) < math.inf:
                raise PipelineError(f"{name} must be a finite number > 0, got {getattr(self, name)}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise PipelineError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise PipelineError(f"lr_schedule must be one of {list(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        blocks = get_config("tiny").num_expert_blocks
        if not 0 <= self.expert_head_layers < blocks:  # the router needs a shared block below the kept ones
            raise PipelineError(f"expert_head_layers must be in 0..{blocks - 1}, got {self.expert_head_layers}")
        if self.baseline_head_layers > blocks:
            raise PipelineError(f"baseline_head_layers must be in 0..{blocks}, got {self.baseline_head_layers}")
        for name in ("algorithms", "unmasked_algorithms", "per_task_algorithms", "baseline_algorithms"):
            twice = sorted({a for a in getattr(self, name) if getattr(self, name).count(a) > 1})
            if twice:
                raise PipelineError(f"{name} lists {twice} more than once")
        if self.lr_schedule != "constant" and self.warmup_steps >= min(self.expert_steps, self.joint_steps):
            raise PipelineError(f"warmup_steps ({self.warmup_steps}) must be below expert_steps and joint_steps "
                                f"({self.expert_steps}, {self.joint_steps})")
        check_trial_range(self.first_init_state, self.trials_per_task, PipelineError)
        bad = [a for a in [*self.algorithms, *self.unmasked_algorithms, *self.per_task_algorithms,
                           *self.baseline_algorithms] if a not in METHODS]
        if bad:
            raise PipelineError(f"unknown merge algorithm(s) {bad}; expected some of {sorted(METHODS)}")
        if self.action_loss not in typing.get_args(ActionLoss):
            raise PipelineError(f"action_loss must be one of {sorted(typing.get_args(ActionLoss))}, got "
                                f"{self.action_loss!r}")
        if self.router_variant not in ALL_VARIANTS:
            raise PipelineError(f"router_variant must be one of {list(ALL_VARIANTS)}, got {self.router_variant!r}")
        if self.router_exemplars == 1:
            raise PipelineError("router_exemplars must be 0 (no exemplar router) or >= 2, got 1")
        if self.router_variant == EXEMPLAR and not self.router_exemplars:
            raise PipelineError("router_variant exemplar needs router_exemplars >= 2")
        if self.video_episodes:
            from experiments.robot.harness.video import wants_video
            from experiments.robot.tabletop_pipeline.evaluation import plan

            keys = [e.key for e in plan(self.suites, self.task_ids, self.trials_per_task, self.first_init_state)]
            idle = [p for p in self.video_episodes if not any(wants_video(k, [p]) for k in keys)]
            if idle:
                raise PipelineError(f"video_episodes {idle} match no episode of the evaluation (keys are "
                                    f"suite/task_id/trial, e.g. {keys[0]!r})")
        if not (Path(self.base_dir) / "base.json").is_file():
            raise PipelineError(
                f"no pretrained base at {self.base_dir} (base.json missing): it ships with the repository; "
                "regenerate it with `python vla-scripts/pretrain_tabletop.py`")


# ------------------------------------------------------------------------------------------------ stages


def _log_to(path: Path, log):
    def fn(msg: str) -> None:
        log(msg)
        with open(path, "a") as f:
            f.write(msg + "\n")
    return fn


def _stage(cfg: PipelineConfig, root: Path, name: str, spec: dict, **kw) -> Stage:
    """A stage that records how its work is done (not what it computes, but what its wall time depends on:
    benchmarks/demo_time.py compares it)."""
    return Stage(root, name, spec, conditions={"workers": cfg.workers, "cpus": os.cpu_count()}, **kw)


def stage_data(cfg: PipelineConfig, root: Path, log) -> dict:
    from experiments.robot.tabletop.generate import GenerateConfig
    from experiments.robot.tabletop_pipeline.data import (
        DataDirError,
        ensure_dataset,
        generation_spec,
        make_joint_suite,
        matches,
    )

    gen = GenerateConfig(out_dir=cfg.resolved_data_dir(), suites=list(cfg.suites), task_ids=cfg.task_ids,
                         demos_per_task=cfg.demos_per_task, seed=cfg.seed, noise=cfg.demo_noise,
                         workers=cfg.workers, pretrain_scenes=0)
    spec = {"generate": generation_spec(gen), "data_dir": str(gen.out_dir)}

    def body(_d: Path) -> dict:
        try:
            manifest, reused = ensure_dataset(gen, log, owned=cfg.data_dir is None)
        except DataDirError as e:
            raise PipelineError(str(e)) from e
        joint = make_joint_suite(gen.out_dir, list(cfg.suites))
        files = {k: v for k, v in manifest["files"].items()}
        return {"data_root": str(gen.out_dir), "joint_suite": joint.name, "fingerprint": fingerprint(files),
                "demos": sum(v.get("demos", 0) for v in files.values()),
                "env_steps": sum(v.get("env_steps", 0) for v in files.values()), "reused": reused}

    # the dataset lives outside the stage directory (it may be shared): never clear it from here, and check it
    # still holds this dataset before trusting the cached record
    return _stage(cfg, root, "data", spec, clear_stale=False).run(body, log, still_valid=lambda _out: matches(gen.out_dir, gen))


def stage_base(cfg: PipelineConfig, root: Path, log) -> dict:
    from prismatic.io import sha256_file

    base = Path(cfg.base_dir)
    spec = {"base_dir": str(base.resolve()), "file_sha256": sha256_file(base / "vlm.safetensors")}

    def body(_d: Path) -> dict:
        from prismatic.models import get_config
        from prismatic.models.loading import BaseModelError, load_base_dir

        try:
            _sd, meta = load_base_dir(base, get_config("tiny"))  # checks the weights against base.json's sha256
        except BaseModelError as e:
            raise PipelineError(f"{e}; regenerate the base (vla-scripts/pretrain_tabletop.py)") from e
        digest = meta["sha256"]
        pre = meta.get("pretraining", {})
        log(f"[base] {base}: sha256 {digest[:12]}…, pretrained {pre.get('config', {}).get('steps')} steps, "
            f"held-out answer accuracy {pre.get('final', {}).get('heldout_answer_acc')}")
        return {"base_dir": str(base.resolve()), "sha256": digest, "pretraining_final": pre.get("final")}

    return _stage(cfg, root, "base", spec).run(body, log)


def stage_train(cfg: PipelineConfig, root: Path, data: dict, base: dict, log) -> dict:
    from experiments.robot.tabletop_pipeline.training import ARCHS, TrainJob, TrainSettings, run_jobs

    d = root / "train"
    settings = TrainSettings(data_root=data["data_root"], base_dir=base["base_dir"], seed=cfg.seed,
                             batch_size=cfg.batch_size, lr=cfg.lr, lr_schedule=cfg.lr_schedule,
                             warmup_steps=cfg.warmup_steps, min_lr_ratio=cfg.min_lr_ratio,
                             weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, image_aug=cfg.image_aug,
                             log_every=50, action_loss=cfg.action_loss)
    jobs = [TrainJob(f"{fam}/{s}", arch, s, cfg.expert_steps, str(d / fam / s))
            for fam, arch in ARCHS.items() for s in cfg.suites]
    if cfg.train_joint:
        jobs.append(TrainJob("joint", "cross_attn", data["joint_suite"], cfg.joint_steps, str(d / "joint")))
    spec = {"settings": asdict(settings), "jobs": [asdict(j) for j in jobs], "data": data["fingerprint"],
            "base": base["sha256"]}
    return _stage(cfg, root, "train", spec, clear_stale=False).run(lambda _d: run_jobs(jobs, settings, cfg.workers, log), log)


def merge_jobs(cfg: PipelineConfig, root: Path, data: dict, trained: dict) -> list:
    from experiments.robot.tabletop_pipeline.merging import MergeJob
    from model_merging.layout import PART_GROUPS
    from model_merging.router import EXEMPLAR

    d = root / "merge"

    def experts(fam: str):
        names = [f"{fam}/{s}" for s in cfg.suites]
        return (tuple((s, trained[n]["checkpoint"]) for s, n in zip(cfg.suites, names)),
                tuple(trained[n]["weights_sha256"] for n in names))

    common = {"mask_lambda": cfg.mask_lambda, "k_gate": cfg.k_gate, "seed": cfg.seed}
    # every routed merge gets exemplars (the router ablation scores them all), from the demo's own demos, shown
    # with the crop the rollouts use
    routed = {"exemplars": cfg.router_exemplars, "data_root": str(data["data_root"]),
              "data_fingerprint": data["fingerprint"], "crop_area": eval_crop_area(cfg)} if cfg.router_exemplars else {}
    jobs = []
    ex, hashes = experts("mergevla")
    for alg in cfg.algorithms:
        jobs.append(MergeJob(f"mergevla-{alg}-masks", "mergevla", alg, True, cfg.expert_head_layers, ex, hashes,
                             str(d / f"mergevla-{alg}-masks"), variant=cfg.router_variant, **common, **routed))
    for alg in cfg.unmasked_algorithms:
        jobs.append(MergeJob(f"mergevla-{alg}-nomasks", "mergevla", alg, False, cfg.expert_head_layers, ex, hashes,
                             str(d / f"mergevla-{alg}-nomasks"), variant=cfg.router_variant, **common, **routed))
    for alg in cfg.per_task_algorithms:
        jobs.append(MergeJob(f"mergevla-{alg}-masks-pertask", "mergevla", alg, True, cfg.expert_head_layers, ex, hashes,
                             str(d / f"mergevla-{alg}-masks-pertask"), routed=bool(routed), per_task_parts=PART_GROUPS,
                             variant=EXEMPLAR if routed else None, **common, **routed))
    ex, hashes = experts("baseline")
    for alg in cfg.baseline_algorithms:
        jobs.append(MergeJob(f"baseline-{alg}-nomasks", "baseline", alg, False, cfg.baseline_head_layers, ex, hashes,
                             str(d / f"baseline-{alg}-nomasks"), routed=False, **common))
    return jobs


def stage_merge(cfg: PipelineConfig, root: Path, data: dict, trained: dict, log) -> dict:
    from experiments.robot.tabletop_pipeline.merging import run_merges

    jobs = merge_jobs(cfg, root, data, trained)
    spec = {"jobs": [j.spec() | {"name": j.name} for j in jobs]}
    return _stage(cfg, root, "merge", spec, clear_stale=False).run(lambda _d: run_merges(jobs, cfg.workers, log), log)


def eval_crop_area(cfg: PipelineConfig) -> float:
    """Models trained with random crops see the centre crop of the same area at test time (1: full frames)."""
    from prismatic.vla.augmentation import ImageAugConfig, centre_crop_for

    return centre_crop_for(cfg.image_aug, ImageAugConfig().crop_area)


def scenes_fingerprint(suites) -> str:
    """What the evaluation episodes of `suites` are: each task's instruction, step limit and every fixed initial
    scene, under the simulator's versions. Rollouts recorded for other scenes are not reused, while another
    trials_per_task or task_ids still reuses the episodes both runs plan."""
    from experiments.robot.tabletop import SUITE_MAX_STEPS, get_init_states, get_suite
    from experiments.robot.tabletop.demos import TABLETOP_VERSION
    from experiments.robot.tabletop.physics import PHYSICS_VERSION

    return fingerprint([TABLETOP_VERSION, PHYSICS_VERSION, {
        s: [SUITE_MAX_STEPS[s], [[t.instruction, [x.to_dict() for x in get_init_states(s, t.task_id)]]
                                 for t in get_suite(s)]] for s in suites}])


def eval_jobs(cfg: PipelineConfig, trained: dict, merged: dict, merge_job_list: list, data: dict) -> list:
    from experiments.robot.tabletop_pipeline.evaluation import EvalJob

    proto = {"noop_steps": cfg.noop_steps, "seed": cfg.seed, "crop_area": eval_crop_area(cfg),
             "first_init_state": cfg.first_init_state, "scenes": scenes_fingerprint(cfg.suites)}
    jobs = []
    for fam, label in (("mergevla", FT_LABEL), ("baseline", BASELINE_FT_LABEL)):
        if fam == "baseline" and not cfg.eval_baseline_experts:
            continue
        ckpts = tuple((s, trained[f"{fam}/{s}"]["checkpoint"]) for s in cfg.suites)
        pid = fingerprint([proto, [trained[f"{fam}/{s}"]["weights_sha256"] for s in cfg.suites]])
        jobs.append(EvalJob(f"{fam}-experts", label, "experts", pid, checkpoints=ckpts))
    for mj in merge_job_list:
        m = merged[mj.name]
        kind = "routed" if mj.routed else "oracle"
        variant = (mj.variant or cfg.router_variant) if mj.routed else "value"
        label = mj.label_with(variant)
        # the exemplars route this row (exemplar variant) or at least its router ablation
        pid = fingerprint([proto, m["weights_sha256"], kind, variant, m.get("exemplars_sha256")])
        jobs.append(EvalJob(mj.name, label, kind, pid, artifact=m["dir"], variant=variant))
    if cfg.train_joint:
        pid = fingerprint([proto, trained["joint"]["weights_sha256"]])
        jobs.append(EvalJob("joint", JOINT_LABEL, "single", pid, checkpoints=(("all", trained["joint"]["checkpoint"]),)))
    if cfg.blind_replay:
        demos = (cfg.seed, cfg.demo_noise)  # the dataset's demos, made again from their seed: its content names them
        jobs.append(EvalJob("blind-replay", BLIND_LABEL, "blind", fingerprint([proto, demos, data["fingerprint"]]),
                            demos=demos))
    return jobs


def stage_eval(cfg: PipelineConfig, root: Path, data: dict, trained: dict, merged: dict, log
               ) -> tuple[dict, set[str], list]:
    """The rollouts of every row; returns the stage's result, the planned episodes' keys and the jobs."""
    from experiments.robot.tabletop_pipeline.evaluation import EvalSettings, plan, results_complete, run_evals

    d = root / "eval"
    settings = EvalSettings(suites=tuple(cfg.suites), task_ids=tuple(cfg.task_ids) if cfg.task_ids else None,
                            trials_per_task=cfg.trials_per_task, first_init_state=cfg.first_init_state,
                            num_envs=cfg.num_envs, noop_steps=cfg.noop_steps, seed=cfg.seed,
                            crop_area=eval_crop_area(cfg), video_episodes=tuple(cfg.video_episodes), out_dir=str(d))
    jobs = eval_jobs(cfg, trained, merged, merge_jobs(cfg, root, data, trained), data)
    spec = {"settings": asdict(settings), "jobs": [asdict(j) for j in jobs]}
    planned = {e.key for e in plan(cfg.suites, cfg.task_ids, cfg.trials_per_task, cfg.first_init_state)}
    res = _stage(cfg, root, "eval", spec, clear_stale=False).run(
        lambda _d: run_evals(jobs, settings, cfg.workers, log), log,
        still_valid=lambda outputs: results_complete(outputs, planned))
    return res, planned, jobs


# ------------------------------------------------------------------------------------------------ run


def machine_info() -> dict:
    import torch

    load = os.getloadavg() if hasattr(os, "getloadavg") else (None, None, None)
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor() or None,
            "python": platform.python_version(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "loadavg_1m": load[0]}


RUN_MARKER = ".mergevla-demo-run"  # what makes an out_dir a run's, so a rerun resumes and a user's dir is refused
RUN_ENTRIES = ("data", "base", "train", "merge", "eval", "summary", "tabletop4", "pipeline.log", "timing.json",
               "timing_history.jsonl", "demo_table.md", "routing.json")


def run_pipeline(cfg: PipelineConfig, log=print) -> dict:
    """Run (or resume) every stage; write and return the report (see report.py)."""
    from experiments.robot.tabletop_pipeline.report import build_report, write_report
    from prismatic.io import claim_output_dir, written_as

    cfg.validate()
    # entries (or their atomic writes' temps) of runs from before RUN_MARKER are a run's too
    root = claim_output_dir(cfg.out_dir, "out_dir", RUN_MARKER, written_as(RUN_ENTRIES))
    log = _log_to(root / "pipeline.log", log)
    started = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    machine_start = machine_info()
    log(f"[pipeline] {started.isoformat(timespec='seconds')} out_dir={root} seed={cfg.seed} workers={cfg.workers} "
        f"cpus={machine_start['cpus']} load={machine_start['loadavg_1m']}")
    results = {}
    results["data"] = stage_data(cfg, root, log)
    results["base"] = stage_base(cfg, root, log)
    results["train"] = stage_train(cfg, root, results["data"].outputs, results["base"].outputs, log)
    data = results["data"].outputs
    results["merge"] = stage_merge(cfg, root, data, results["train"].outputs, log)
    results["eval"], keys, jobs = stage_eval(cfg, root, data, results["train"].outputs, results["merge"].outputs, log)
    t_report = time.perf_counter()
    timing = {
        "format": "mergevla-demo-timing",
        "started": started.isoformat(timespec="seconds"),
        "stages": {n: {"wall_s": round(r.wall_s, 1), "cached": r.cached, "fresh": r.fresh} for n, r in results.items()},
        "machine_start": machine_start,
    }
    # table rows in job order (a cached stage's outputs come back with their keys sorted)
    report = build_report(cfg, results, keys, timing, [j.label for j in jobs])
    timing["stages"]["report"] = {"wall_s": round(time.perf_counter() - t_report, 1), "cached": False, "fresh": True}
    timing["total_wall_s"] = round(time.perf_counter() - t0, 1)
    timing["machine_end"] = machine_info()
    timing["config"] = jsonable(asdict(cfg))
    report["timing"] = timing
    write_report(cfg, report, root, log)
    return report


def read_timing(out_dir: Path | str) -> dict:
    return json.loads((Path(out_dir) / "timing.json").read_text())
