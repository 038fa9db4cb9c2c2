"""Write a run's results table (markdown + CSV) and plots into a directory."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from experiments.robot.harness.results import ResultsError
from experiments.robot.harness.summary import routing_confusions, success_table, summary_markdown, task_csv

SUMMARY_MARKER = ".mergevla-summary"
SUMMARY_FILE = re.compile(r"\.?(results(_by_\w+)?\.(md|csv)|success_bars\.png|routing_.*\.png)(\..*)?")


def write_summary(rows: Sequence[dict], out_dir: Path | str, plots: bool = True,
                  flag: str = "summary directory") -> dict[str, Path]:
    """results.md, results.csv (paper layout), results_by_task.csv, results_by_category.csv (LIBERO-Plus),
    success_bars.png, routing_<method>.png. Returns the paths written. A directory holding other files (not an
    earlier summary's) is refused: FileExistsError naming `flag`."""
    from prismatic.io import claim_output_dir, write_text  # imports torch: keep it out of worker start-up

    if not rows:
        raise ResultsError("no finished episodes to summarise")
    table, markdown = success_table(rows), summary_markdown(rows)  # rows a table cannot count: before any write
    out = claim_output_dir(out_dir, flag, SUMMARY_MARKER, SUMMARY_FILE.fullmatch)
    paths = {"markdown": out / "results.md", "csv": out / "results.csv"}
    write_text(paths["markdown"], markdown)
    write_text(paths["csv"], table.to_csv())
    if by_task := task_csv(rows):
        paths["csv_by_task"] = out / "results_by_task.csv"
        write_text(paths["csv_by_task"], by_task)
    cat_rows = [r for r in rows if "category" in r]
    if cat_rows:
        paths["csv_by_category"] = out / "results_by_category.csv"
        write_text(paths["csv_by_category"], success_table(cat_rows, column_key="category").to_csv())
    if plots:
        from experiments.robot.harness.plots import confusion_matrix, success_bars  # matplotlib: only when drawing

        paths["bars"] = success_bars(table, out / "success_bars.png")
        for conf in routing_confusions(rows):
            slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", conf.method).strip("_") or "policy"
            paths[f"routing_{slug}"] = confusion_matrix(conf, out / f"routing_{slug}.png")
    return paths
