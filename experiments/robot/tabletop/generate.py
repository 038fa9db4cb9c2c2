"""Generate TableTop-4 demonstrations (LIBERO raw HDF5 layout) and the VLM pretraining pool.

    python -m experiments.robot.tabletop.generate                      # all 4 suites × 10 tasks × 50 demos
    python -m experiments.robot.tabletop.generate --suites '[goal]' --demos_per_task 20 --out_dir data/tt_small

Writes `<out_dir>/<suite>/<task_name>_demo.hdf5` (layout in demos.py), `<out_dir>/pretrain/
tabletop4_pretrain.hdf5` (pretrain.py) and, last, `<out_dir>/tabletop4_manifest.json` (config, per-file sha256
and expert statistics). Every file is written to a temporary name and renamed into place only once all jobs
have succeeded; a failed run leaves no directory it created. Refuses a non-empty `out_dir` unless `--overwrite
true`, which replaces the dataset there whole (demo files of tasks not generated again are removed, since
training reads every file of a suite's directory). Same config → byte-identical files.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

from experiments.robot.tabletop.demos import (
    TABLETOP_VERSION,
    DemoFailure,
    _compression,
    generate_task,
    task_file,
    write_task_file,
)
from experiments.robot.tabletop.physics import PHYSICS_VERSION
from experiments.robot.tabletop.pretrain import write_pretrain_pool
from experiments.robot.tabletop.suites import SUITE_NAMES, get_suite
from prismatic.cli import run_cli

MANIFEST = "tabletop4_manifest.json"
PRETRAIN_FILE = Path("pretrain") / "tabletop4_pretrain.hdf5"


@dataclass
class GenerateConfig:
    out_dir: Path = Path("data/tabletop4")  # data root: one directory per suite, the pretraining pool beside them
    suites: list[str] = field(default_factory=lambda: list(SUITE_NAMES))  # TableTop-4 suites to generate
    task_ids: list[int] | None = None  # a subset of task ids in every suite (default: all)
    demos_per_task: int = 50  # successful scripted demos per task
    image_size: int = 64  # side of the square camera frames, in pixels
    supersample: int = 2  # render at this multiple and box-filter down (anti-aliasing)
    seed: int = 0  # seed of the demos' scenes and noise, and of the pretraining pool
    noise: float = 0.1  # expert action noise (action units; 0.1 ≈ 3 mm per step)
    workers: int = 2  # processes; 1 = everything in this process
    pretrain_scenes: int = 2000  # scenes in the pretraining pool; 0 = no pool
    texts_per_scene: int = 8  # captions and question-answer pairs per pretraining scene
    compression: str = "gzip"  # for images: gzip | lzf | none
    overwrite: bool = False  # replace files in a non-empty out_dir


def validate(cfg: GenerateConfig) -> list[tuple[str, int]]:
    """The (suite, task_id) jobs of `cfg`; raises ValueError naming the bad field."""
    if not cfg.suites:
        raise ValueError("suites is empty; give at least one of " + ", ".join(SUITE_NAMES))
    unknown = [s for s in cfg.suites if s not in SUITE_NAMES]
    if unknown:
        raise ValueError(f"suites: unknown TableTop-4 suite(s) {unknown}; expected some of {list(SUITE_NAMES)}")
    if len(set(cfg.suites)) != len(cfg.suites):
        raise ValueError(f"suites lists a suite twice: {cfg.suites}")
    if cfg.task_ids is not None and not cfg.task_ids:  # [] would write a dataset of no demos
        raise ValueError("task_ids is empty; give some task ids, or leave it unset for every task")
    if cfg.task_ids is not None and len(set(cfg.task_ids)) != len(cfg.task_ids):  # two writers of one file
        raise ValueError(f"task_ids lists a task twice: {cfg.task_ids}")
    for name, lo in (("demos_per_task", 1), ("image_size", 8), ("supersample", 1), ("workers", 1),
                     ("pretrain_scenes", 0), ("texts_per_scene", 1), ("seed", 0)):
        if getattr(cfg, name) < lo:
            raise ValueError(f"{name} must be >= {lo}, got {getattr(cfg, name)}")
    if not 0 <= cfg.noise < math.inf:  # written so that NaN fails too
        raise ValueError(f"noise must be a finite number >= 0, got {cfg.noise}")
    _compression(cfg.compression)
    jobs = []
    for s in cfg.suites:
        n = len(get_suite(s))
        ids = list(range(n)) if cfg.task_ids is None else list(cfg.task_ids)
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            raise ValueError(f"task_ids {bad} out of range for suite {s!r} (0..{n - 1})")
        jobs += [(s, i) for i in ids]
    return jobs


def _task_job(suite: str, task_id: int, tmp: Path, cfg: GenerateConfig) -> tuple[str, int, dict]:
    t0 = time.perf_counter()
    episodes, stats = generate_task(suite, task_id, cfg.demos_per_task, cfg.seed, cfg.image_size, cfg.supersample,
                                    cfg.noise)
    write_task_file(tmp, suite, task_id, episodes, seed=cfg.seed, noise=cfg.noise, image_size=cfg.image_size,
                    supersample=cfg.supersample, compression=cfg.compression)
    return suite, task_id, {**stats, "seconds": time.perf_counter() - t0}


def _pretrain_job(tmp: Path, cfg: GenerateConfig) -> dict:
    t0 = time.perf_counter()
    stats = write_pretrain_pool(tmp, cfg.pretrain_scenes, cfg.seed, cfg.image_size, cfg.supersample,
                                cfg.texts_per_scene, _compression(cfg.compression))
    return {**stats, "seconds": time.perf_counter() - t0}


def main(cfg: GenerateConfig, log=print) -> dict:
    # prismatic.io imports torch; importing it here keeps worker processes (which re-import this module) light
    from prismatic.io import check_output_dir, write_json

    jobs = validate(cfg)
    out = Path(cfg.out_dir)
    check_output_dir(out, "out_dir")
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise FileExistsError(f"out_dir {out} is not empty; refusing to write a dataset into it "
                              "(choose another --out_dir or pass --overwrite true)")
    t0 = time.perf_counter()
    if cfg.overwrite:  # the old manifest must not describe the new files if this run dies halfway
        (out / MANIFEST).unlink(missing_ok=True)
    created = _missing_dirs(out, [task_file(out, s, i).parent for s, i in jobs]
                            + ([(out / PRETRAIN_FILE).parent] if cfg.pretrain_scenes else []))
    try:
        stats = _generate(cfg, out, jobs, log)
    except BaseException:
        for d in created:  # deepest first; only if the failed run left them empty
            with contextlib.suppress(OSError):
                d.rmdir()
        raise
    if cfg.overwrite:
        _remove_stale(out, stats)
    elapsed = time.perf_counter() - t0
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    manifest = {"format": "tabletop4-dataset", "tabletop_version": TABLETOP_VERSION,
                "physics_version": PHYSICS_VERSION, "config": config, "files": stats}
    write_json(out / MANIFEST, manifest)  # timings stay out so that the manifest is reproducible too
    demos = sum(st["demos"] for k, st in stats.items() if k != str(PRETRAIN_FILE))
    steps = sum(st["env_steps"] for k, st in stats.items() if k != str(PRETRAIN_FILE))
    log(f"[tabletop] wrote {demos} demos of {len(jobs)} tasks ({steps} expert env steps)"
        f"{f' and {cfg.pretrain_scenes} pretraining scenes' if cfg.pretrain_scenes else ''} to {out} "
        f"in {elapsed:.1f}s with {cfg.workers} worker(s)")
    return manifest


def _missing_dirs(out: Path, dirs: list[Path]) -> list[Path]:
    """The directories (`out` and below) that writing into `dirs` will create, deepest first."""
    missing = {p for d in dirs for p in (d, *d.parents) if (p == out or out in p.parents) and not p.exists()}
    return sorted(missing, key=lambda p: -len(p.parts))


def _remove_stale(out: Path, stats: dict[str, dict]) -> None:
    """After an overwrite: remove the demo and pool files an earlier dataset left that this one does not list."""
    keep = {out / f for f in stats}
    stale = [f for s in SUITE_NAMES for f in (out / s).glob("*_demo.hdf5")] + [out / PRETRAIN_FILE]
    for f in stale:
        if f.is_file() and f not in keep:
            f.unlink()


def _generate(cfg: GenerateConfig, out: Path, jobs: list[tuple[str, int]], log) -> dict[str, dict]:
    from prismatic.io import atomic_path, sha256_file

    stats: dict[str, dict] = {}
    with contextlib.ExitStack() as stack:  # every file appears (renamed into place) only if all jobs succeed
        tmps = {(s, i): stack.enter_context(atomic_path(task_file(out, s, i))) for s, i in jobs}
        pool_tmp = stack.enter_context(atomic_path(out / PRETRAIN_FILE)) if cfg.pretrain_scenes else None
        if cfg.workers == 1:
            results = [_task_job(s, i, tmps[s, i], cfg) for s, i in jobs]
            pool_stats = _pretrain_job(pool_tmp, cfg) if pool_tmp else None
        else:
            with ProcessPoolExecutor(cfg.workers, mp_context=get_context("spawn")) as ex:
                pool_future = ex.submit(_pretrain_job, pool_tmp, cfg) if pool_tmp else None
                futures = [ex.submit(_task_job, s, i, tmps[s, i], cfg) for s, i in jobs]
                results = []
                try:
                    for f in futures:
                        results.append(f.result())
                        s, i, st = results[-1]
                        log(f"[tabletop] {s:8s} task {i}: {st['demos']} demos ({st['failures']} expert failures), "
                            f"mean length {st['mean_length']:.1f}, {st['seconds']:.1f}s")
                    pool_stats = pool_future.result() if pool_future else None
                except BaseException:
                    ex.shutdown(cancel_futures=True)  # report the failure now, not after every queued job has run
                    raise
        for s, i, st in results:
            rel = task_file(out, s, i).relative_to(out)
            stats[str(rel)] = {**{k: v for k, v in st.items() if k != "seconds"}, "sha256": sha256_file(tmps[s, i])}
        if pool_tmp:
            stats[str(PRETRAIN_FILE)] = {**{k: v for k, v in pool_stats.items() if k != "seconds"},
                                         "sha256": sha256_file(pool_tmp)}
    return stats


def cli() -> int:
    return run_cli("tabletop generate", GenerateConfig, main, (ValueError, DemoFailure))


if __name__ == "__main__":
    sys.exit(cli())
