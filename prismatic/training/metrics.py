"""Metrics go to `<out_dir>/metrics.jsonl` always, and to Weights & Biases when enabled (offline by default)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from prismatic.io import write_text
from prismatic.training.config import ConfigError, FinetuneConfig


def _row(line: str) -> dict | None:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:  # a line torn by a kill
        return None
    return row if isinstance(row, dict) else None


def read_metrics(path: Path) -> list[dict]:
    """The logged rows; a torn line (a longer run's, which a resume does not truncate when it stops early) is
    skipped."""
    if not path.is_file():
        return []
    return [r for line in path.read_text().splitlines() if (r := _row(line)) is not None]


def truncate_metrics(path: Path, after_step: int, also_keep: range = range(0)) -> None:
    """On resume, drop lines logged after the checkpoint (those steps are trained again), except the steps in
    `also_keep`: the history of a longer run's checkpoints that stay in the directory."""
    if not path.is_file():
        return
    kept = [ln for ln in path.read_text().splitlines() if (r := _row(ln)) is not None
            and isinstance(r.get("step"), int) and (r["step"] <= after_step or r["step"] in also_keep)]
    write_text(path, "".join(ln + "\n" for ln in kept))


def sort_metrics(path: Path) -> None:
    """Order the lines by step, as a resume that kept a longer run's later lines leaves them before its own."""
    rows = [(r["step"], ln) for ln in path.read_text().splitlines()
            if (r := _row(ln)) is not None and isinstance(r.get("step"), int)] if path.is_file() else []
    if any(a[0] > b[0] for a, b in zip(rows, rows[1:])):
        write_text(path, "".join(ln + "\n" for _, ln in sorted(rows, key=lambda r: r[0])))


def _has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def check_wandb(cfg: FinetuneConfig):
    """Import wandb and make sure it can never stop at a login prompt; errors before training starts."""
    if not cfg.wandb:
        return None
    try:
        import wandb
    except ImportError as e:
        raise ConfigError("wandb is true but the wandb package is missing: pip install -e '.[wandb]' "
                          "(or run with --wandb false; metrics always go to metrics.jsonl)") from e
    if cfg.wandb_mode == "online" and not _has_wandb_credentials():
        raise ConfigError("wandb_mode is 'online' but no WANDB_API_KEY (or ~/.netrc entry) is set; use "
                          "--wandb_mode offline (sync later with `wandb sync`)")
    return wandb


class MetricsLogger:
    def __init__(self, cfg: FinetuneConfig, run_id: str, enabled: bool):
        self.enabled = enabled
        self.path = cfg.run_dir() / "metrics.jsonl"
        self.wandb_run = None
        if enabled and cfg.wandb:
            wandb = check_wandb(cfg)
            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb_run = wandb.init(project=cfg.wandb_project, name=cfg.run_dir().name, id=run_id,
                                        resume="allow", mode=cfg.wandb_mode, dir=str(cfg.run_dir()),
                                        config=cfg.to_dict())

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:  # append-only; truncate_metrics drops a torn line
            f.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
