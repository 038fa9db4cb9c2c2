"""`make demo` against its targets: wall time (full ≤ 20 min, quick ≤ 5 min on 2 cores after install) and
FT experts ≥ 90% success per suite (full mode only).

    python benchmarks/demo_time.py                      # runs the full demo into runs/demo (cached stages reused)
    python benchmarks/demo_time.py --quick true
    python benchmarks/demo_time.py --run false          # only read runs/demo/timing.json of an earlier run

A run whose stages came from the cache is reported with the wall time of its stages when they ran, as
recorded in their stage.json, so the figure is the cost of a cold run. Prints figures; exits 1 when a target
is missed (0 otherwise), so it can gate a release by hand. It never alters the table.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import draccus

from experiments.robot.demo import DemoConfig
from experiments.robot.demo import main as run_demo

TARGET_WALL_S = {"full": 20 * 60, "quick": 5 * 60}
TARGET_FT_SUCCESS = 0.90  # per suite, full mode


@dataclass
class DemoTimeConfig:
    quick: bool = False
    run: bool = True  # run (or resume) the demo first; False: read an earlier run's timing.json
    out_dir: Path | None = None  # default: the demo's own (runs/demo or runs/demo-quick)
    seed: int = 0


def cold_wall_s(out_dir: Path, timing: dict) -> tuple[float, dict[str, float]]:
    """Per-stage wall time of a cold run: cached stages count with the time they took when they ran."""
    stages = {}
    for name, t in timing["stages"].items():
        rec = out_dir / name / "stage.json"
        stages[name] = json.loads(rec.read_text())["wall_s"] if t["cached"] and rec.is_file() else t["wall_s"]
    return sum(stages.values()), stages


def main(cfg: DemoTimeConfig) -> int:
    demo = DemoConfig(quick=cfg.quick, seed=cfg.seed, out_dir=cfg.out_dir)
    out_dir = Path(demo.pipeline_config().out_dir)
    if cfg.run:
        run_demo(demo)
    timing_file = out_dir / "timing.json"
    if not timing_file.is_file():
        print(f"error: {timing_file} not found; run the demo first (or --run true)", file=sys.stderr)
        return 2
    timing = json.loads(timing_file.read_text())
    mode = "quick" if cfg.quick else "full"
    total, stages = cold_wall_s(out_dir, timing)
    m = timing["machine_start"]
    print(f"demo ({mode}) on {m['cpus']} CPU(s), torch {m['torch']}, load {m['loadavg_1m']:.2f} at the start")
    order = ["data", "base", "train", "merge", "eval", "report"]
    for name, s in sorted(stages.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)):
        print(f"  {name:<8} {s:8.1f} s")
    ok_time = total <= TARGET_WALL_S[mode]
    print(f"wall time (cold) {total:.0f} s = {total / 60:.1f} min; target ≤ {TARGET_WALL_S[mode] / 60:.0f} min: "
          f"{'met' if ok_time else 'MISSED'}")
    ok_ft = True
    for suite, rate in timing["ft_success"].items():
        line = f"FT expert {suite:<8} {'–' if rate is None else f'{100 * rate:.1f}%'}"
        if mode == "full":
            met = rate is not None and rate >= TARGET_FT_SUCCESS
            ok_ft &= met
            line += f"; target ≥ {100 * TARGET_FT_SUCCESS:.0f}%: {'met' if met else 'MISSED'}"
        print(line)
    return 0 if ok_time and ok_ft else 1


if __name__ == "__main__":
    sys.exit(main(draccus.parse(DemoTimeConfig)))
