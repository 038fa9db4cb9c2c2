"""Exemplar router (beyond the paper): route each episode to the expert whose own training episodes began most
like it.

The paper's router (router.py) needs only the experts' weights; on TableTop-4 it routes near chance
(docs/TABLETOP4_FINDINGS.md). This one also needs a few first frames of each expert's training demos, which
whoever fine-tuned the experts has. For task e, e's deployed (masked) model reads n first frames of e's demos;
the router layer's hidden states, averaged over the action-query tokens and over the vision tokens, are e's
exemplars. At test time candidate e scores the episode's first observation by the distance of its own states to
the nearest of e's exemplars, in units of e's typical exemplar spacing (router.exemplar_scores).

    python -m model_merging.exemplar_router --merged DIR [--data_root ROOT] [--suites goal=libero_goal ...]

Each task's demos default to the dataset its expert was trained on (recorded in the expert's checkpoint). The
frames are shown to the model as the evaluation will show them (`--frames`: LIBERO's JPEG round trip, Lanczos
resize and centre crop by default; `crop` for TableTop-4's centre crop alone). The exemplars go into the
artifact directory (router_exemplars.safetensors + router_exemplars.json, which records the artifact's weights
sha256: exemplars of other weights are refused); then `--router_variant exemplar` routes with them wherever a
merged model is evaluated.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

from experiments.robot.policy import resolve_device
from model_merging.errors import MergeError
from model_merging.exemplars import EXEMPLAR_MANIFEST, SIDES, Exemplars, FrameView, write_exemplars
from model_merging.router import nearest_neighbour_scale
from prismatic.checkpoint import MANIFEST_FILE
from prismatic.io import read_json_object

if TYPE_CHECKING:
    from model_merging.merged_model import MergedModel

@dataclass(frozen=True)
class DataSource:
    data_root: Path
    suite: str
    dataset_format: str = "hdf5"


# ---------------------------------------------------------------------------------------------- computing


def first_frames(source: DataSource, count: int) -> tuple[list[str], np.ndarray, str]:
    """Instructions and (n, 2, H, W, 3) first frames of `count` of the suite's episodes, spread evenly over them
    (every task of a suite is then represented), and the dataset's fingerprint."""
    from prismatic.vla.datasets import load_suite

    ds = load_suite(source.data_root, source.suite, source.dataset_format, preload_images_gb=0.0)
    picked = np.unique(np.linspace(0, len(ds.episodes) - 1, min(count, len(ds.episodes))).round().astype(np.int64))
    return [ds.instructions[i] for i in picked], ds.images(ds.starts[picked]), ds.fingerprint


@torch.no_grad()
def task_exemplars(merged: MergedModel, task: int, instructions: list[str], images: np.ndarray,
                   view: FrameView, batch_size: int = 32) -> dict[str, torch.Tensor]:
    """Task `task`'s model's token-mean router states (side → (n, D)) of frames shown as `view` shows them."""
    show = view.transform()
    processor = merged.multi_expert().processor
    out: dict[str, list] = {s: [] for s in SIDES}
    for i in range(0, len(instructions), batch_size):
        ims = np.stack([[show(c) for c in frame] for frame in images[i: i + batch_size]])
        n = len(ims)
        # the router reads LLM hidden states, which proprio never reaches: zeros stand in for it
        batch = processor(instructions[i: i + batch_size], ims, np.zeros((n, merged.config.proprio_dim), np.float32))
        h_act, h_vis = merged.task_states(batch, torch.full((n,), task, dtype=torch.long))
        out["act"].append(h_act.float().mean(dim=1).cpu())
        out["vis"].append(h_vis.float().mean(dim=1).cpu())
    return {s: torch.cat(v) for s, v in out.items()}


def calibrate(merged: MergedModel, sources: dict[str, DataSource], per_task: int, view: FrameView,
              batch_size: int = 32) -> tuple[Exemplars, dict]:
    """Exemplars of every task of `merged` from `per_task` first frames of its source; also their provenance."""
    if per_task < 2:
        raise MergeError(f"per_task is {per_task}: the exemplar router needs at least 2 frames per task")
    missing = [t for t in merged.task_names if t not in sources]
    if missing:
        raise MergeError(f"no demos given for tasks {missing} of {merged.directory}")
    states, scales, provenance = {}, {}, {}
    for e, t in enumerate(merged.task_names):
        instructions, images, fp = first_frames(sources[t], per_task)
        if len(instructions) < 2:
            raise MergeError(f"{sources[t].data_root}/{sources[t].suite} holds {len(instructions)} episode(s); "
                             "the exemplar router needs at least 2 per task")
        states[t] = task_exemplars(merged, e, instructions, images, view, batch_size)
        scales[t] = {s: nearest_neighbour_scale(states[t][s]) for s in SIDES}
        if not all(v > 0 for v in scales[t].values()):
            raise MergeError(f"the first frames of {sources[t].suite} give identical states: no exemplar spacing")
        provenance[t] = {"data_root": str(sources[t].data_root), "suite": sources[t].suite,
                         "dataset_format": sources[t].dataset_format, "fingerprint": fp, "frames": len(instructions)}
    return Exemplars(states, scales), provenance


def recorded_sources(merged: MergedModel, data_root: Path | None = None, suites: dict[str, str] | None = None,
                     dataset_format: str | None = None) -> dict[str, DataSource]:
    """Each task's demos: the given root / suite, else the dataset recorded in its expert's checkpoint."""
    suites = suites or {}
    unknown = sorted(set(suites) - set(merged.task_names))
    if unknown:
        raise MergeError(f"--suites names tasks {unknown}; {merged.directory} has {merged.task_names}")
    out = {}
    for expert in merged.manifest["experts"]:
        t, recorded = expert["name"], _recorded_dataset(Path(expert["path"]))
        fmt = dataset_format or (recorded or {}).get("format", "hdf5")
        if data_root is not None:
            out[t] = DataSource(Path(data_root), suites.get(t) or (recorded or {}).get("suite") or t, fmt)
        elif recorded and recorded.get("format") == "hdf5" and recorded.get("path"):
            suite_dir = Path(recorded["path"])
            out[t] = DataSource(suite_dir.parent, suites.get(t) or suite_dir.name, fmt)
        else:
            raise MergeError(f"task {t!r}: its expert's checkpoint ({expert['path']}) records no HDF5 dataset to take "
                             "demos from: give --data_root (and --suites if the suite is not named like the task)")
    return out


def _recorded_dataset(checkpoint: Path) -> dict | None:
    """The dataset an expert's manifest records; None when the checkpoint is gone (--data_root can stand in)."""
    mf = checkpoint / MANIFEST_FILE
    if not mf.is_file():
        return None
    dataset = read_json_object(mf, MergeError).get("dataset")
    if dataset is not None and not isinstance(dataset, dict):
        raise MergeError(f"{mf}: field 'dataset' must be an object, found {type(dataset).__name__}")
    return dataset


# --------------------------------------------------------------------------------------------------- CLI


@dataclass
class ExemplarConfig:
    merged: Optional[Path] = None  # merged artifact directory (from mergy.py)
    # Demos of every task: with data_root, <data_root>/<suite>; without, each expert's recorded training data
    data_root: Optional[Path] = None
    # Suite of a task where it is not what its expert recorded (or the task's name), as TASK=SUITE
    suites: list[str] = field(default_factory=list)
    dataset_format: Optional[str] = None  # hdf5 | rlds (default: what each expert recorded, else hdf5)
    per_task: int = 50  # first frames per task, spread over its episodes
    # How evaluation shows the frames: libero (run_libero_eval's JPEG round trip, Lanczos resize to resize_size,
    # centre crop) or crop (the centre crop alone, as TableTop-4's harness shows them)
    frames: str = "libero"
    resize_size: int = 224  # libero: as run_libero_eval's --resize_size
    jpeg_resize: bool = True  # libero: as run_libero_eval's --jpeg_resize
    # Centre-crop area the frames are shown with: what evaluation shows (default: the experts' training crop; 0.9,
    # the default augmentation's, for experts that record none)
    crop_area: Optional[float] = None
    overwrite: bool = False  # replace exemplars the artifact already has
    device: str = "auto"  # where the experts' forwards run: "cuda" when available, else "cpu"
    batch_size: int = 32  # frames per forward


def default_crop_area(manifest: dict) -> float:
    """The experts' common random-crop area (1: they trained on full frames), as evaluation uses it; for experts
    that record none, the default augmentation's area, as LIBERO evaluation assumes for them."""
    from prismatic.vla.augmentation import ImageAugConfig, common_crop_area

    area = common_crop_area(dict(manifest.get("trained_crop_area") or {}))
    return ImageAugConfig().crop_area if area is None else area


def parse_suites(specs: list[str]) -> dict[str, str]:
    out = {}
    for spec in specs:
        task, eq, suite = spec.partition("=")
        if not eq or not task or not suite:
            raise MergeError(f"--suites entry {spec!r}: expected TASK=SUITE")
        if task in out:
            raise MergeError(f"--suites names task {task!r} twice")
        out[task] = suite
    return out


def run(cfg: ExemplarConfig) -> Path:
    from model_merging.merged_model import load_merged

    if cfg.merged is None:
        raise MergeError("--merged is required: the merged artifact directory")
    if cfg.dataset_format not in (None, "hdf5", "rlds"):
        raise MergeError(f"--dataset_format is {cfg.dataset_format!r}, expected hdf5 or rlds")
    if cfg.per_task < 2:  # the cheap checks before loading anything
        raise MergeError(f"--per_task is {cfg.per_task}: the exemplar router needs at least 2 frames per task")
    if cfg.batch_size < 1:
        raise MergeError(f"--batch_size is {cfg.batch_size}, expected at least 1")
    # checked before loading anything (its ValueError names the flag); the default crop needs the manifest
    view = FrameView(cfg.frames, 1.0 if cfg.crop_area is None else cfg.crop_area, cfg.resize_size, cfg.jpeg_resize)
    device = resolve_device(cfg.device)
    suites = parse_suites(cfg.suites)
    if (Path(cfg.merged) / EXEMPLAR_MANIFEST).exists() and not cfg.overwrite:
        raise FileExistsError(f"{Path(cfg.merged) / EXEMPLAR_MANIFEST} exists: pass --overwrite true to recompute")
    merged = load_merged(cfg.merged, exemplars=False)
    if cfg.crop_area is None:
        view = dataclasses.replace(view, crop_area=default_crop_area(merged.manifest))
    sources = recorded_sources(merged, cfg.data_root, suites, cfg.dataset_format)
    merged.multi_expert().to(device)
    exemplars, provenance = calibrate(merged, sources, cfg.per_task, view, cfg.batch_size)
    path = write_exemplars(merged, exemplars, provenance, view, cfg.overwrite)
    counts = ", ".join(f"{t}: {p['frames']}" for t, p in provenance.items())
    print(f"exemplars of {len(merged.task_names)} tasks ({counts} frames) written to {path}")
    fewer = [t for t, p in provenance.items() if p["frames"] < cfg.per_task]
    if fewer:  # one first frame per episode: a dataset with fewer episodes gives fewer
        print(f"note: {', '.join(fewer)}: fewer first frames than --per_task {cfg.per_task}, as many as the data "
              "holds episodes")
    return path


def main(argv: list[str] | None = None) -> int:
    from model_merging.mergy import normalize_argv
    from prismatic.cli import run_cli
    from prismatic.vla.datasets.episodes import DatasetError

    args = normalize_argv(list(sys.argv[1:] if argv is None else argv), ("--suites",))
    return run_cli("exemplar_router", ExemplarConfig, run, (MergeError, DatasetError, ValueError), args)


if __name__ == "__main__":
    sys.exit(main())
