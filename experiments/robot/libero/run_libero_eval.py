"""Evaluate a fine-tuned checkpoint or a merged (routed) artifact on LIBERO suites (docs/DESIGN.md §5–6).

    python -m experiments.robot.libero.run_libero_eval --pretrained_checkpoint runs/ckpt/spatial \
        --task_suites '[libero_spatial]'
    python -m experiments.robot.libero.run_libero_eval --pretrained_checkpoint runs/merged/ties \
        --task_suites '[libero_spatial,libero_object,libero_goal,libero_10]' --num_envs 4

Protocol: per suite, every task × `num_trials_per_task` fixed init states; 10 no-op steps, then 8-step
open-loop chunks until success or the suite's step limit. One JSONL row per episode in
`results_dir/<run_name>.jsonl` (re-running resumes), then the table of every run in `results_dir`.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from experiments.robot.harness import Protocol, ResultsError, plan_episodes, read_rows, run_episodes
from experiments.robot.harness.report import write_summary
from experiments.robot.harness.results import check_label_unshared, check_same_run, read_many
from experiments.robot.harness.video import wants_video
from experiments.robot.libero.env import LiberoEnvFactory, LiberoUnavailable, import_libero, suite_info
from experiments.robot.libero.policies import (
    FT_KIND,
    default_method,
    default_router,
    load_policy,
    read_checkpoint_manifest,
)
from experiments.robot.libero.preprocess import LiberoImageTransform, upright_agentview
from experiments.robot.policy import resolve_device
from prismatic.checkpoint import CheckpointError, unfinished_warning
from prismatic.cli import check_counts, run_cli
from prismatic.io import check_output_dir


@dataclass
class GenerateConfig:
    # What to evaluate
    pretrained_checkpoint: Path | None = None  # fine-tuned checkpoint dir or merged artifact dir (required)
    task_suites: list[str] = field(default_factory=lambda: ["libero_spatial"])  # also libero_90; LIBERO-Plus
    task_ids: list[int] | None = None  # a subset of each suite's tasks (default: all)
    num_trials_per_task: int = 50  # trial k starts from the task's k-th fixed init state (LIBERO-Plus: 1)
    method: str | None = None  # row label in the table (default: "FT experts" or the merge method)
    # merged artifacts: value | key | key_value | value_update, or exemplar once model_merging.exemplar_router has
    # calibrated the artifact (default: the artifact's default, value)
    router_variant: str | None = None
    # merged artifacts: keep each expert's built weights instead of rebuilding them every forward (faster, ≈ 2.4 GB
    # more per expert in bf16 at full size)
    cache_expert_weights: bool = False

    # Protocol (docs/DESIGN.md §5)
    max_steps: int | None = None  # default per suite: spatial 220, object 280, goal 300, 10 520, 90 400
    num_steps_wait: int = 10  # no-op steps while objects settle
    num_open_loop_steps: int = 8  # actions executed per predicted chunk
    env_img_res: int = 256  # rendered camera size
    resize_size: int = 224  # frames → JPEG round trip + Lanczos to this size (the model then resizes to its own)
    jpeg_resize: bool = True  # the JPEG round trip before the resize, as the RLDS data was made
    # Centre crop at `crop_area` of the area. Unset, both follow the checkpoint: the random-crop area it was
    # trained with (the merged experts' common one), no crop if it trained without crops, and docs/DESIGN.md §5's 0.9
    # when its manifest does not say
    center_crop: bool | None = None
    crop_area: float | None = None  # fraction of the image area kept by the centre crop (see --center_crop)
    seed: int = 7  # Python, NumPy and torch seed of the evaluation (worker w: seed + w)
    env_seed: int = 0  # the env's own seed, set again at every episode's reset
    libero_plus_classification: Path | None = None  # LIBERO-Plus task → dimension file (default: beside LIBERO)

    # Execution
    num_envs: int = 1  # parallel environments; more than 1 runs each in its own worker process
    worker_timeout_s: float = 900.0  # with num_envs > 1: stop (resumably) when a worker stays silent this long
    device: str = "auto"  # "cuda" when available, else "cpu"
    torch_threads: int | None = None  # CPU policy threads; None: the cores left over by the env workers
    mujoco_gl: str = "egl"  # headless rendering backend when MUJOCO_GL is unset: "egl" or "osmesa"
    fast_render: bool = False  # CPU smoke runs only: ~3× faster rendering, slightly different images

    # Outputs
    results_dir: Path = Path("runs/libero")  # results JSONL, tables, plots and videos
    run_name: str | None = None  # results file stem (default: method + checkpoint name)
    summary_dir: Path | None = None  # default: results_dir/summary (covers every run in results_dir)
    # MP4s: "" (none), "all", "first" (trial 0 of every task), or comma-separated globs over episode keys
    # `suite/task_id/trial`, e.g. "libero_goal/3/*,libero_10/*/0"
    save_videos: str = ""
    dry_run: bool = False  # check paths and print the plan; run nothing


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "run"


def video_patterns(spec: str) -> list[str]:
    named = {"all": ["*"], "first": ["*/*/0"], "none": []}
    if spec.strip().lower() in named:
        return named[spec.strip().lower()]
    return [p.strip() for p in spec.split(",") if p.strip()]


PROTOCOL_CROP_AREA = 0.9  # docs/DESIGN.md §5, for checkpoints whose manifest records no training config


def eval_crop_area(cfg: GenerateConfig, manifest: dict) -> float:
    """The centre-crop area episodes are evaluated with (1.0: no crop): the flags, else what the model trained on."""
    if cfg.center_crop is False:
        return 1.0
    if cfg.crop_area is not None:
        if not 0.0 < cfg.crop_area <= 1.0:
            raise ValueError(f"--crop_area is {cfg.crop_area}, expected a fraction of the image area in (0, 1]")
        return cfg.crop_area
    from prismatic.vla.augmentation import common_crop_area, trained_crop_area  # torch: not needed before this

    if manifest["format"] == FT_KIND:
        trained = {"the checkpoint": trained_crop_area(manifest.get("train_config"))}
    else:
        trained = dict(manifest.get("trained_crop_area") or {})
    area = common_crop_area(trained)
    area = PROTOCOL_CROP_AREA if area is None else area
    if cfg.center_crop and area == 1.0:  # asked for a crop that training did not use: the protocol's
        return PROTOCOL_CROP_AREA
    return area


def frame_size_warning(manifest: dict, env_img_res: int) -> str | None:
    """A warning when the checkpoint trained on frames of another size than the renders it is evaluated on."""
    if manifest["format"] == FT_KIND:
        trained = {"the checkpoint": (manifest.get("dataset") or {}).get("frame_size")}
    else:
        trained = dict(manifest.get("trained_frame_size") or {})
    other = {name: size for name, size in trained.items() if size and list(size) != [env_img_res, env_img_res]}
    if not other:
        return None
    sizes = ", ".join(f"{name} {'×'.join(map(str, size))}" for name, size in sorted(other.items()))
    return (f"warning: trained on frames of another size than the {env_img_res}-px renders evaluated here ({sizes}): "
            "raw LIBERO HDF5 demos are 128 px, which is why the RLDS release re-rendered them at 256; expect lower "
            "success than on the data the published numbers used (OpenVLA's RLDS, --dataset_format rlds), or "
            "evaluate with --env_img_res at the training size")


def protocol_info(cfg: GenerateConfig, crop_area: float) -> dict:
    keys = ("max_steps", "num_steps_wait", "num_open_loop_steps", "env_img_res", "resize_size", "jpeg_resize",
            "env_seed", "fast_render")
    return {**{k: asdict(cfg)[k] for k in keys}, "center_crop": crop_area < 1.0, "crop_area": crop_area}


def plan(cfg: GenerateConfig, infos) -> list:
    """Every episode to run; refuses more trials than a suite has fixed init states (trial k starts from state k)."""
    for info in infos:
        if info.init_states is not None and cfg.num_trials_per_task > info.init_states:
            raise ValueError(f"--num_trials_per_task {cfg.num_trials_per_task} exceeds the {info.init_states} fixed "
                             f"init states of {info.name}'s tasks (trial k starts from init state k); use at most "
                             f"{info.init_states}")
    return [
        e
        for info in infos
        for e in plan_episodes(info.name, info.num_tasks, cfg.num_trials_per_task, info.max_steps,
                               task_ids=cfg.task_ids, task_names=info.task_names, expected_expert=info.name,
                               categories=info.categories)
    ]


MUJOCO_GL_BACKENDS = ("egl", "osmesa", "glfw")


def validate(cfg: GenerateConfig) -> None:
    """Refuse settings no run can use, before anything is read or written (dry runs included)."""
    if cfg.pretrained_checkpoint is None:
        raise ValueError("--pretrained_checkpoint is required (a fine-tuned checkpoint or merged artifact dir)")
    check_counts(cfg, positive=("num_trials_per_task", "num_envs", "num_open_loop_steps", "env_img_res",
                                "resize_size"), non_negative=("num_steps_wait", "seed", "env_seed"))
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise ValueError(f"--max_steps is {cfg.max_steps}, expected >= 1 (or unset: the suite's default)")
    if cfg.torch_threads is not None and cfg.torch_threads < 1:
        raise ValueError(f"--torch_threads is {cfg.torch_threads}, expected >= 1 (or unset)")
    if not 0 < cfg.worker_timeout_s < float("inf"):
        raise ValueError(f"--worker_timeout_s is {cfg.worker_timeout_s}, expected a finite number of seconds > 0")
    if cfg.mujoco_gl not in MUJOCO_GL_BACKENDS:
        raise ValueError(f"--mujoco_gl is {cfg.mujoco_gl!r}, expected one of {list(MUJOCO_GL_BACKENDS)}")
    for flag, d in (("--results_dir", cfg.results_dir), ("--summary_dir", cfg.summary_dir)):
        if d is not None:
            check_output_dir(d, flag)
    if cfg.router_variant is not None:
        from model_merging.router import check_variant  # torch: only when a variant is named

        check_variant(cfg.router_variant)


def main(cfg: GenerateConfig) -> list[dict]:
    validate(cfg)
    manifest = read_checkpoint_manifest(cfg.pretrained_checkpoint)
    method = cfg.method or default_method(manifest, cfg.router_variant)
    run_name = cfg.run_name or slug(f"{method}--{cfg.pretrained_checkpoint.resolve().name}")
    results_path = cfg.results_dir / f"{run_name}.jsonl"
    summary_dir = cfg.summary_dir or cfg.results_dir / "summary"
    import_libero(cfg.mujoco_gl)
    infos = [suite_info(s, cfg.max_steps, cfg.libero_plus_classification) for s in cfg.task_suites]
    episodes = plan(cfg, infos)
    crop_area = eval_crop_area(cfg, manifest)
    run_info = {"method": method, "checkpoint": str(cfg.pretrained_checkpoint.resolve()),
                "checkpoint_sha256": manifest.get("weights_sha256"), "protocol": protocol_info(cfg, crop_area),
                # the artifact's default router recorded as None whether or not it was named: one run either way
                "router_variant": None if cfg.router_variant == default_router(manifest) else cfg.router_variant}
    if cfg.router_variant == "exemplar":  # recomputed exemplars are another router: never resume into old rows
        from model_merging.exemplars import exemplars_sha256

        run_info["exemplars_sha256"] = exemplars_sha256(cfg.pretrained_checkpoint)
    previous = read_rows(results_path)
    check_same_run(previous, {**run_info, "seed": cfg.seed}, results_path)  # before any work, dry run included
    check_label_unshared(sorted(cfg.results_dir.glob("*.jsonl")), results_path, method, {e.key for e in episodes})
    done = {r["key"] for r in previous}

    print(f"checkpoint {cfg.pretrained_checkpoint} (format {manifest['format']}) → method {method!r}")
    unnamed = [i.name for i in infos if manifest.get("task_names") and i.name not in manifest["task_names"]]
    if unnamed:  # routing accuracy compares the routed expert's name with the suite's name
        print(f"warning: the artifact's experts are named {manifest['task_names']}; no expert is named "
              f"{unnamed}, so routing accuracy there reads 0. Name experts after the suites when merging "
              "(mergy.py --experts libero_spatial=DIR ...).")
    for info in infos:
        n = sum(e.suite == info.name for e in episodes)
        n_done = sum(e.suite == info.name and e.key in done for e in episodes)
        n_tasks = len({e.task_id for e in episodes if e.suite == info.name})
        tasks = f"{info.num_tasks} tasks" if n_tasks == info.num_tasks else f"{n_tasks} of {info.num_tasks} tasks"
        print(f"  {info.name}: {tasks}, {n} episode{'s' * (n != 1)} ({n_done} already done), "
              f"max {info.max_steps} steps" + (" [LIBERO-Plus dimensions]" if info.categories else ""))
    print(f"images: centre crop at {crop_area:g} of the area" if crop_area < 1.0 else "images: no centre crop")
    for warning in (frame_size_warning(manifest, cfg.env_img_res), unfinished_warning(manifest)):
        if warning:
            print(warning)
    videos = video_patterns(cfg.save_videos)
    unrecorded = [e.key for e in episodes if e.key in done and wants_video(e.key, videos)]
    if unrecorded:  # finished episodes are never re-run, so their videos cannot be recorded into this run
        print(f"warning: {len(unrecorded)} episode(s) named by --save_videos are already done and will not be "
              f"re-run, so get no video (e.g. {unrecorded[0]}); to record them, evaluate again into another "
              "--results_dir (another --run_name here would count those episodes twice in the summary)")
    if cfg.router_variant == "exemplar":
        from model_merging.exemplars import FrameView, view_mismatch

        shown = FrameView("libero", crop_area, cfg.resize_size, cfg.jpeg_resize)
        if warning := view_mismatch(cfg.pretrained_checkpoint, shown):
            print(warning)
    print(f"results: {results_path}; summary: {summary_dir}; {cfg.num_envs} parallel env(s)")
    if cfg.dry_run:
        print("dry run: nothing executed")
        return []

    device = resolve_device(cfg.device)
    if device == "cpu":
        # the env workers render on their own cores; a policy spinning on all cores would starve them
        import torch

        spare = (os.cpu_count() or 1) - (cfg.num_envs if cfg.num_envs > 1 else 0)
        torch.set_num_threads(cfg.torch_threads or max(1, spare))
    transform = LiberoImageTransform(cfg.resize_size, cfg.jpeg_resize, crop_area < 1.0, crop_area)
    policy = load_policy(cfg.pretrained_checkpoint, transform, device, cfg.router_variant, cfg.cache_expert_weights)
    rows = run_episodes(
        LiberoEnvFactory(cfg.env_img_res, cfg.env_seed, cfg.fast_render, cfg.mujoco_gl),
        policy,
        episodes,
        results_path,
        num_envs=cfg.num_envs,
        num_workers=cfg.num_envs if cfg.num_envs > 1 else 0,  # one GL context per process
        worker_timeout_s=cfg.worker_timeout_s,
        protocol=Protocol(num_noop_steps=cfg.num_steps_wait, num_open_loop_steps=cfg.num_open_loop_steps),
        run_info=run_info,
        seed=cfg.seed,
        video_dir=cfg.results_dir / "videos" / run_name,
        video_episodes=videos,
        frame_fn=upright_agentview,
    )
    paths = write_summary(read_many(sorted(cfg.results_dir.glob("*.jsonl"))), summary_dir)
    print(paths["markdown"].read_text())
    print(f"wrote {results_path} and " + ", ".join(str(p) for p in paths.values()))
    return rows


if __name__ == "__main__":
    user_errors = (ValueError, FileNotFoundError, CheckpointError, ResultsError, LiberoUnavailable)
    sys.exit(run_cli("run_libero_eval", GenerateConfig, main, user_errors))
