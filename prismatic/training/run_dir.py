"""The run directory: its identity, its checkpoints and the optimizer state that makes them resumable.

    <out_dir>/run.json                            what this run trains (config, data fingerprint)
    <out_dir>/metrics.jsonl                       one line per logged step
    <out_dir>/checkpoints/step_<N>/model.safetensors + manifest.json   (the model checkpoint format)
    <out_dir>/checkpoints/step_<N>/train_state.pt                      (optimizer + data position)

`train_state.pt` is written before the model checkpoint, whose manifest is written last: a step directory
with a manifest is complete. It holds plain tensors and numbers only (`torch.load(weights_only=True)`).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from prismatic.checkpoint import MANIFEST_FILE
from prismatic.cli import changed_fields
from prismatic.io import atomic_path, check_output_dir, read_json_object, write_json
from prismatic.training.config import FinetuneConfig, run_identity

RUN_FILE = "run.json"
RUN_FORMAT = "mergevla-finetune-run"
METRICS_FILE = "metrics.jsonl"
TRAIN_STATE_FILE = "train_state.pt"
TRAIN_STATE_FORMAT = "mergevla-train-state"
STEP_DIR = re.compile(r"step_(\d+)")


class RunDirError(RuntimeError):
    """The output directory holds something this run must not overwrite or cannot continue."""


def step_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:06d}"


def complete_checkpoints(run: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every finished checkpoint that can be resumed from, oldest first."""
    root = run / "checkpoints"
    if not root.is_dir():
        return []
    out = []
    for d in root.iterdir():
        m = STEP_DIR.fullmatch(d.name)
        if m and (d / MANIFEST_FILE).is_file() and (d / TRAIN_STATE_FILE).is_file():
            out.append((int(m.group(1)), d))
    return sorted(out)


def resumable_checkpoints(run: Path, max_steps: int) -> list[tuple[int, Path]]:
    """The finished checkpoints a run ending at `max_steps` can continue from, oldest first. A run may hold some
    past max_steps (same identity, e.g. constant lr, once trained longer); it continues from the last one not beyond."""
    return [c for c in complete_checkpoints(run) if c[0] <= max_steps]


def check_run_dir(cfg: FinetuneConfig) -> dict | None:
    """Refuse an out_dir that holds another run (or this one without --resume). Returns its run.json."""
    run = cfg.run_dir()
    try:
        check_output_dir(run, "out_dir")
    except NotADirectoryError as e:
        raise RunDirError(str(e)) from e
    if not run.exists():
        return None
    rf = run / RUN_FILE
    if not rf.is_file():
        if any(run.iterdir()):
            raise RunDirError(f"out_dir {run} is not empty and holds no {RUN_FILE}: it is not a mergevla run; "
                              "refusing to write into it (choose another --out_dir)")
        return None
    recorded = read_json_object(rf, RunDirError)
    if recorded.get("format") != RUN_FORMAT:
        raise RunDirError(f"{rf}: field 'format' is {recorded.get('format')!r}, expected {RUN_FORMAT!r}")
    if not cfg.resume:
        raise RunDirError(f"out_dir {run} already holds a run; pass --resume true to continue it, "
                          "or choose another --out_dir (nothing was overwritten)")
    if not isinstance(recorded.get("config"), dict):
        raise RunDirError(f"{rf}: field 'config' is {recorded.get('config')!r}, expected an object")
    old, new = run_identity(recorded["config"]), run_identity(cfg.to_dict())
    if detail := changed_fields(old, new):
        raise RunDirError(f"out_dir {run} holds a different run (config differs in {detail}); "
                          "choose another --out_dir")
    return recorded


def check_data_fingerprint(recorded: dict | None, fingerprint: str, run: Path) -> None:
    if recorded and recorded.get("data_fingerprint") not in (None, fingerprint):
        raise RunDirError(f"{run / RUN_FILE} was trained on data {recorded['data_fingerprint'][:12]}…, but the "
                          f"dataset now fingerprints to {fingerprint[:12]}…; choose another --out_dir")


def write_run_file(cfg: FinetuneConfig, run_id: str, fingerprint: str, dataset_info: dict) -> None:
    write_json(cfg.run_dir() / RUN_FILE, {"format": RUN_FORMAT, "run_id": run_id, "config": cfg.to_dict(),
                                          "data_fingerprint": fingerprint, "dataset": dataset_info})


def save_train_state(d: Path, step: int, samples_seen: int, optimizer: torch.optim.Optimizer, world_size: int) -> None:
    d.mkdir(parents=True, exist_ok=True)
    state = {"format": TRAIN_STATE_FORMAT, "step": step, "samples_seen": samples_seen, "world_size": world_size,
             "optimizer": optimizer.state_dict()}
    with atomic_path(d / TRAIN_STATE_FILE) as tmp:
        torch.save(state, tmp)


def load_train_state(d: Path, device: torch.device) -> dict:
    f = d / TRAIN_STATE_FILE
    try:
        state = torch.load(f, map_location=device, weights_only=True)
    except Exception as e:  # torch raises several types for truncated / foreign files
        raise RunDirError(f"{f} cannot be read ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or state.get("format") != TRAIN_STATE_FORMAT:
        raise RunDirError(f"{f}: not a {TRAIN_STATE_FORMAT} file")
    return state


def prune_train_states(run: Path, keep: int, step: int) -> None:
    """Of the checkpoints up to `step` (the one just saved), delete all but the newest `keep` optimizer states
    (they are large); model weights stay, and so do later checkpoints a longer run of the same identity left."""
    for _, d in [c for c in complete_checkpoints(run) if c[0] <= step][:-keep]:
        (d / TRAIN_STATE_FILE).unlink(missing_ok=True)
