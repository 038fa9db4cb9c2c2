"""LIBERO evaluation throughput on this machine: env steps/s, and episodes/hour with 1 vs N parallel envs.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.eval_throughput --num_envs '[1,2]' --episodes 4

Uses a tiny random-weight checkpoint (the policy cost is negligible next to simulation on CPU), real LIBERO
environments, and the shared harness exactly as `run_libero_eval` does. Episodes are short (`max_steps`) so
the numbers include the per-episode set-up (simulator reset to a fixed init state, 10 no-ops) that dominates
short CPU runs; every run starts cold (new worker processes build their simulators).
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from prismatic.cli import check_counts, run_cli


@dataclass
class ThroughputConfig:
    suite: str = "libero_spatial"  # LIBERO suite whose task is rolled out
    task_id: int = 0  # the task within the suite
    episodes: int = 4  # per setting; trial k uses init state k
    max_steps: int = 40  # policy steps per episode (5 chunks of 8)
    num_envs: list[int] = field(default_factory=lambda: [1, 2])  # parallel env settings compared
    env_img_res: int = 256  # rendered camera size
    fast_render: bool = True  # the CPU smoke-run renderer; set false for the published settings
    step_rate_steps: int = 30  # steps timed per renderer for the raw env step rate (0: skip)
    seed: int = 7  # the evaluation's seed (run_libero_eval's --seed)


def tiny_checkpoint(directory: Path) -> Path:
    from prismatic.models import BaseModelConfig, build_vla, save_pretrained

    model = build_vla("tiny", BaseModelConfig(random_seed=0), seed=0)
    model.norm_stats = {"action": {"q01": [-1.0] * 6 + [0.0], "q99": [1.0] * 7, "mask": [True] * 6 + [False]},
                        "proprio": {"q01": [-1.0] * 8, "q99": [1.0] * 8, "mask": [True] * 8}}
    return save_pretrained(model, directory / "tiny")


def step_rate(cfg: ThroughputConfig, fast: bool) -> float:
    from experiments.robot.libero.env import LiberoEnvFactory

    factory = LiberoEnvFactory(cfg.env_img_res, fast_render=fast)
    env = factory(cfg.suite, cfg.task_id, 0)
    env.reset()
    noop = np.array([0, 0, 0, 0, 0, 0, -1.0])
    t0 = time.perf_counter()
    for _ in range(cfg.step_rate_steps):
        env.step(noop)
    rate = cfg.step_rate_steps / (time.perf_counter() - t0)
    factory.close()
    return rate


def main(cfg: ThroughputConfig) -> dict[int, float]:
    check_counts(cfg, positive=("episodes", "max_steps", "env_img_res"), non_negative=("task_id", "step_rate_steps"))
    if not cfg.num_envs or min(cfg.num_envs) < 1:
        raise ValueError(f"--num_envs is {cfg.num_envs}, expected a non-empty list of counts >= 1")
    from experiments.robot.libero.run_libero_eval import GenerateConfig
    from experiments.robot.libero.run_libero_eval import main as run_eval

    if cfg.step_rate_steps:
        for fast in (False, True):
            print(f"env.step at {cfg.env_img_res} px, {'fast' if fast else 'default'} renderer: "
                  f"{step_rate(cfg, fast):.2f} steps/s")
    per_hour: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = tiny_checkpoint(Path(tmp))
        for n in cfg.num_envs:
            gen = GenerateConfig(pretrained_checkpoint=ckpt, task_suites=[cfg.suite], task_ids=[cfg.task_id],
                                 num_trials_per_task=cfg.episodes, max_steps=cfg.max_steps, num_envs=n,
                                 env_img_res=cfg.env_img_res, fast_render=cfg.fast_render, seed=cfg.seed,
                                 device="cpu", results_dir=Path(tmp) / f"envs{n}")
            t0 = time.perf_counter()
            rows = run_eval(gen)
            wall = time.perf_counter() - t0
            steps = sum(r["steps"] + gen.num_steps_wait for r in rows)
            per_hour[n] = 3600.0 * len(rows) / wall
            print(f"== {n} env(s): {len(rows)} episodes in {wall:.1f}s → {per_hour[n]:.1f} episodes/hour, "
                  f"{steps / wall:.2f} env steps/s overall (set-up included)")
    base = cfg.num_envs[0]
    for n in cfg.num_envs[1:]:
        print(f"speed-up {n} vs {base} env(s): {per_hour[n] / per_hour[base]:.2f}x")
    return per_hour


if __name__ == "__main__":
    sys.exit(run_cli("eval_throughput", ThroughputConfig, main, (ValueError,)))
