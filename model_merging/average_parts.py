"""Which merged part loses an expert: one expert with some of its from-scratch parts averaged over all experts.

    python -m model_merging.average_parts --experts spatial=DIR object=DIR goal=DIR long=DIR --target goal \
        --parts proprio_proj --out runs/goal-avg-proprio

writes an ordinary fine-tuned checkpoint (evaluate it like any expert): the target expert, except that each
named part group is replaced by the experts' weighted average, as a merge would share it. Everything else,
LoRA included, stays the target's own. Groups (with L_h = --expert_head_layers blocks kept per task):
    action_queries   the learnable action queries
    proprio_proj     the proprio projector
    expert_input     the action expert's input layers (before the blocks)
    shared_blocks    action-expert blocks 0 .. L − L_h − 1 (with L_h = 0: every block, the final norm and head)
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from model_merging.algorithms import convex_weights, weighted_sum
from model_merging.errors import MergeError
from model_merging.experts import ExpertSet, parse_expert_specs
from model_merging.layout import PART_GROUPS, check_part_groups, part_group
from model_merging.mergy import normalize_argv
from prismatic.checkpoint import (
    CHECKPOINT_KIND,
    MANIFEST_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from prismatic.cli import run_cli
from prismatic.io import check_output_dir, foreign_entries, written_as


def average_parts(experts: ExpertSet, target: str, parts: Sequence[str], expert_head_layers: int = 1,
                  weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """The target expert's trainable tensors with the `parts` groups averaged over `experts`."""
    check_part_groups(parts, "--parts")
    if target not in experts.names:
        raise MergeError(f"--target {target!r} is not one of the experts {experts.names}")
    if not 0 <= expert_head_layers <= experts.layout.num_blocks:
        raise MergeError(f"--expert_head_layers must be in 0..{experts.layout.num_blocks}, got {expert_head_layers}")
    w = convex_weights(weights, len(experts), "--weights")
    shared = set(experts.layout.shared_names(expert_head_layers))
    index = experts.names.index(target)
    tensors, _ = load_checkpoint(experts.experts[index].directory, CHECKPOINT_KIND, verify=False)
    for name in tensors:
        if name in shared and part_group(name) in parts:
            tensors[name] = weighted_sum(experts.tensors(name), w).to(tensors[name].dtype)
    return tensors


@dataclass
class AveragePartsConfig:
    experts: list[str] = field(default_factory=list)  # NAME=DIR fine-tuned checkpoints, all of one base and init
    target: str = ""  # the expert whose checkpoint is written back with averaged parts
    parts: list[str] = field(default_factory=lambda: list(PART_GROUPS))  # groups to average (see the module doc)
    expert_head_layers: int = 1  # L_h: last blocks (+ final norm and head) that stay the target's own
    weights: Optional[list[float]] = None  # averaging weights, one per expert, normalised to sum to 1 (default 1/M each)
    out: Optional[Path] = None  # checkpoint directory to create
    overwrite: bool = False  # replace a checkpoint already at --out


def run(cfg: AveragePartsConfig) -> Path:
    if cfg.out is None:
        raise MergeError("--out is required: the checkpoint directory to create")
    check_output_dir(cfg.out, "--out")
    # a checkpoint directory holds nothing else (but a killed write's temps); this one is someone's own
    if others := foreign_entries(cfg.out, written_as((MANIFEST_FILE, WEIGHTS_FILE))):
        raise MergeError(f"--out {cfg.out} holds files other than a checkpoint's ({others}); choose a new directory "
                         "for the checkpoint")
    experts = ExpertSet.open(parse_expert_specs(cfg.experts))
    tensors = average_parts(experts, cfg.target, cfg.parts, cfg.expert_head_layers, cfg.weights)
    manifest = dict(experts.experts[experts.names.index(cfg.target)].manifest)  # save_checkpoint sets the format
    manifest["averaged_parts"] = {"parts": list(cfg.parts), "experts": experts.names,
                                  "expert_head_layers": cfg.expert_head_layers,
                                  "weights": convex_weights(cfg.weights, len(experts), "--weights")}
    return save_checkpoint(cfg.out, tensors, manifest, CHECKPOINT_KIND, overwrite=cfg.overwrite)


def main(argv: list[str] | None = None) -> int:
    args = normalize_argv(list(sys.argv[1:] if argv is None else argv), ("--experts", "--parts", "--weights"))
    return run_cli("average_parts", AveragePartsConfig, lambda cfg: print(f"wrote {run(cfg)}"),
                   (MergeError, CheckpointError), args)


if __name__ == "__main__":
    sys.exit(main())
