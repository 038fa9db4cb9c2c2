"""Test-time router (docs/DESIGN.md §6): pick the expert whose subspaces best capture the first observation.

For task e, R_e^A and R_e^V are the top-k right singular vectors of that expert's own value (or key, or
stacked key+value) projections of one action-expert block, for the action-query side and the vision
side; `value_update` uses the learned update of the value projections, W_e − W_0, instead of W_e. With the e-masked model's hidden states h at the scored layer,
    s_e = ½ [mean over action-query tokens ‖R_e^A h_A‖ + mean over vision tokens ‖R_e^V h_V‖],
and the episode goes to argmax_e s_e. Which block and layer were used is recorded in the artifact's
manifest (`router.block`, `router.layer`); by default the last shared block and the final LLM layer.

`exemplar` (beyond the paper, see exemplar_router.py) scores the same states against states of the experts'
own training episodes instead of against subspaces of their weights.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from model_merging.artifact import ROUTER_VARIANTS

Tensor = torch.Tensor
EXEMPLAR = "exemplar"
# every variant a merged model can route with: the subspace ones stored in the artifact, and the exemplar one,
# available once exemplars are calibrated for it
ALL_VARIANTS = (*ROUTER_VARIANTS, EXEMPLAR)


def subspace_scores(h_act: Tensor, h_vis: Tensor, r_act: Tensor, r_vis: Tensor) -> Tensor:
    """h_*: (N, T, D) hidden states; r_*: (N, k, D) or (k, D) subspaces → (N,) scores."""
    def side(h, r):
        proj = torch.einsum("ntd,nkd->ntk", h.float(), r.float() if r.ndim == 3 else r.float().expand(h.shape[0], -1, -1))
        return proj.norm(dim=-1).mean(dim=1)

    return 0.5 * (side(h_act, r_act) + side(h_vis, r_vis))


def exemplar_scores(h_act: Tensor, h_vis: Tensor, ex_act: Tensor, ex_vis: Tensor, scale_act: float,
                    scale_vis: float) -> Tensor:
    """h_*: (N, T, D) hidden states; ex_*: (n, D) one task's exemplars (token means) → (N,) scores.

    s = −½ [d_A / scale_A + d_V / scale_V], d = distance from the token mean to the nearest exemplar; the scales
    (each task's typical spacing of its own exemplars) make tasks whose states spread differently comparable.
    """
    def side(h, ex, scale):
        return torch.cdist(h.float().mean(dim=1), ex.float()).min(dim=1).values / scale

    return -0.5 * (side(h_act, ex_act, scale_act) + side(h_vis, ex_vis, scale_vis))


def nearest_neighbour_scale(x: Tensor) -> float:
    """Mean distance from each row of x (n ≥ 2, D) to its nearest other row."""
    d = torch.cdist(x.float(), x.float())
    d.fill_diagonal_(float("inf"))
    return float(d.min(dim=1).values.mean())


@dataclass
class RouteResult:
    expert: Tensor  # (B,) chosen task index per sample
    scores: Tensor  # (B, M) router score of every candidate
    task_names: list[str]

    def names(self) -> list[str]:
        return [self.task_names[i] for i in self.expert.tolist()]

    def info(self, i: int) -> dict:
        """Per-episode record for logs: routed task, its index, and every candidate's score."""
        return {"routed_task": self.task_names[int(self.expert[i])], "routed_index": int(self.expert[i]),
                "router_scores": {n: float(s) for n, s in zip(self.task_names, self.scores[i].tolist())}}


def check_variant(variant: str, available: Sequence[str] = ALL_VARIANTS, where: str = "") -> str:
    """`variant` if it is one of `available` (a merged model's `router_variants`; all known ones by default)."""
    if variant not in available:
        at = f" in {where}" if where else ""
        raise ValueError(f"router variant {variant!r}{at}: expected one of {list(available)}")
    return variant


def routing_accuracy(true_tasks: Sequence[str], routed_tasks: Sequence[str]) -> dict[str, float]:
    """Share of episodes routed to their own suite's expert, per suite and over all ("all")."""
    if len(true_tasks) != len(routed_tasks):
        raise ValueError(f"{len(true_tasks)} true tasks but {len(routed_tasks)} routed ones")
    hits, count = defaultdict(int), defaultdict(int)
    for t, r in zip(true_tasks, routed_tasks):
        count[t] += 1
        hits[t] += int(t == r)
    out = {t: hits[t] / count[t] for t in sorted(count)}
    if count:
        out["all"] = sum(hits.values()) / sum(count.values())
    return out
