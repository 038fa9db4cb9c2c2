"""TALL task masks, their bit-packed storage and the selfish ratio (docs/DESIGN.md §4).

S_m = 1[|τ_m| > λ·|τ_merge − τ_m|]: entry j belongs to task m when the merged vector keeps enough of that
task's own update. Task m then runs θ0 + S_m ⊙ τ_merge. Masks are stored 8 entries per byte (most
significant bit first, numpy.packbits' order), so a 500M-entry mask costs 60 MB instead of 500 MB.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from model_merging.chunks import spans

Tensor = torch.Tensor
_BITS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
_SHIFTS = torch.arange(7, -1, -1, dtype=torch.uint8)


def check_lambda(lam: float) -> None:
    if not 0 <= lam < math.inf:  # NaN would set no mask at all
        raise ValueError(f"mask lambda must be a finite number >= 0, got {lam}")


def tall_masks(taus: Sequence[Tensor], merged: Tensor, lam: float) -> list[Tensor]:
    check_lambda(lam)
    return [t.abs() > lam * (merged - t).abs() for t in taus]


def pack_mask(mask: Tensor) -> Tensor:
    """Bool tensor (any shape) → uint8 of ceil(n / 8) bytes; the shape is kept by the caller."""
    flat = mask.reshape(-1).to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % 8)])
    return (flat.view(-1, 8) * _BITS.to(flat.device)).sum(1, dtype=torch.uint8)


def unpack_mask(packed: Tensor, shape: Sequence[int]) -> Tensor:
    n = 1
    for d in shape:
        n *= int(d)
    if packed.dtype != torch.uint8 or packed.numel() != -(-n // 8):
        raise ValueError(f"a packed mask of shape {tuple(shape)} needs {-(-n // 8)} uint8 bytes, got "
                         f"{packed.numel()} {packed.dtype}")
    bits = (packed.reshape(-1, 1) >> _SHIFTS.to(packed.device)) & 1
    return bits.reshape(-1)[:n].bool().reshape(tuple(shape))


def apply_mask(w0: Tensor, tau: Tensor, mask: Tensor | None, rescale: float | Tensor = 1.0) -> Tensor:
    """θ0 + rescale·(S ⊙ τ) in fp32, the one formula every loader uses (so their weights agree bitwise)."""
    d = tau if mask is None else tau * mask
    if not (isinstance(rescale, float) and rescale == 1.0):
        d = d * rescale
    return (w0.float() + d).to(w0.dtype)


@dataclass
class MaskStats:
    """Entry counts over all masked tensors: set for no task, exactly one task ("selfish"), or several."""

    total: int = 0
    none: int = 0
    selfish: int = 0
    shared: int = 0
    per_task: list[int] = field(default_factory=list)  # entries set, per task

    def add(self, masks: Sequence[Tensor]) -> None:
        count = masks[0].reshape(-1).to(torch.uint8)
        for m in masks[1:]:
            count = count + m.reshape(-1)
        self.total += count.numel()
        none, one = int((count == 0).sum()), int((count == 1).sum())
        self.none += none
        self.selfish += one
        self.shared += count.numel() - none - one
        if not self.per_task:
            self.per_task = [0] * len(masks)
        for i, m in enumerate(masks):
            self.per_task[i] += int(m.sum())

    @property
    def selfish_ratio(self) -> float:
        """Share of all entries whose mask is set for exactly one task (docs/DESIGN.md §4's definition)."""
        return self.selfish / self.total if self.total else 0.0

    @property
    def selfish_ratio_active(self) -> float:
        """Share among the entries used by at least one task."""
        active = self.total - self.none
        return self.selfish / active if active else 0.0

    def as_dict(self) -> dict:
        return {"total": self.total, "none": self.none, "selfish": self.selfish, "shared": self.shared,
                "selfish_ratio": self.selfish_ratio, "selfish_ratio_active": self.selfish_ratio_active}

    def density(self) -> list[float]:
        """Share of entries each task's mask keeps."""
        return [c / self.total if self.total else 0.0 for c in self.per_task]


def packed_task_masks(
    taus: Sequence[Tensor] | None, merged: Tensor, lam: float = 0.0, masks: Sequence[Tensor] | None = None,
    stats: MaskStats | None = None,
) -> list[Tensor]:
    """Bit-packed per-task masks of one weight, built chunk by chunk (see chunks.py).

    Either TALL masks from `taus` and `merged` with λ = `lam`, or given bool `masks` (a method's own).
    `stats`, if given, accumulates their counts.
    """
    check_lambda(lam)
    n = merged.numel()
    srcs = [t.reshape(-1) for t in (taus if masks is None else masks)]
    mflat = merged.reshape(-1)
    packed = [torch.empty(-(-n // 8), dtype=torch.uint8, device=merged.device) for _ in srcs]
    for s, e in spans(n):
        if masks is None:
            mc = mflat[s:e]
            chunk = [t[s:e].abs() > (mc - t[s:e]).abs().mul_(lam) for t in srcs]
        else:
            chunk = [m[s:e] for m in srcs]
        if stats is not None:
            stats.add(chunk)
        for p, c in zip(packed, chunk):
            p[s // 8: -(-e // 8)] = pack_mask(c)
    return packed


def selfish_ratio(masks: Sequence[Tensor]) -> float:
    stats = MaskStats()
    stats.add(masks)
    return stats.selfish_ratio
