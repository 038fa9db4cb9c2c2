"""M expert checkpoints → one merged artifact, streamed one parameter at a time (docs/DESIGN.md §4).

Memory: each LoRA-touched weight is expanded to M fp32 task vectors, merged, masked and written before the
next is read, so the peak is a few copies of the largest weight, not of the model. The output goes to a
hidden temporary directory that is renamed into place only when complete; on any error it is removed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model_merging.algorithms import (
    MergeContext,
    check_params,
    convex_weights,
    get_method,
    pooled_rescalers,
    weighted_sum,
)
from model_merging.artifact import (
    MERGED_KIND,
    ROUTER_FROM_UPDATE,
    ROUTER_SIDES,
    ROUTER_VARIANTS,
    ROUTER_WEIGHTS,
    delta_key,
    head_key,
    mask_key,
    plan_specs,
    rescale_key,
    router_key,
    shared_key,
)
from model_merging.chunks import all_finite
from model_merging.errors import MergeError
from model_merging.experts import ExpertSet
from model_merging.layout import check_part_groups, initial_scratch_state
from model_merging.linalg import top_right_singular_vectors
from model_merging.masks import MaskStats, packed_task_masks
from model_merging.rules import group_of, params_for, parse_rules
from model_merging.tensor_files import SafetensorsStreamWriter
from prismatic import __version__
from prismatic.checkpoint import FORMAT_VERSION, MANIFEST_FILE, WEIGHTS_FILE, training_steps, unfinished_warning
from prismatic.io import atomic_dir, check_output_dir, write_json
from prismatic.vla.augmentation import trained_crop_area


@dataclass
class MergeOptions:
    algorithm: str = "ties"
    params: Any = None  # the algorithm's hyper-parameter dataclass (None: its defaults)
    rules: tuple[str, ...] = ()  # per-module overrides, "PATTERN field=value …" (see rules.py)
    masks: bool = True  # per-task masks: TALL for every algorithm, EMR's own for EMR
    mask_lambda: float = 0.6
    k_gate: int = 8
    expert_head_layers: int = 1
    # from-scratch groups (layout.PART_GROUPS) also kept per task instead of averaged; () = the paper's merge
    per_task_parts: tuple[str, ...] = ()
    router_block: int = -1  # -1: the last shared block, L - L_h - 1
    router_layer: int = -1  # LLM hidden-state layer scored at test time; -1: the final layer L
    scratch_weights: tuple[float, ...] | None = None  # averaging weights of the shared from-scratch parts
    seed: int = 0  # seeds DARE's random drops
    device: str = "cpu"
    verify_hashes: bool = True


def _check_options(opts: MergeOptions) -> tuple[Any, list]:
    """(params, rules): the checks that need no expert, run before any expert file is read or hashed."""
    method = get_method(opts.algorithm)
    params = method.params() if opts.params is None else opts.params
    if not isinstance(params, method.params):
        raise MergeError(f"algorithm {opts.algorithm!r} takes {method.params.__name__}, got {type(params).__name__}")
    rules = parse_rules(opts.rules, method.params, opts.algorithm)
    check_params(opts.algorithm, params)
    for r in rules:
        check_params(opts.algorithm, dataclasses.replace(params, **dict(r.overrides)), f" in rule {r.as_text()!r}")
    _check_device(opts.device)
    check_part_groups(opts.per_task_parts, "per_task_parts")
    if not 0 <= opts.mask_lambda < math.inf:  # NaN would set no mask: every task would run θ0
        raise MergeError(f"mask lambda must be a finite number >= 0, got {opts.mask_lambda}")
    return params, rules


def _resolve(opts: MergeOptions, experts: ExpertSet, rules: list) -> tuple[int, int]:
    """(router block, router layer), after the checks that need the experts' layout."""
    n_blocks, hidden = experts.layout.num_blocks, experts.layout.hidden
    if not 0 <= opts.expert_head_layers <= n_blocks:
        raise MergeError(f"expert_head_layers must be in [0, {n_blocks}], got {opts.expert_head_layers}")
    # rules act on the task vectors, and for RETAIN on the shared parts trained from scratch too (the kept heads
    # are copied): a rule matching none of those (a typo'd group, or action_expert under another algorithm)
    # would silently change nothing
    ruled = [f"{m}.weight" for m in experts.layout.lora_modules] + (
        experts.layout.shared_names(opts.expert_head_layers, tuple(opts.per_task_parts))
        if opts.algorithm == "retain" else [])
    idle = [r.as_text() for r in rules if not any(r.matches(n) for n in ruled)]
    if idle:
        raise MergeError(f"rule(s) {idle} match no parameter that {opts.algorithm} applies rules to (the "
                         f"LoRA-touched VLM weights{', and the shared parts trained from scratch' if opts.algorithm == 'retain' else ''})")
    if opts.router_block >= n_blocks or opts.router_block < -1:
        raise MergeError(f"router_block must be in [0, {n_blocks - 1}] or -1 (the last shared block), "
                         f"got {opts.router_block}")
    block = opts.router_block if opts.router_block >= 0 else n_blocks - opts.expert_head_layers - 1
    if block < 0:
        raise MergeError(f"with expert_head_layers={opts.expert_head_layers} no expert block is shared, so there is "
                         f"no last shared block for the router: set router_block in [0, {n_blocks - 1}]")
    layer = opts.router_layer if opts.router_layer >= 0 else n_blocks
    if not 0 <= layer <= n_blocks:
        raise MergeError(f"router_layer must be in [0, {n_blocks}] or -1, got {opts.router_layer}")
    if not 1 <= opts.k_gate <= hidden:
        raise MergeError(f"k_gate must be in [1, {hidden}], got {opts.k_gate}")
    convex_weights(opts.scratch_weights, len(experts))  # validates the count and signs
    if opts.algorithm == "retain" and opts.scratch_weights is not None:
        raise MergeError("retain interpolates the parts trained from scratch with its own alphas "
                         "(--retain.alpha_action_expert): --scratch_weights would be ignored, so leave it unset")
    if opts.algorithm == "retain" and experts.init_seed is None:
        raise MergeError("retain interpolates the parts trained from scratch from the experts' shared "
                         "initialisation, but their manifests record no init_seed")
    return block, layer


def _check_device(device: str) -> None:
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise MergeError(f"device {device!r} is not a torch device ({e})") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MergeError(f"device is {device!r} but no CUDA device is available (use --device cpu)")


def _check_finite(t: torch.Tensor, what: str) -> torch.Tensor:
    if not all_finite(t):
        raise MergeError(f"merging produced NaN or inf in {what}; check the algorithm's hyper-parameters")
    return t


def build_manifest(experts: ExpertSet, opts: MergeOptions, params: Any, block: int, layer: int) -> dict:
    lay, tasks = experts.layout, experts.names
    method = get_method(opts.algorithm)
    masks_kind = None if not opts.masks else ("emr" if method.own_masks else "tall")
    parts = tuple(opts.per_task_parts)
    return {
        "format": MERGED_KIND,
        "format_version": FORMAT_VERSION,
        "mergevla_version": __version__,
        "algorithm": opts.algorithm,
        "params": dataclasses.asdict(params),
        "rules": list(opts.rules),
        "seed": opts.seed,
        "task_names": tasks,
        "experts": [{"name": e.name, "path": str(e.directory.resolve()), "weights_sha256": e.manifest["weights_sha256"],
                     "init_seed": e.manifest.get("init_seed"), **dict(zip(("step", "max_steps"), training_steps(e.manifest)))}
                    for e in experts.experts],
        "norm_stats": {e.name: e.manifest.get("norm_stats") for e in experts.experts},
        # what evaluation should centre-crop to, per expert (None: not recorded)
        "trained_crop_area": {e.name: trained_crop_area(e.manifest.get("train_config")) for e in experts.experts},
        # the size of the frames each expert trained on (None: not recorded), for evaluation to compare
        "trained_frame_size": {e.name: (e.manifest.get("dataset") or {}).get("frame_size") for e in experts.experts},
        "base": experts.base_ref,
        "config_name": experts.config.name,
        "config": experts.experts[0].manifest["config"],
        "lora": experts.experts[0].manifest["lora"],
        "stores": "deltas",  # delta.* are τ_merge, to be added to θ0 from `base`; never full weights
        "masks": {"enabled": opts.masks, "kind": masks_kind, "lambda": opts.mask_lambda if masks_kind == "tall" else None,
                  "rescaled": masks_kind == "emr", "bitorder": "big"},
        "expert_head_layers": opts.expert_head_layers,
        "per_task_parts": list(parts),
        # RETAIN interpolates them instead of averaging
        "scratch_weights": None if opts.algorithm == "retain" else convex_weights(opts.scratch_weights, len(tasks)),
        "lora_params": {f"{m}.weight": list(s) for m, s in lay.lora_modules.items()},
        "shared_params": {n: list(lay.scratch[n]) for n in lay.shared_names(opts.expert_head_layers, parts)},
        "head_params": {n: list(lay.scratch[n]) for n in lay.head_names(opts.expert_head_layers, parts)},
        "router": {"k_gate": opts.k_gate, "hidden": lay.hidden, "block": block, "layer": layer,
                   "variants": router_variants(experts), "default_variant": "value",
                   "source": "each expert's own (pre-merge) weights of action_expert.blocks[block]; "
                             "value_update: those minus the experts' shared initialisation (init_seed)"},
    }


def router_variants(experts: ExpertSet) -> list[str]:
    """Every variant, less the learned-update ones when the experts' shared initialisation is unknown."""
    if experts.init_seed is None:
        return [v for v in ROUTER_VARIANTS if v not in ROUTER_FROM_UPDATE]
    return list(ROUTER_VARIANTS)


def router_subspaces(
    block_weights: dict[str, torch.Tensor],
    k: int,
    variants: Sequence[str] = ROUTER_VARIANTS,
    init_weights: dict[str, torch.Tensor] | None = None,
) -> dict[tuple[str, str], torch.Tensor]:
    """(variant, side) → top-k right singular vectors of that side's key/value projections (stacked for k+v).

    Variants in ROUTER_FROM_UPDATE use `block_weights − init_weights` (same keys), the learned update.
    """
    out = {}
    for v in variants:
        if v in ROUTER_FROM_UPDATE and init_weights is None:
            raise MergeError(f"router variant {v!r} needs the experts' initial weights (init_weights)")
        for s in ROUTER_SIDES:
            names = [f"{proj}.weight" for proj in ROUTER_WEIGHTS[v][s]]
            if v in ROUTER_FROM_UPDATE:
                w = torch.cat([block_weights[n] - init_weights[n] for n in names], 0)
            else:
                w = torch.cat([block_weights[n] for n in names], 0)
            out[(v, s)] = top_right_singular_vectors(w, k)
    return out


def _write_lora_params(writer, experts, opts, params, rules, stats: MaskStats, log) -> dict[str, list[float]] | None:
    """Deltas and masks of every LoRA-touched weight, then EMR's rescalers; returns those (per task, per weight)."""
    method = get_method(opts.algorithm)
    tasks = experts.names
    modules = list(experts.layout.lora_modules)
    rescale_sums: list[tuple[tuple[float, float], ...]] = []  # EMR with masks: one entry per weight
    for i, module in enumerate(modules):
        p = f"{module}.weight"
        factors = experts.lora_factors(module, opts.device)
        taus = experts.task_vectors(module, factors)
        ctx = MergeContext(name=p, group=group_of(p), factors=tuple(factors), seed=opts.seed)
        merged = method.fn(taus, params_for(p, params, rules), ctx)
        writer.write(delta_key(p), _check_finite(merged.tensor, p).cpu())
        if opts.masks:
            if method.own_masks:
                packed = packed_task_masks(None, merged.tensor, masks=merged.masks, stats=stats)
            else:
                packed = packed_task_masks(taus, merged.tensor, opts.mask_lambda, stats=stats)
            for t, m in zip(tasks, packed):
                writer.write(mask_key(t, p), m.cpu())
            if method.own_masks:
                rescale_sums.append(merged.rescale_sums)
        if log and (i % 50 == 0 or i == len(modules) - 1):
            log(f"  [{i + 1}/{len(modules)}] {p}")
    if not rescale_sums:
        return None
    if params.rescale == "model":  # one value per task, from the sums over every weight (the EMR paper)
        per_weight = [pooled_rescalers(rescale_sums)] * len(modules)
    else:
        per_weight = [pooled_rescalers([s]) for s in rescale_sums]
    for module, values in zip(modules, per_weight):
        for t, r in zip(tasks, values):
            writer.write(rescale_key(t, f"{module}.weight"), torch.tensor(r, dtype=torch.float32))
    return {t: [v[i] for v in per_weight] for i, t in enumerate(tasks)}


def _write_scratch(writer, experts: ExpertSet, opts, params, rules, manifest) -> None:
    weights = manifest["scratch_weights"]
    init = None
    if opts.algorithm == "retain":  # RETAIN interpolates from the shared initialisation (its θ_pre)
        init = initial_scratch_state(experts.config, int(experts.init_seed))
    method = get_method(opts.algorithm)
    for n in manifest["shared_params"]:
        ts = experts.tensors(n, opts.device)
        if init is None:
            out = weighted_sum(ts, weights)
        else:
            pre = init[n].to(opts.device)
            ctx = MergeContext(name=n, group=group_of(n), seed=opts.seed)
            out = pre + method.fn([t - pre for t in ts], params_for(n, params, rules), ctx).tensor
        writer.write(shared_key(n), _check_finite(out, n).cpu())
    for i, t in enumerate(experts.names):
        for n in manifest["head_params"]:
            writer.write(head_key(t, n), experts.expert_tensor(i, n))


def _write_router(writer, experts: ExpertSet, manifest) -> None:
    r = manifest["router"]
    prefix = f"action_expert.blocks.{r['block']}."
    variants = r["variants"]
    names = {f"{proj}.weight" for v in variants for projs in ROUTER_WEIGHTS[v].values() for proj in projs}
    init = None
    if any(v in ROUTER_FROM_UPDATE for v in variants):
        start = initial_scratch_state(experts.config, int(experts.init_seed))
        init = {n: start[prefix + n] for n in names}
    for i, t in enumerate(experts.names):
        own = {n: experts.expert_tensor(i, prefix + n) for n in names}
        subspaces = router_subspaces(own, r["k_gate"], variants, init)
        for v in variants:
            for s in ROUTER_SIDES:
                writer.write(router_key(t, v, s), subspaces[(v, s)])


def merge_experts(
    experts: ExpertSet | Sequence[tuple[str, Path | str]],
    out_dir: Path | str,
    opts: MergeOptions | None = None,
    log: Callable[[str], None] | None = print,
) -> Path:
    """Merge, write `out_dir` (which must not exist) and return it."""
    opts = opts or MergeOptions()
    out = Path(out_dir)
    if out.exists():
        raise MergeError(f"output directory {out} already exists; choose a new --out (nothing was written)")
    try:
        check_output_dir(out, "output directory")
    except NotADirectoryError as e:
        raise MergeError(str(e)) from e
    params, rules = _check_options(opts)
    if not isinstance(experts, ExpertSet):
        experts = ExpertSet.open(experts, verify_hashes=opts.verify_hashes)
    block, layer = _resolve(opts, experts, rules)
    manifest = build_manifest(experts, opts, params, block, layer)
    created = [p for p in reversed(out.parents) if not p.exists()]  # removed again if the merge fails
    writer = None
    try:
        with atomic_dir(out) as tmp:
            writer = SafetensorsStreamWriter(tmp / WEIGHTS_FILE, plan_specs(manifest), {"format": MERGED_KIND})
            stats = MaskStats()
            with torch.no_grad():
                if log:
                    log(f"merging {len(experts)} expert{'s' * (len(experts) != 1)} {experts.names} with {opts.algorithm} "
                        f"({len(manifest['lora_params'])} LoRA-touched weights)")
                    if warning := unfinished_warning(manifest):
                        log(warning)
                    if get_method(opts.algorithm).own_masks and not opts.masks:
                        log(f"note: {opts.algorithm} without masks gives every task its unified vector, with neither "
                            "its per-task masks nor its rescalers: an ablation, not the method as published")
                rescalers = _write_lora_params(writer, experts, opts, params, rules, stats, log)
                _write_scratch(writer, experts, opts, params, rules, manifest)
                _write_router(writer, experts, manifest)
            manifest["weights_sha256"] = writer.close()
            writer = None
            if opts.masks:
                manifest["masks"]["stats"] = stats.as_dict()
                manifest["masks"]["density"] = dict(zip(experts.names, stats.density()))
                if rescalers is not None:  # EMR's, as stored: the range over weights (one value with rescale=model)
                    manifest["masks"]["rescalers"] = {t: [min(v), max(v)] for t, v in rescalers.items()}
                if log:
                    log(f"selfish ratio {stats.selfish_ratio:.3f} of all entries "
                        f"({stats.selfish_ratio_active:.3f} of entries used by any task)")
            write_json(tmp / MANIFEST_FILE, manifest)
    except BaseException:
        if writer is not None:
            writer.abort()
        for p in reversed(created):
            with contextlib.suppress(OSError):  # not empty: something else wrote there meanwhile
                p.rmdir()
        raise
    if log:
        log(f"wrote {out}")
    return out

