"""The expert checkpoints to merge: opened lazily, checked against each other, read one tensor at a time.

Every check happens before anything is written: manifests, file hashes (a truncated or swapped file),
base model, LoRA config, model config, initialisation seed, tensor names, shapes and dtypes against the
layout the config implies. NaN/inf are caught as each tensor is read, naming the expert and the tensor.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from model_merging.errors import MergeError
from model_merging.layout import LORA_A, LORA_B, ModelLayout, model_layout
from model_merging.tensor_files import SafetensorsReader
from prismatic.checkpoint import (
    CHECKPOINT_KIND,
    MANIFEST_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    checked_weights_file,
    read_manifest,
)
from prismatic.models.configuration import VLAConfig
from prismatic.vla.augmentation import trained_crop_area
from prismatic.vla.normalization import check_norm_stats

NAME_RE = re.compile(r"[A-Za-z0-9_-]+")


def parse_expert_specs(specs: Sequence[str]) -> list[tuple[str, Path]]:
    """`["spatial=DIR", …]` → [("spatial", Path(DIR)), …], order kept; names unique and dot-free."""
    out: list[tuple[str, Path]] = []
    for s in specs:
        name, sep, d = s.partition("=")
        if not sep or not name or not d:
            raise MergeError(f"--experts entry {s!r}: expected NAME=DIR")
        out.append((name, Path(d)))
    check_names([n for n, _ in out])
    return out


def check_names(names: Sequence[str]) -> None:
    if not names:
        raise MergeError("--experts is empty: give at least one NAME=DIR")
    seen = set()
    for n in names:
        if not NAME_RE.fullmatch(n):  # match() with $ would let a trailing newline through
            raise MergeError(f"expert name {n!r} must use only letters, digits, '_' and '-'")
        if n in seen:
            raise MergeError(f"expert name {n!r} is given twice in --experts; task names must be unique")
        seen.add(n)


@dataclass
class Expert:
    name: str
    directory: Path
    manifest: dict
    reader: SafetensorsReader

    @property
    def weights_file(self) -> Path:
        return self.directory / WEIGHTS_FILE


def _open_expert(name: str, directory: Path, verify_hash: bool) -> Expert:
    try:
        manifest = read_manifest(directory, CHECKPOINT_KIND)
        wf = checked_weights_file(directory, manifest, verify_hash)
    except CheckpointError as e:
        raise MergeError(f"expert {name!r}: {e}") from e
    reader = SafetensorsReader(wf)
    for field in ("config", "lora", "base"):
        if not isinstance(manifest.get(field), dict):
            raise MergeError(f"expert {name!r}: {directory / MANIFEST_FILE} has no {field!r} object")
    for field, key, kinds, what in (("lora", "scale", (int, float), "number"), ("lora", "r", (int,), "integer"),
                                    ("base", "sha256", (str,), "string")):
        value = manifest[field].get(key)
        if not isinstance(value, kinds) or isinstance(value, bool):
            raise MergeError(f"expert {name!r}: {directory / MANIFEST_FILE} field '{field}.{key}' is {value!r}, "
                             f"expected a {what}")
    lora = manifest["lora"]
    if not (0 < lora["scale"] < math.inf and lora["r"] >= 1) or (
            "alpha" in lora and not math.isclose(lora["scale"], lora["alpha"] / lora["r"])):
        raise MergeError(f"expert {name!r}: {directory / MANIFEST_FILE} field 'lora' is {lora}: expected r >= 1 and "
                         "a finite scale > 0 equal to alpha / r")
    seed, digest = manifest.get("init_seed"), manifest.get("weights_sha256")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise MergeError(f"expert {name!r}: {directory / MANIFEST_FILE} field 'init_seed' is {seed!r}, "
                         "expected an integer (or null)")
    if not isinstance(digest, str):
        raise MergeError(f"expert {name!r}: {directory / MANIFEST_FILE} field 'weights_sha256' is {digest!r}, "
                         "expected a string")
    try:  # what the merge records as the expert's training crop
        trained_crop_area(manifest.get("train_config"))
    except (AttributeError, TypeError, ValueError) as e:
        raise MergeError(f"expert {name!r}: {directory / MANIFEST_FILE} field 'train_config' is invalid: its "
                         f"image_aug / aug.crop_area cannot be read ({e})") from e
    return Expert(name, directory, manifest, reader)


class ExpertSet:
    """M experts of one base model, LoRA config and architecture, in task order."""

    def __init__(self, experts: list[Expert]):
        check_names([e.name for e in experts])
        self.experts = experts
        first = experts[0]
        try:
            self.config = VLAConfig.from_dict(first.manifest["config"])
        except (TypeError, ValueError) as e:
            raise MergeError(f"expert {first.name!r}: manifest field 'config' is invalid ({e})") from e
        for e in experts:  # what a merged policy (un)normalises with: wrong stats would only fail in rollouts
            if e.manifest.get("norm_stats") is not None:
                try:
                    check_norm_stats(e.manifest["norm_stats"], {"action": self.config.action_dim,
                                                                "proprio": self.config.proprio_dim})
                except ValueError as err:
                    raise MergeError(f"expert {e.name!r}: {e.directory / MANIFEST_FILE} field {err}") from err
        self._check_consistent()
        self.layout: ModelLayout = model_layout(self.config)
        self.lora_scale = float(first.manifest["lora"]["scale"])
        self._check_layout()

    @classmethod
    def open(cls, named_dirs: Sequence[tuple[str, Path | str]], verify_hashes: bool = True) -> ExpertSet:
        check_names([n for n, _ in named_dirs])
        seen: dict[Path, str] = {}
        for n, d in named_dirs:  # one expert under two names would count twice in every average and sum
            other = seen.setdefault(Path(d).resolve(), n)
            if other != n:
                raise MergeError(f"experts {other!r} and {n!r} are the same directory {d}; give each expert once")
        return cls([_open_expert(n, Path(d), verify_hashes) for n, d in named_dirs])

    # ------------------------------------------------------------------------------------------- checks

    def _check_consistent(self) -> None:
        a = self.experts[0]
        for b in self.experts[1:]:
            pair = f"experts {a.name!r} and {b.name!r}"
            sa, sb = a.manifest["base"].get("sha256"), b.manifest["base"].get("sha256")
            if sa != sb:
                raise MergeError(f"{pair} come from different base models (base.sha256 {str(sa)[:12]}… vs "
                                 f"{str(sb)[:12]}…); merging needs one shared θ0")
            if a.manifest["lora"] != b.manifest["lora"]:
                raise MergeError(f"{pair} have different LoRA configs: {a.manifest['lora']} vs {b.manifest['lora']}")
            if a.manifest["config"] != b.manifest["config"]:
                diff = sorted(k for k in set(a.manifest["config"]) | set(b.manifest["config"])
                              if a.manifest["config"].get(k) != b.manifest["config"].get(k))
                raise MergeError(f"{pair} have different model configs (fields {diff})")
            if a.manifest.get("init_seed") != b.manifest.get("init_seed"):
                raise MergeError(
                    f"{pair} start from different initialisations (init_seed {a.manifest.get('init_seed')} vs "
                    f"{b.manifest.get('init_seed')}); averaging parts trained from scratch needs a shared start"
                )
            ka, kb = set(a.reader.keys()), set(b.reader.keys())
            if ka != kb:
                raise MergeError(
                    f"{pair} hold different parameter sets: only in {a.name!r}: {sorted(ka - kb)[:3]}, "
                    f"only in {b.name!r}: {sorted(kb - ka)[:3]}"
                )
            for k in sorted(ka):
                x, y = a.reader.specs[k], b.reader.specs[k]
                if (x.shape, x.dtype) != (y.shape, y.dtype):
                    raise MergeError(f"{pair}: tensor {k!r} is {x.dtype} {list(x.shape)} vs {y.dtype} {list(y.shape)}")

    def _check_layout(self) -> None:
        e, lay = self.experts[0], self.layout
        r = int(e.manifest["lora"]["r"])
        expected = {n: s for n, s in lay.scratch.items()}
        for mod, (o, i) in lay.lora_modules.items():
            expected[mod + LORA_A] = (r, i)
            expected[mod + LORA_B] = (o, r)
        have = {k: e.reader.specs[k].shape for k in e.reader.keys()}
        if set(have) != set(expected):
            raise MergeError(
                f"expert {e.name!r}: {e.weights_file} does not hold the trainable parameters of config "
                f"{self.config.name!r} (missing {sorted(set(expected) - set(have))[:3]}, "
                f"unexpected {sorted(set(have) - set(expected))[:3]})"
            )
        for k, shape in expected.items():
            if have[k] != shape:
                raise MergeError(f"expert {e.name!r}: tensor {k!r} has shape {list(have[k])}, expected {list(shape)}")

    # ------------------------------------------------------------------------------------------- access

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.experts]

    def __len__(self) -> int:
        return len(self.experts)

    @property
    def base_ref(self) -> dict:
        return self.experts[0].manifest["base"]

    @property
    def init_seed(self):
        return self.experts[0].manifest.get("init_seed")

    def _read(self, e: Expert, name: str, device: str) -> torch.Tensor:
        t = e.reader.get(name).to(device=device, dtype=torch.float32)
        if not torch.isfinite(t).all():
            raise MergeError(f"expert {e.name!r}: tensor {name!r} in {e.weights_file} contains NaN or inf")
        return t

    def lora_factors(self, module: str, device: str = "cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per expert (scale·B, A) in fp32: the task vector of `module.weight` is their product."""
        return [(self._read(e, module + LORA_B, device) * self.lora_scale, self._read(e, module + LORA_A, device))
                for e in self.experts]

    def task_vectors(self, module: str, factors=None, device: str = "cpu") -> list[torch.Tensor]:
        """Per expert, τ = scale·B·A in fp32. The factors were checked for NaN/inf when read; an overflow in
        the product would surface in the merged tensor, which the pipeline checks."""
        return [left @ right for left, right in (factors or self.lora_factors(module, device))]

    def tensors(self, name: str, device: str = "cpu") -> list[torch.Tensor]:
        """A from-scratch parameter as each expert holds it (fp32)."""
        return [self._read(e, name, device) for e in self.experts]

    def expert_tensor(self, index: int, name: str, device: str = "cpu") -> torch.Tensor:
        return self._read(self.experts[index], name, device)
