"""Write the results table (markdown + CSV) and plots from one or more results JSONL files.

    python -m experiments.robot.harness.summarize --results '[runs/ft_spatial.jsonl,runs/ties.jsonl]' \
        --out_dir runs/summary
    python -m experiments.robot.harness.summarize --results_dir runs/libero     # → runs/libero/summary
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from experiments.robot.harness.report import write_summary
from experiments.robot.harness.results import ResultsError, read_many
from prismatic.cli import run_cli


@dataclass
class SummarizeConfig:
    results: list[Path] = field(default_factory=list)  # results JSONL files
    results_dir: Path | None = None  # or: every *.jsonl directly in this directory
    # where the tables and plots go (default: <results_dir>/summary, where the evaluation writes its own;
    # runs/summary when only --results is given); a directory holding other files is refused
    out_dir: Path | None = None
    plots: bool = True  # success_bars.png and the routing confusion matrices (matplotlib)


def main(cfg: SummarizeConfig) -> dict[str, Path]:
    files = list(cfg.results)
    if cfg.results_dir is not None:
        if not cfg.results_dir.is_dir():
            raise ResultsError(f"results_dir {cfg.results_dir} is not a directory")
        files += sorted(cfg.results_dir.glob("*.jsonl"))
    if not files:
        raise ResultsError("no results files given: set --results '[a.jsonl,...]' or --results_dir DIR")
    out_dir = cfg.out_dir or (cfg.results_dir / "summary" if cfg.results_dir is not None else Path("runs/summary"))
    paths = write_summary(read_many(files), out_dir, cfg.plots, flag="out_dir")
    print(Path(paths["markdown"]).read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return paths


if __name__ == "__main__":
    sys.exit(run_cli("summarize", SummarizeConfig, main, (ResultsError, KeyError)))
