"""Stage 3: fine-tune the experts (one per suite, MergeVLA and the self-attention baseline) and the joint model.

Every job is one `prismatic.training.train(FinetuneConfig)` run with its own run directory; all jobs share the
pretrained base and the same seed, so every expert starts from the same point (merging requires it). Jobs run
in `workers` spawned processes, one torch thread each (the tiny model trains fastest that way on a CPU); a run
directory that already holds the finished run is reused, an interrupted one is resumed, and one trained with
other settings is replaced.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

from prismatic.training.metrics import read_metrics
from prismatic.training.run_dir import METRICS_FILE

ARCHS = {"mergevla": "cross_attn", "baseline": "self_attn"}
# checkpoint (with optimizer state) this often, so an interrupted job resumes near where it stopped
SAVE_EVERY = 500


@dataclass(frozen=True)
class TrainJob:
    name: str  # e.g. "mergevla/spatial", "joint"
    expert_arch: str  # cross_attn | self_attn
    suite: str  # a suite directory under data_root (or the joint suite)
    steps: int
    out_dir: str


@dataclass(frozen=True)
class TrainSettings:
    """What every job shares (knobs of the pipeline's training stage)."""

    data_root: str
    base_dir: str
    seed: int
    batch_size: int
    lr: float
    lr_schedule: str
    warmup_steps: int
    min_lr_ratio: float
    weight_decay: float
    max_grad_norm: float
    image_aug: bool
    log_every: int
    action_loss: str = "l1"


def finetune_config(job: TrainJob, s: TrainSettings):
    from prismatic.models import BaseModelConfig
    from prismatic.training import FinetuneConfig

    return FinetuneConfig(
        config_name="tiny", expert_arch=job.expert_arch, base=BaseModelConfig(base_dir=Path(s.base_dir)),
        seed=s.seed, data_root=Path(s.data_root), suite=job.suite, batch_size=s.batch_size,
        grad_accumulation_steps=1, lr=s.lr, lr_schedule=s.lr_schedule, warmup_steps=s.warmup_steps,
        min_lr_ratio=s.min_lr_ratio, weight_decay=s.weight_decay, max_grad_norm=s.max_grad_norm,
        max_steps=job.steps, image_aug=s.image_aug, action_loss=s.action_loss, out_dir=Path(job.out_dir),
        save_every=min(job.steps, SAVE_EVERY), resume=True, log_every=min(s.log_every, job.steps), progress_bar=False, device="cpu",
        cpu_threads=1, num_workers=0,
    )


def run_job(job: TrainJob, s: TrainSettings) -> dict:
    """Train (or reuse / resume) one run; returns its final checkpoint and training summary."""
    import torch

    from prismatic.training import RunDirError, train

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    cfg = finetune_config(job, s)
    t0 = time.perf_counter()
    try:
        final = train(cfg)
    except RunDirError:  # the directory holds this job trained with other settings (or on other data)
        shutil.rmtree(cfg.run_dir())
        final = train(cfg)
    wall = time.perf_counter() - t0
    metrics = read_metrics(cfg.run_dir() / METRICS_FILE)
    last = next((m for m in reversed(metrics) if m.get("step") == job.steps), {})  # not a longer run's
    manifest = json.loads((final / "manifest.json").read_text())
    rates = [m["steps_per_s"] for m in metrics if "steps_per_s" in m]
    return {"name": job.name, "checkpoint": str(final), "weights_sha256": manifest["weights_sha256"],
            "steps": job.steps, "final_loss": last.get("loss"), "wall_s": round(wall, 1),
            "steps_per_s": round(sum(rates) / len(rates), 2) if rates else None,
            "num_steps_in_data": manifest.get("dataset", {}).get("num_steps")}


def run_jobs(jobs: list[TrainJob], settings: TrainSettings, workers: int, log=print) -> dict[str, dict]:
    """All jobs, longest first, over `workers` processes (1: in this process); name → run_job's summary."""
    ordered = sorted(jobs, key=lambda j: -j.steps)
    out: dict[str, dict] = {}

    def report(r: dict) -> None:
        out[r["name"]] = r
        rate = f", {r['steps_per_s']} steps/s" if r["steps_per_s"] else ""
        log(f"[train] {r['name']}: {r['steps']} steps, final loss {r['final_loss']}, {r['wall_s']:.0f}s{rate}")

    if workers <= 1:
        for j in ordered:
            report(run_job(j, settings))
    else:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as ex:
            futures = [ex.submit(run_job, j, settings) for j in ordered]
            for f in as_completed(futures):
                report(f.result())
    return {j.name: out[j.name] for j in jobs}
