"""The paper's results table from per-episode rows: one row per method (the fine-tuned experts, then each
merge method), one column per suite (or LIBERO-Plus perturbation dimension), plus the average.

Cells are success rates in percent; `avg` is the unweighted mean of the method's cells, as in the paper, and
is left empty for a method that lacks a column the others have (its mean would not be comparable).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

from experiments.robot.harness.results import ResultsError

SUITE_LABELS = {
    "libero_spatial": "Spatial",
    "libero_object": "Object",
    "libero_goal": "Goal",
    "libero_10": "Long",
    "libero_90": "LIBERO-90",
    "spatial": "Spatial",  # TableTop-4's suites, in the same (paper) order
    "object": "Object",
    "goal": "Goal",
    "long": "Long",
}
FT_METHOD = "FT experts"  # the method label of per-suite fine-tuned checkpoints: listed first
BASELINE_FT_METHOD = "Baseline FT experts (self-attn)"  # the same for the self-attention baseline: listed second
FT_METHODS = (FT_METHOD, BASELINE_FT_METHOD)  # rows made of one checkpoint per suite
ROUTED_KEYS = ("routed_expert", "routed_task")  # the routed policy's per-episode info field (either name)
MAX_TASK_COLUMNS = 20  # a suite with more tasks gets its per-task figures in the CSV only


def routed(row: dict):
    """The expert the router chose for this episode, or None when the policy does not route."""
    return next((row[k] for k in ROUTED_KEYS if row.get(k) is not None), None)


@dataclass
class Table:
    title: str
    methods: list[str]
    columns: list[str]
    counts: dict[tuple[str, str], tuple[int, int]]  # (method, column) -> (successes, episodes)

    def rate(self, method: str, column: str) -> float | None:
        s, n = self.counts.get((method, column), (0, 0))
        return 100.0 * s / n if n else None

    def avg(self, method: str) -> float | None:
        rates = [self.rate(method, c) for c in self.columns]
        return None if None in rates else sum(rates) / len(rates)

    def labels(self) -> list[str]:
        return [SUITE_LABELS.get(c, c) for c in self.columns]

    def to_markdown(self) -> str:
        head = ["method", *self.labels(), "avg"]
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
        for m in self.methods:
            cells = [_fmt(self.rate(m, c)) for c in self.columns] + [_fmt(self.avg(m))]
            lines.append("| " + " | ".join([m, *cells]) + " |")
        return "\n".join(lines) + "\n"

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["method", *self.labels(), "avg"])
        for m in self.methods:
            w.writerow([m, *[_fmt(self.rate(m, c), "") for c in self.columns], _fmt(self.avg(m), "")])
        return buf.getvalue()

    def episodes_markdown(self) -> str:
        """Episode counts per cell, so a table built from a partial run cannot pass for a full one."""
        return self._cells_markdown(lambda k, n: str(n))

    def intervals_markdown(self) -> str:
        """95% Wilson intervals of each cell's rate, in percent: how far a cell may move by chance alone."""
        return self._cells_markdown(lambda k, n: "–" if n == 0 else "{:.1f}–{:.1f}".format(*wilson_interval(k, n)))

    def _cells_markdown(self, cell) -> str:
        lines = ["| method | " + " | ".join(self.labels()) + " |", "|---|" + "---:|" * len(self.columns)]
        for m in self.methods:
            cells = [cell(*self.counts.get((m, c), (0, 0))) for c in self.columns]
            lines.append("| " + " | ".join([m, *cells]) + " |")
        return "\n".join(lines) + "\n"


def wilson_interval(successes: int, episodes: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a success rate, in percent (z = 1.96: 95%); sound at 0 and at n successes."""
    p, n = successes / episodes, episodes
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return 100.0 * max(0.0, centre - half), 100.0 * min(1.0, centre + half)


def _fmt(x: float | None, missing: str = "–") -> str:
    return missing if x is None else f"{x:.1f}"


def _ordered(values: Sequence[str], preferred: Sequence[str]) -> list[str]:
    seen = list(dict.fromkeys(values))
    return [v for v in preferred if v in seen] + [v for v in seen if v not in preferred]


def success_table(rows: Sequence[dict], column_key: str = "suite", method_key: str = "method",
                  title: str = "Success rate (%)") -> Table:
    counts: dict[tuple[str, str], list[int]] = {}
    seen: dict[tuple[str, str], dict] = {}
    for n, r in enumerate(rows, 1):
        for k in (column_key, "success"):
            if k not in r:
                raise KeyError(f"results row {n} ({r.get('key', '?')}) has no field {k!r}")
        method = str(r.get(method_key, "policy"))
        if "key" in r:  # one episode counted twice would weigh two runs that share a method label as one
            first = seen.setdefault((method, r["key"]), r)
            if first is not r:
                raise ResultsError(
                    f"episode {r['key']} of method {method!r} appears twice (checkpoints {first.get('checkpoint')} "
                    f"and {r.get('checkpoint')}): two runs share that method label; give them different labels "
                    "(--method) or summarise them separately"
                )
        cell = counts.setdefault((method, str(r[column_key])), [0, 0])
        cell[0] += bool(r["success"])
        cell[1] += 1
    methods = _ordered([m for m, _ in counts], FT_METHODS)
    columns = _ordered([c for _, c in counts], list(SUITE_LABELS))
    return Table(title, methods, columns, {k: (v[0], v[1]) for k, v in counts.items()})


def task_tables(rows: Sequence[dict]) -> dict[str, Table]:
    """Per suite, success by task: one row per method, one column per task id (in numeric order). Empty when
    some row lacks a task id (rows written before it was logged)."""
    if not rows or any("task_id" not in r for r in rows):
        return {}
    out = {}
    for suite in _ordered([str(r["suite"]) for r in rows], list(SUITE_LABELS)):
        table = success_table([r for r in rows if str(r["suite"]) == suite], column_key="task_id",
                              title=f"{SUITE_LABELS.get(suite, suite)}: success rate (%) by task")
        table.columns.sort(key=int)
        out[suite] = table
    return out


def task_csv(rows: Sequence[dict]) -> str:
    """One line per (method, suite, task): successes, episodes, rate in percent, and the task's name. Empty
    when `task_tables` is."""
    tables = task_tables(rows)
    if not tables:
        return ""
    names = {(str(r["suite"]), str(r["task_id"])): r.get("task", "") for r in rows}
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["method", "suite", "task_id", "task", "successes", "episodes", "success_rate"])
    for suite, table in tables.items():
        for m in table.methods:
            for c in table.columns:
                if (m, c) in table.counts:
                    k, n = table.counts[(m, c)]
                    w.writerow([m, suite, c, names[(suite, c)], k, n, _fmt(table.rate(m, c))])
    return buf.getvalue()


@dataclass
class Confusion:
    method: str
    true_labels: list[str]
    pred_labels: list[str]
    counts: list[list[int]]  # [true][pred]

    @property
    def accuracy(self) -> float:
        total = sum(map(sum, self.counts))
        hits = sum(self.counts[i][self.pred_labels.index(t)] for i, t in enumerate(self.true_labels)
                   if t in self.pred_labels)
        return 100.0 * hits / total if total else 0.0


def routing_confusions(rows: Sequence[dict], method_key: str = "method") -> list[Confusion]:
    """One confusion matrix per method, over rows that logged both `expected_expert` and the routed expert."""
    by_method: dict[str, list[dict]] = {}
    for r in rows:
        if routed(r) is not None and r.get("expected_expert") is not None:
            by_method.setdefault(str(r.get(method_key, "policy")), []).append(r)
    out = []
    for method, rs in by_method.items():
        true = _ordered([str(r["expected_expert"]) for r in rs], list(SUITE_LABELS))
        # every true label is a column, in the rows' order, so the diagonal holds the right answers
        pred = true + [p for p in _ordered([str(routed(r)) for r in rs], true) if p not in true]
        m = [[0] * len(pred) for _ in true]
        for r in rs:
            m[true.index(str(r["expected_expert"]))][pred.index(str(routed(r)))] += 1
        out.append(Confusion(method, true, pred, m))
    return out


def summary_markdown(rows: Sequence[dict]) -> str:
    """Everything a person reads after a run: tables by suite (and by perturbation dimension) and routing."""
    parts = []
    by_suite = success_table(rows)
    parts += ["## Success rate (%) by suite\n", by_suite.to_markdown(), "\nEpisodes per cell:\n",
              by_suite.episodes_markdown(), "\n95% interval of each cell (Wilson, %): where its true rate "
              "may lie, given the episodes run\n", by_suite.intervals_markdown()]
    if any("category" in r for r in rows):
        by_cat = success_table([r for r in rows if "category" in r], column_key="category")
        parts += ["\n## Success rate (%) by perturbation dimension (LIBERO-Plus)\n", by_cat.to_markdown()]
    for suite, table in task_tables(rows).items():
        parts.append(f"\n## {table.title}\n\n")
        if len(table.columns) > MAX_TASK_COLUMNS:  # LIBERO-Plus: thousands of perturbed tasks, one episode each
            parts.append(f"{len(table.columns)} tasks: see results_by_task.csv\n")
            continue
        parts.append(table.to_markdown())
        named = {str(r["task_id"]): r.get("task") for r in rows if str(r["suite"]) == suite and r.get("task")}
        if named:
            parts.append("\n" + "".join(f"- task {c}: {named[c]}\n" for c in table.columns if c in named))
    confusions = routing_confusions(rows)
    if confusions:
        parts.append("\n## Routing accuracy (first observation of each episode)\n")
        parts.append("| method | episodes | accuracy (%) |\n|---|---:|---:|\n")
        parts += [f"| {c.method} | {sum(map(sum, c.counts))} | {c.accuracy:.1f} |\n" for c in confusions]
    mixed = mixed_runs(rows)
    if mixed:
        parts.append("\n## Warning: rows that mix evaluation protocols or checkpoints\n\n")
        parts += [f"- {m}\n" for m in mixed]
    return "".join(parts)


def _run_of(r: dict) -> str | None:
    """The weights a row's episode ran (LIBERO: the checkpoint's hash or path; TableTop-4: the policy id)."""
    v = r.get("checkpoint_sha256") or r.get("checkpoint") or r.get("policy_id")
    return None if v is None else str(v)


def mixed_runs(rows: Sequence[dict], method_key: str = "method") -> list[str]:
    """One line per table row whose figures do not compare: its episodes ran under more than one protocol
    (e.g. an old fast-render run of one suite beside a full run of another), or, outside the FT experts' rows
    (one checkpoint per suite), came from more than one checkpoint (e.g. a re-merge evaluated on some suites
    beside the old merge on the others, both labelled by the algorithm)."""
    out = []
    for method in sorted({str(r.get(method_key, "policy")) for r in rows}):
        mine = [r for r in rows if str(r.get(method_key, "policy")) == method]
        protocols = [r["protocol"] for r in mine if isinstance(r.get("protocol"), dict)]
        distinct = {json.dumps(p, sort_keys=True) for p in protocols}
        if len(distinct) > 1:
            fields = sorted({k for p in protocols for k in p if len({json.dumps(q.get(k)) for q in protocols}) > 1})
            out.append(f"{method}: {len(distinct)} protocols among its episodes (they differ in {', '.join(fields)})")
        groups: dict[str, set[str]] = {}
        for r in mine:
            if (run := _run_of(r)) is not None:
                groups.setdefault(str(r.get("suite")) if method in FT_METHODS else "", set()).add(run)
        for suite, runs in sorted(groups.items()):
            if len(runs) > 1:
                where = f" on {suite}" if suite else ""
                out.append(f"{method}: its episodes{where} come from {len(runs)} checkpoints ({', '.join(sorted(runs))})")
    return out
