"""The exemplar router's exemplars on disk, beside a merged artifact (computed by exemplar_router.py).

    router_exemplars.safetensors   "<task>.act", "<task>.vis": (n, D) token-mean router states of n first frames
    router_exemplars.json          format, the artifact's weights sha256 and tasks they belong to, the router
                                   layer, how the frames were shown (`view`), per-task scales and data sources,
                                   and the sha256 of the tensors file
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from model_merging.errors import MergeError
from prismatic.io import atomic_path, read_json_object, sha256_file, write_json

if TYPE_CHECKING:
    from model_merging.merged_model import MergedModel

EXEMPLAR_WEIGHTS = "router_exemplars.safetensors"
EXEMPLAR_MANIFEST = "router_exemplars.json"
EXEMPLAR_FORMAT = "mergevla-router-exemplars"
SIDES = ("act", "vis")
FRAME_VIEWS = ("libero", "crop")


@dataclass(frozen=True)
class FrameView:
    """How the evaluation the exemplars serve shows a camera frame to the model. Calibration shows the dataset's
    first frames (upright in both formats) the same way, so that the router compares like with like."""

    kind: str = "libero"  # libero: run_libero_eval's JPEG round trip, Lanczos resize, centre crop; crop: the crop only
    crop_area: float = 1.0  # centre crop, as a fraction of the area (1: none)
    resize_size: int = 224  # libero: the size frames are resized to before the crop
    jpeg: bool = True  # libero: the JPEG round trip before the resize

    def __post_init__(self):
        if self.kind not in FRAME_VIEWS:
            raise ValueError(f"frame view (--frames) is {self.kind!r}, expected one of {list(FRAME_VIEWS)}")
        if not 0.0 < self.crop_area <= 1.0:
            raise ValueError(f"crop area (--crop_area) is {self.crop_area}, expected a fraction of the image area in (0, 1]")
        if self.resize_size < 1:
            raise ValueError(f"resize size (--resize_size) is {self.resize_size}, expected a positive number of pixels")

    def record(self) -> dict:
        if self.kind == "crop":
            return {"kind": "crop", "crop_area": self.crop_area}
        return {"kind": self.kind, "crop_area": self.crop_area, "resize_size": self.resize_size, "jpeg": self.jpeg}

    @classmethod
    def from_record(cls, record: dict) -> FrameView:
        return cls(**record)

    def transform(self):
        """The `ImageTransform` that shows an upright (H, W, 3) uint8 dataset frame this way."""
        from experiments.robot.libero.preprocess import LiberoImageTransform
        from experiments.robot.policy import CenterCrop

        if self.kind == "crop":
            return CenterCrop(self.crop_area)
        return LiberoImageTransform(self.resize_size, self.jpeg, self.crop_area < 1.0, self.crop_area,
                                    upside_down=False)

    def describe(self) -> str:
        crop = f"a centre crop of {self.crop_area:g} of the area" if self.crop_area < 1.0 else "no centre crop"
        if self.kind == "crop":
            return crop
        return ("LIBERO's " + ("JPEG round trip, " if self.jpeg else "") + f"Lanczos resize to {self.resize_size} "
                f"and {crop}")

    def flags(self) -> str:
        """The exemplar_router flags that calibrate with this view."""
        if self.kind == "crop":
            return f"--frames crop --crop_area {self.crop_area:g}"
        return (f"--frames libero --resize_size {self.resize_size} --jpeg_resize {str(self.jpeg).lower()} "
                f"--crop_area {self.crop_area:g}")


@dataclass
class Exemplars:
    """Per task: (n, D) token-mean states of its exemplar frames per side, and their nearest-neighbour scales."""

    states: dict[str, dict[str, torch.Tensor]]  # task → side → (n, D)
    scales: dict[str, dict[str, float]]  # task → side → mean nearest-neighbour distance


def write_exemplars(merged: MergedModel, exemplars: Exemplars, provenance: dict, view: FrameView,
                    overwrite: bool = False) -> Path:
    """Write the exemplars into the artifact directory (refusing to replace existing ones unless `overwrite`)."""
    from safetensors.torch import save_file

    d = merged.directory
    if (d / EXEMPLAR_MANIFEST).exists() and not overwrite:
        raise FileExistsError(f"{d / EXEMPLAR_MANIFEST} exists: pass --overwrite true to recompute the exemplars")
    (d / EXEMPLAR_MANIFEST).unlink(missing_ok=True)  # never a manifest beside exemplars it does not describe
    tensors = {f"{t}.{s}": exemplars.states[t][s].contiguous() for t in merged.task_names for s in SIDES}
    with atomic_path(d / EXEMPLAR_WEIGHTS) as tmp:
        save_file(tensors, str(tmp))
        sha = sha256_file(tmp)  # of what this call wrote, even if another writer replaces the file next
    write_json(d / EXEMPLAR_MANIFEST, {
        "format": EXEMPLAR_FORMAT, "artifact_weights_sha256": merged.manifest["weights_sha256"],
        "layer": merged.manifest["router"]["layer"], "view": view.record(), "tasks": merged.task_names,
        "scales": exemplars.scales, "sources": provenance, "weights_sha256": sha})
    return d / EXEMPLAR_MANIFEST


def read_exemplars(directory: Path, manifest: dict) -> Exemplars | None:
    """The artifact's exemplars, None when it has none; MergeError when they do not belong to these weights."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    mf = directory / EXEMPLAR_MANIFEST
    if not mf.is_file():
        return None
    meta = read_json_object(mf, MergeError)
    if meta.get("format") != EXEMPLAR_FORMAT:
        raise MergeError(f"{mf}: format is {meta.get('format')!r}, expected {EXEMPLAR_FORMAT!r}")
    if meta.get("artifact_weights_sha256") != manifest["weights_sha256"] or meta.get("tasks") != manifest["task_names"]:
        raise MergeError(f"{mf} was computed for other merged weights or tasks: recompute it "
                         "(python -m model_merging.exemplar_router --merged DIR --overwrite true)")
    wf = directory / EXEMPLAR_WEIGHTS
    if not wf.is_file() or sha256_file(wf) != meta.get("weights_sha256"):
        raise MergeError(f"{wf} is missing or does not match the sha256 in {mf}")
    if meta.get("layer") != manifest["router"]["layer"]:
        raise MergeError(f"{mf}: layer is {meta.get('layer')!r}, the artifact's router reads layer "
                         f"{manifest['router']['layer']}: recompute the exemplars")
    try:
        tensors = load_file(str(wf))
        states = {t: {s: tensors[f"{t}.{s}"] for s in SIDES} for t in meta["tasks"]}
        scales = {t: {s: float(meta["scales"][t][s]) for s in SIDES} for t in meta["tasks"]}
    except (KeyError, TypeError, ValueError, SafetensorError) as e:
        raise MergeError(f"{wf} / {mf}: an exemplar tensor or scale is missing or malformed ({e})") from e
    hidden = manifest["router"]["hidden"]
    for t in meta["tasks"]:
        for s in SIDES:
            x, scale = states[t][s], scales[t][s]
            if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] != hidden or not torch.isfinite(x).all():
                raise MergeError(f"{wf}: tensor {t}.{s} is {list(x.shape)}, expected finite (n >= 2, {hidden})")
            if not (scale > 0 and math.isfinite(scale)):
                raise MergeError(f"{mf}: scales.{t}.{s} is {scale}, expected a finite number > 0")
    return Exemplars(states, scales)


def exemplar_record(directory: Path | str) -> dict | None:
    """The artifact's exemplar manifest as recorded, None when it is missing or unreadable (the callers' checks
    of a record; `read_exemplars` is the strict loader)."""
    try:
        meta = json.loads((Path(directory) / EXEMPLAR_MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def view_mismatch(directory: Path | str, view: FrameView) -> str | None:
    """A warning when the artifact's exemplars were computed from frames shown otherwise than `view` (the way
    evaluation shows them): the router then compares differently processed images. None otherwise."""
    record = exemplar_record(directory)
    if record is None:
        return None
    try:
        recorded = FrameView.from_record(record["view"])
    except (KeyError, TypeError, ValueError):
        recorded = None
    if recorded is not None and recorded.record() == view.record():  # the fields that view's kind uses
        return None
    was = recorded.describe() if recorded else "a view the file does not record"
    return (f"warning: the exemplars in {Path(directory) / EXEMPLAR_MANIFEST} were computed from frames shown with "
            f"{was}, this evaluation shows them with {view.describe()}: recompute them with {view.flags()} "
            "--overwrite true")


def exemplars_sha256(directory: Path | str) -> str:
    """The sha256 of the artifact's exemplar tensors (their identity), or a MergeError saying how to make them."""
    sha = (exemplar_record(directory) or {}).get("weights_sha256")
    if sha is None:
        raise MergeError(f"router variant 'exemplar' needs exemplars in {directory} ({Path(directory) / EXEMPLAR_MANIFEST} "
                         f"is missing or unreadable): compute them with python -m model_merging.exemplar_router "
                         f"--merged {directory}")
    return sha
