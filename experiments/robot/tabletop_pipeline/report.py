"""Stage 6: the demo's table, routing accuracy per suite, the router-subspace ablation and wall time.

Written to `<out_dir>`: `demo_table.md` (everything below), `summary/` (the harness's results.md, results.csv
and PNG plots), `routing.json`, `timing.json` (stage wall times, machine, load; read by
benchmarks/demo_time.py), and a line appended to `timing_history.jsonl` per run.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from experiments.robot.harness import FT_METHOD, success_table, write_summary
from experiments.robot.tabletop_pipeline.evaluation import load_rows
from model_merging.router import ALL_VARIANTS

VARIANT_LABELS = {"value": "value-only", "key": "key-only", "key_value": "key+value",
                  "value_update": "value, learned update", "exemplar": "exemplar (beyond the paper)"}


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def routing_tables(eval_out: dict, suites: list[str]) -> tuple[str, str]:
    """(per-suite routing accuracy in the rollouts, first-observation accuracy by router variant)."""
    routed = [r for r in eval_out.values() if "first_obs_routing" in r]
    if not routed:
        return "", ""
    head = "| method | " + " | ".join(suites) + " | all |\n|---|" + "---:|" * (len(suites) + 1) + "\n"
    per_suite = head + "".join(
        f"| {r['label']} | " + " | ".join(_pct(r["rollout_routing"].get(s)) for s in suites)
        + f" | {_pct(r['rollout_routing'].get('all'))} |\n" for r in routed)
    variants = [v for v in ALL_VARIANTS if any(v in r["first_obs_routing"] for r in routed)]
    cols = [VARIANT_LABELS[v] for v in variants]
    ablation = ("| method | " + " | ".join(cols) + " |\n|---|" + "---:|" * len(cols) + "\n" + "".join(
        f"| {r['label']} | " + " | ".join(_pct(r["first_obs_routing"].get(v, {}).get("all")) for v in variants)
        + " |\n" for r in routed))
    return per_suite, ablation


def timing_table(timing: dict) -> str:
    lines = ["| stage | wall (s) | cached |", "|---|---:|---|"]
    for name, t in timing["stages"].items():
        lines.append(f"| {name} | {t['wall_s']:.1f} | {'yes' if t['cached'] else 'no'} |")
    return "\n".join(lines) + "\n"


def build_report(cfg, results: dict, planned_keys: set[str], timing: dict, order: list[str]) -> dict:
    """`order`: the table's method labels, top to bottom."""
    eval_out = {r["label"]: r for r in results["eval"].outputs.values()}
    eval_out = {label: eval_out[label] for label in order if label in eval_out}
    rows = [r for r in load_rows(eval_out) if r["key"] in planned_keys]
    rows.sort(key=lambda r: (order.index(r["method"]) if r["method"] in order else len(order), r["key"]))
    table = success_table(rows)
    per_suite, ablation = routing_tables(eval_out, list(cfg.suites))
    trained = results["train"].outputs
    return {"rows": rows, "table": table, "table_markdown": table.to_markdown(), "routing_per_suite": per_suite,
            "routing_ablation": ablation, "train": trained, "merge": results["merge"].outputs,
            "eval": eval_out, "base": results["base"].outputs, "data": results["data"].outputs}


def render(cfg, report: dict) -> str:
    t = report["timing"]
    ms, me = t["machine_start"], t["machine_end"]
    tasks = "all 10" if cfg.task_ids is None else f"{len(cfg.task_ids)} ({', '.join(map(str, cfg.task_ids))})"
    parts = [
        f"# TableTop-4 demo ({t['started']})\n\n",
        f"Suites {', '.join(cfg.suites)}; tasks per suite: {tasks}; {cfg.trials_per_task} episode(s) per task "
        f"({report['table'].counts and max(n for _, n in report['table'].counts.values())} per suite and row); "
        f"{cfg.demos_per_task} demos per task; {cfg.expert_steps} steps per expert, {cfg.joint_steps} for the joint "
        f"model (batch {cfg.batch_size}, {cfg.action_loss.upper()} action loss); seed {cfg.seed}.\n\n",
        "## Success rate (%)\n\n", report["table_markdown"],
    ]
    if report["routing_per_suite"]:
        parts += ["\n## Routing accuracy (%) per suite (first observation of each rollout, routed as the row "
                  f"says: \"+ router\" = {VARIANT_LABELS[cfg.router_variant]})\n\n", report["routing_per_suite"],
                  "\n## Router variants (%, all suites, first observations)\n\n", report["routing_ablation"]]
    # in job order (a cached stage's outputs come back with their keys sorted)
    jobs = [f"{fam}/{s}" for fam in ("mergevla", "baseline") for s in cfg.suites] + ["joint"]
    ft = sorted(report["train"].values(), key=lambda r: jobs.index(r["name"]) if r["name"] in jobs else len(jobs))
    parts += [f"\n## Training\n\n| run | steps | final {cfg.action_loss.upper()} loss | wall (s) | steps/s |\n"
              "|---|---:|---:|---:|---:|\n"]
    parts += [f"| {r['name']} | {r['steps']} | {r['final_loss']} | {r['wall_s']} | {r['steps_per_s']} |\n" for r in ft]
    parts += ["\n## Wall time\n\n", timing_table(t),
              f"\nTotal {t['total_wall_s']:.0f} s on {ms['cpus']} CPU(s) ({ms['platform']}; torch {ms['torch']}), "
              f"load average {ms['loadavg_1m']:.2f} at the start and {me['loadavg_1m']:.2f} at the end.\n"]
    return "".join(parts)


def ft_success(table, suites) -> dict[str, float | None]:
    """FT experts' success per suite as a fraction (the table itself is in %); None where nothing ran."""
    return {s: (None if (r := table.rate(FT_METHOD, s)) is None else r / 100) for s in suites}


def write_report(cfg, report: dict, root: Path, log=print) -> None:
    from prismatic.io import write_json, write_text

    text = render(cfg, report)
    paths = write_summary(report["rows"], root / "summary", plots=cfg.plots)
    written = {Path(p).name for p in paths.values()}
    for old in (root / "summary").glob("*"):  # tables and plots of an earlier run's rows would read as this run's
        if old.is_file() and (old.suffix == ".png" or old.name.startswith("results.")) and old.name not in written:
            old.unlink()
    write_text(root / "demo_table.md", text)
    write_json(root / "routing.json", {r["label"]: {"first_obs": r["first_obs_routing"],
                                                    "rollouts": r.get("rollout_routing")}
                                       for r in report["eval"].values() if "first_obs_routing" in r})
    table = report["table"]
    ft = ft_success(table, cfg.suites)
    timing = {**report["timing"], "ft_success": ft,
              "success_pct": {m: {c: table.rate(m, c) for c in table.columns} for m in table.methods}}
    write_json(root / "timing.json", timing)
    with open(root / "timing_history.jsonl", "a") as f:
        f.write(json.dumps({"finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                            "total_wall_s": timing["total_wall_s"], "stages": timing["stages"],
                            "loadavg_1m_start": timing["machine_start"]["loadavg_1m"], "ft_success": ft}) + "\n")
    log("\n" + text)
    log(f"[report] {root / 'demo_table.md'}; table, CSV and plots in {root / 'summary'} "
        f"({', '.join(sorted(p.name for p in paths.values()))})")
