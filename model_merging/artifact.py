"""The merged artifact: one safetensors file + one JSON manifest, in a directory.

Tensors (all fp32 unless noted), for parameters p and tasks t in manifest order:
    delta.<p>                 τ_merge of each LoRA-touched VLM weight p (plain names, e.g. vlm.llm…q_proj.weight)
    mask.<t>.<p>              uint8: S_t bit-packed (numpy.packbits order), present when masks are enabled
    rescale.<t>.<p>           0-d: EMR's rescaler of task t (one value for every p by default), after all deltas
    shared.<n>                from-scratch parameter n shared by all tasks (weighted average, or RETAIN)
    head.<t>.<n>              from-scratch parameter n kept per task (last L_h expert blocks, final norm, head, and
                              the manifest's `per_task_parts` groups)
    router.<t>.<v>.<act|vis>  (k_gate, D) router subspace of task t, for each variant v in the manifest's
                              `router.variants` (value / key / key_value / value_update)
Task t runs θ0 + rescale·(S_t ⊙ τ_merge) in the VLM, the shared parts and its own head. θ0 itself is not
stored: the manifest's `base` reference (with its sha256) says where it comes from, as for checkpoints.
The tensor list is a function of the manifest (`plan_specs`), so the loader checks the file exactly.
"""

from __future__ import annotations

import torch

from model_merging.tensor_files import TensorSpec

MERGED_KIND = "mergevla-merged"
ROUTER_VARIANTS = ("value", "key", "key_value", "value_update")
ROUTER_SIDES = ("act", "vis")
# Which value/key projections of an expert block each router variant is computed from.
ROUTER_WEIGHTS = {
    "value": {"act": ("v_act",), "vis": ("v_vis",)},
    "key": {"act": ("k_act",), "vis": ("k_vis",)},
    "key_value": {"act": ("k_act", "v_act"), "vis": ("k_vis", "v_vis")},
    "value_update": {"act": ("v_act",), "vis": ("v_vis",)},
}
# Variants computed from what training changed, W_e − W_0 (W_0: the experts' shared initialisation), not W_e:
# every expert block starts from the same seeded init, whose singular directions otherwise dominate W_e's.
ROUTER_FROM_UPDATE = frozenset({"value_update"})


def delta_key(p: str) -> str:
    return f"delta.{p}"


def mask_key(task: str, p: str) -> str:
    return f"mask.{task}.{p}"


def rescale_key(task: str, p: str) -> str:
    return f"rescale.{task}.{p}"


def shared_key(n: str) -> str:
    return f"shared.{n}"


def head_key(task: str, n: str) -> str:
    return f"head.{task}.{n}"


def router_key(task: str, variant: str, side: str) -> str:
    return f"router.{task}.{variant}.{side}"


def packed_len(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return -(-n // 8)


def plan_specs(manifest: dict) -> list[TensorSpec]:
    """Every tensor of the artifact, in file order, from the manifest fields that describe them."""
    f32, u8 = torch.float32, torch.uint8
    tasks = manifest["task_names"]
    masks = manifest["masks"]
    specs: list[TensorSpec] = []
    for p, shape in manifest["lora_params"].items():
        specs.append(TensorSpec(delta_key(p), f32, tuple(shape)))
        if masks["enabled"]:
            specs += [TensorSpec(mask_key(t, p), u8, (packed_len(shape),)) for t in tasks]
    if masks["enabled"] and masks["rescaled"]:  # after every delta: EMR's may pool all of them
        specs += [TensorSpec(rescale_key(t, p), f32, ()) for p in manifest["lora_params"] for t in tasks]
    specs += [TensorSpec(shared_key(n), f32, tuple(s)) for n, s in manifest["shared_params"].items()]
    for t in tasks:
        specs += [TensorSpec(head_key(t, n), f32, tuple(s)) for n, s in manifest["head_params"].items()]
    k, d = manifest["router"]["k_gate"], manifest["router"]["hidden"]
    variants = manifest["router"]["variants"]
    for t in tasks:
        specs += [TensorSpec(router_key(t, v, s), f32, (k, d)) for v in variants for s in ROUTER_SIDES]
    return specs
