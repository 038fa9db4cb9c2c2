"""One safetensors file of tensors + one JSON manifest per checkpoint directory.

The manifest records the weights file's sha256, so a truncated or swapped file is caught at load time, and
it is written last, so a directory without a manifest is an unfinished write, never a valid checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from prismatic.io import atomic_path, read_json_object, sha256_file, write_json

WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1
CHECKPOINT_KIND = "mergevla-checkpoint"  # one fine-tuned expert (a merged artifact is "mergevla-merged")
# what the directories of each manifest format are, for messages when one is given where another belongs
KIND_NAMES = {"mergevla-checkpoint": "a fine-tuned checkpoint (finetune.py)",
              "mergevla-merged": "a merged artifact (mergy.py --out)"}


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupt or of an unexpected kind."""


def save_checkpoint(
    directory: Path | str, tensors: dict[str, torch.Tensor], manifest: dict, kind: str, overwrite: bool = False
) -> Path:
    d = Path(directory)
    present = [f for f in (MANIFEST_FILE, WEIGHTS_FILE) if (d / f).exists()]
    if present and not overwrite:
        raise FileExistsError(f"{d} already holds {' and '.join(present)}; refusing to overwrite it")
    # the manifest (with the weights' hash) is what marks a checkpoint finished: gone until the new one is written
    (d / MANIFEST_FILE).unlink(missing_ok=True)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_path(d / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": kind})
        digest = sha256_file(tmp)
    write_json(d / MANIFEST_FILE, {**manifest, "format": kind, "format_version": FORMAT_VERSION,
                                   "weights_sha256": digest})
    return d


def read_manifest_json(directory: Path | str, missing: str) -> dict:
    """The manifest of a checkpoint-like directory as a dict; `missing` ends the error when it is absent."""
    d = Path(directory)
    mf = d / MANIFEST_FILE
    if not d.is_dir():
        raise CheckpointError(f"checkpoint directory {d} " + ("is a file, not a directory" if d.exists()
                                                               else "does not exist"))
    if not mf.is_file():
        raise CheckpointError(f"{mf} is missing: {d} {missing}{_run_dir_hint(d)}")
    return read_json_object(mf, CheckpointError)


def _run_dir_hint(d: Path) -> str:
    """What to give instead when `d` is a training run or its `checkpoints/` folder (holding `step_N/`)."""
    root = d / "checkpoints" if (d / "checkpoints").is_dir() else d if d.name == "checkpoints" else None
    if root is None:
        return ""
    finished = sorted(c for c in root.glob("step_*") if (c / MANIFEST_FILE).is_file())
    what = "a training run directory" if root != d else "a training run's checkpoints folder"
    if not finished:
        return f"; it is {what} with no finished checkpoint yet"
    return f"; it is {what}: give one of its checkpoints, e.g. the newest, {finished[-1]}"


def training_steps(manifest: dict) -> tuple[int | None, int | None]:
    """(the step a fine-tuned checkpoint was saved at, the steps its run was set to train); None where not recorded."""
    step, planned = manifest.get("step"), (manifest.get("train_config") or {}).get("max_steps")
    return tuple(v if isinstance(v, int) and not isinstance(v, bool) else None for v in (step, planned))


def unfinished_warning(manifest: dict) -> str | None:
    """A warning when a fine-tuned checkpoint, or an expert of a merged one (its `experts` list), was saved before
    its run reached max_steps: an intermediate checkpoint, or a run that stopped early."""
    if isinstance(manifest.get("experts"), list):
        saved = [(f"expert {e.get('name')!r}", e.get("step"), e.get("max_steps")) for e in manifest["experts"]
                 if isinstance(e, dict)]
    else:
        saved = [("the checkpoint", *training_steps(manifest))]
    early = [f"{what} at step {step} of {planned}" for what, step, planned in saved
             if isinstance(step, int) and isinstance(planned, int) and step < planned]
    if not early:
        return None
    return (f"warning: saved before training finished ({', '.join(early)}): an intermediate checkpoint or a run that "
            "stopped early; its figures are not the finished expert's")


def read_manifest(directory: Path | str, kind: str) -> dict:
    manifest = read_manifest_json(directory, f"is not a finished checkpoint (format {kind})")
    mf = Path(directory) / MANIFEST_FILE
    if manifest.get("format") != kind:
        found = KIND_NAMES.get(manifest.get("format"))
        raise CheckpointError(f"{mf}: field 'format' is {manifest.get('format')!r}, expected {kind!r}"
                              + (f" ({found} was given where {KIND_NAMES[kind]} is needed)"
                                 if found and kind in KIND_NAMES else ""))
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{mf}: field 'format_version' is {manifest.get('format_version')!r}, expected {FORMAT_VERSION}"
        )
    return manifest


def checked_weights_file(directory: Path | str, manifest: dict, verify: bool = True) -> Path:
    """The checkpoint's weights file, present and (with `verify`) matching the manifest's sha256."""
    d = Path(directory)
    wf = d / WEIGHTS_FILE
    if not wf.is_file():
        raise CheckpointError(f"{wf} is missing")
    if verify and sha256_file(wf) != manifest.get("weights_sha256"):
        raise CheckpointError(
            f"{wf} does not match the sha256 in {d / MANIFEST_FILE}: the file is truncated or corrupt"
        )
    return wf


def load_checkpoint(directory: Path | str, kind: str, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    manifest = read_manifest(directory, kind)
    wf = checked_weights_file(directory, manifest, verify)
    try:
        tensors = load_file(str(wf))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{wf} cannot be read as safetensors ({e})") from e
    return tensors, manifest
