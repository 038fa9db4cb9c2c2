"""Merge M expert checkpoints into one MergeVLA artifact.

    python model_merging/mergy.py --experts spatial=DIR object=DIR goal=DIR long=DIR \\
        --algorithm ties --masks true --lambda 0.6 --k_gate 8 --expert_head_layers 1 --out DIR

Per-algorithm hyper-parameters are nested fields, e.g. `--ties.k 100 --ties.merge_func sum` (the MergeVLA
release's TIES) or `--wudi.steps 300`; per-module overrides are rules, e.g. `--rules "llm scale=0.8"`.
Exit status 2 on bad input, with a message naming the file or field; the output directory is only
created, complete, at the very end.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from model_merging.algorithms import (
    METHODS,
    DareParams,
    EmrParams,
    KnotsParams,
    RetainParams,
    TaskArithmeticParams,
    TiesParams,
    TsvParams,
    WeightedAverageParams,
    WudiParams,
)
from model_merging.errors import MergeError
from model_merging.experts import parse_expert_specs
from model_merging.merge import MergeOptions, merge_experts
from prismatic.checkpoint import CheckpointError
from prismatic.cli import run_cli

ALGORITHMS = ", ".join(sorted(METHODS))
LIST_FIELDS = ("--experts", "--rules", "--scratch_weights", "--per_task_parts")
ALIASES = {"--lambda": "--mask_lambda"}


@dataclass
class MergyConfig:
    # Expert checkpoints as NAME=DIR (NAME: letters, digits, _ or -), in task order; e.g. spatial=runs/spatial
    experts: list[str] = field(default_factory=list)
    # Output directory for the merged artifact; must not exist yet
    out: Optional[Path] = None
    # Merge algorithm: task_arithmetic, ties, dare, weighted_average, tsv, knots, wudi, emr or retain
    algorithm: str = "ties"
    # Per-task masks: TALL masks S_m = |τ_m| > λ|τ_merge − τ_m| for every algorithm, EMR's own masks for emr
    masks: bool = True
    # TALL mask λ (also --lambda); 0 keeps every entry a task changed; useful range 0.6–0.9
    mask_lambda: float = 0.6
    # Router subspace size: top-k right singular vectors per expert and side
    k_gate: int = 8
    # L_h: last action-expert blocks (+ final norm and head) kept per task; 0 shares everything
    expert_head_layers: int = 1
    # From-scratch groups kept per task too instead of averaged (action_queries, proprio_proj, expert_input,
    # shared_blocks); none = the paper's merge. All four keep each expert's whole action pathway (with
    # expert_head_layers >= 1: the final norm and head follow expert_head_layers, not these groups)
    per_task_parts: list[str] = field(default_factory=list)
    # Block whose key/value projections define the router subspaces; -1 = last shared block (L - L_h - 1)
    router_block: int = -1
    # LLM hidden-state layer scored by the router (0..L); -1 = final layer
    router_layer: int = -1
    # Per-module overrides of the algorithm's hyper-parameters, first match wins: "PATTERN field=value ...";
    # PATTERN is a group (vision, projector, llm; action_queries, proprio, action_expert with retain only, the one
    # algorithm that merges those parts by rule) or a regex; a rule that matches nothing is an error
    rules: list[str] = field(default_factory=list)
    # Averaging weights of the shared from-scratch parts, one per expert, normalised to sum to 1 (default 1/M each)
    scratch_weights: Optional[list[float]] = None
    # Seed of every random choice (DARE's drops); the merge is bitwise reproducible for a given seed, machine
    # and thread count (the SVDs of TSV, KnOTS and the router and WUDI's Adam matmuls may differ in the last bits
    # across thread counts)
    seed: int = 0
    # Device for the merge arithmetic (cpu or cuda); the artifact is identical in layout either way
    device: str = "cpu"
    # Check each expert's weights file against the sha256 in its manifest before merging
    verify_hashes: bool = True
    # Hyper-parameters of each algorithm (only the chosen one is used)
    task_arithmetic: TaskArithmeticParams = field(default_factory=TaskArithmeticParams)
    ties: TiesParams = field(default_factory=TiesParams)
    dare: DareParams = field(default_factory=DareParams)
    weighted_average: WeightedAverageParams = field(default_factory=WeightedAverageParams)
    tsv: TsvParams = field(default_factory=TsvParams)
    knots: KnotsParams = field(default_factory=KnotsParams)
    wudi: WudiParams = field(default_factory=WudiParams)
    emr: EmrParams = field(default_factory=EmrParams)
    retain: RetainParams = field(default_factory=RetainParams)


def _yaml_list(text: str) -> bool:
    """Is `text` a whole YAML list (and not, say, a rule whose regex starts with a character class)?"""
    import yaml

    if not text.strip().startswith("["):
        return False
    try:
        return isinstance(yaml.safe_load(text), list)
    except yaml.YAMLError:
        return False


def normalize_argv(argv: list[str], list_fields: tuple[str, ...] = LIST_FIELDS) -> list[str]:
    """Accept `--experts a=D b=D` (several values after one flag, or `--experts=a=D`; a list flag given twice
    adds to its list) and `--lambda`, which draccus lacks.

    draccus reads one token per flag and parses it as YAML, so each list's values are joined into one JSON list.
    """
    import yaml

    out: list = []  # tokens, and for each list flag one list of its values where the flag first appeared
    lists: dict[str, list[str]] = {}
    i = 0
    while i < len(argv):
        flag, eq, value = argv[i].partition("=")
        flag = ALIASES.get(flag, flag)
        if flag in list_fields:
            values = [value] if eq else []
            while i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                values.append(argv[i + 1])
                i += 1
            if len(values) == 1 and _yaml_list(values[0]):
                values = yaml.safe_load(values[0])  # already a YAML list
            if flag not in lists:
                lists[flag] = []
                out += [flag, lists[flag]]
            lists[flag] += values
        else:
            out.append(flag + eq + value if eq else flag)
        i += 1
    return [json.dumps(t) if isinstance(t, list) else t for t in out]


def options_from_config(cfg: MergyConfig) -> MergeOptions:
    if cfg.algorithm not in METHODS:
        raise MergeError(f"--algorithm {cfg.algorithm!r}: expected one of {ALGORITHMS}")
    params = getattr(cfg, cfg.algorithm)
    if isinstance(params, WeightedAverageParams) and params.weights is not None:
        params = WeightedAverageParams(tuple(params.weights))
    return MergeOptions(
        algorithm=cfg.algorithm, params=params, rules=tuple(cfg.rules), masks=cfg.masks, mask_lambda=cfg.mask_lambda,
        k_gate=cfg.k_gate, expert_head_layers=cfg.expert_head_layers, per_task_parts=tuple(cfg.per_task_parts),
        router_block=cfg.router_block,
        router_layer=cfg.router_layer,
        scratch_weights=None if cfg.scratch_weights is None else tuple(cfg.scratch_weights),
        seed=cfg.seed, device=cfg.device, verify_hashes=cfg.verify_hashes,
    )


def run(cfg: MergyConfig) -> Path:
    if cfg.out is None:
        raise MergeError("--out is required: the directory to create for the merged artifact")
    experts = parse_expert_specs(cfg.experts)
    return merge_experts(experts, cfg.out, options_from_config(cfg))


def main(argv: list[str] | None = None) -> int:
    args = normalize_argv(list(sys.argv[1:] if argv is None else argv))
    return run_cli("mergy", MergyConfig, run, (MergeError, CheckpointError), args)


if __name__ == "__main__":
    sys.exit(main())
