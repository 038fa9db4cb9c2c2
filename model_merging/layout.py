"""What a config's checkpoints must contain, learned from a weightless (meta-device) build of the model.

Building on the meta device takes no memory and seconds even at real size, and keeps the list of LoRA
targets and from-scratch parameters in one place (prismatic.models) instead of a copy here.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn as nn

from model_merging.errors import MergeError
from prismatic.models.configuration import VLAConfig

LORA_A = ".lora_A.default.weight"
LORA_B = ".lora_B.default.weight"
_BLOCK_RE = re.compile(r"^action_expert\.blocks\.(\d+)\.")
_FINAL_RE = re.compile(r"^action_expert\.(out_norm|out_proj)\.")
# Groups of from-scratch parameters outside the kept head, which a merge may also keep per task (`per_task_parts`)
# instead of averaging them; "shared_blocks" are the action-expert blocks before the last L_h (and, when L_h is 0
# and so every block is shared, the final norm and head after them).
PART_GROUPS = ("action_queries", "proprio_proj", "expert_input", "shared_blocks")
_HEAD_MODULE_RE = re.compile(r"^(action_queries$|proprio_proj\.|action_expert\.(in_norm|in_proj)\.)")


def part_group(name: str) -> str:
    """The PART_GROUPS group of a from-scratch parameter. The final norm and head go with the blocks: kept per
    task with the last L_h blocks when L_h >= 1, shared (or kept) with the blocks when L_h is 0."""
    if _BLOCK_RE.match(name) or _FINAL_RE.match(name):
        return "shared_blocks"
    if name.startswith("action_expert."):
        return "expert_input"
    return name.split(".")[0]


def check_part_groups(parts, field: str) -> None:
    unknown = sorted(set(parts) - set(PART_GROUPS))
    if unknown:
        raise MergeError(f"{field} {unknown}: expected a subset of {list(PART_GROUPS)}")


@dataclass(frozen=True)
class ModelLayout:
    lora_modules: dict[str, tuple[int, int]]  # VLM module path → (out, in) of its base weight
    scratch: dict[str, tuple[int, ...]]  # parameter trained from scratch → shape
    num_blocks: int  # action-expert blocks (L)
    hidden: int  # LLM width D

    def head_names(self, expert_head_layers: int, per_task_parts: tuple[str, ...] = ()) -> list[str]:
        """From-scratch parameters kept per task: the last L_h blocks, plus final norm and head if L_h ≥ 1, plus
        every parameter of the `per_task_parts` groups."""
        check_part_groups(per_task_parts, "per_task_parts")
        first = self.num_blocks - expert_head_layers
        out = []
        for n in self.scratch:
            m = _BLOCK_RE.match(n)
            if ((m and int(m.group(1)) >= first) or (expert_head_layers > 0 and _FINAL_RE.match(n))
                    or part_group(n) in per_task_parts):
                out.append(n)
        return out

    @staticmethod
    def head_module(name: str) -> str:
        """The kept module a head parameter belongs to: action_expert.blocks.<i>, .out_norm, .out_proj, .in_norm,
        .in_proj, proprio_proj, or the `action_queries` parameter itself."""
        m = _BLOCK_RE.match(name) or _FINAL_RE.match(name)
        if m:
            return m.group(0).rstrip(".")
        m = _HEAD_MODULE_RE.match(name)
        if not m:
            raise ValueError(f"{name!r} is not a from-scratch parameter")
        return m.group(0).rstrip(".")

    def shared_names(self, expert_head_layers: int, per_task_parts: tuple[str, ...] = ()) -> list[str]:
        heads = set(self.head_names(expert_head_layers, per_task_parts))
        return [n for n in self.scratch if n not in heads]


# The model (and with it transformers, seconds to import) is imported by the functions that build one, so the
# CLIs that import this module refuse bad input without waiting for it.
def _meta_model(cfg: VLAConfig):
    from prismatic.models.modeling import MergeVLA

    with torch.device("meta"):
        return MergeVLA(cfg)


@lru_cache(maxsize=8)
def _layout_cached(cfg_json: str) -> ModelLayout:
    from prismatic.models.lora import lora_target_modules

    cfg = VLAConfig.from_dict(json.loads(cfg_json))
    model = _meta_model(cfg)
    lora = {}
    for name in lora_target_modules(model.vlm):
        w = model.vlm.get_submodule(name).weight
        lora[f"vlm.{name}"] = (int(w.shape[0]), int(w.shape[1]))
    scratch = {n: tuple(int(d) for d in p.shape) for n, p in model.named_parameters()
               if n.startswith(model.SCRATCH_PREFIXES)}
    return ModelLayout(lora, scratch, cfg.num_expert_blocks, cfg.llm.hidden_size)


def model_layout(cfg: VLAConfig) -> ModelLayout:
    return _layout_cached(json.dumps(cfg.to_dict(), sort_keys=True))


def initial_scratch_state(cfg: VLAConfig, seed: int) -> dict[str, torch.Tensor]:
    """The from-scratch parameters as every expert of `seed` started (RETAIN's θ_pre for them).

    Only those parts are materialised; `init_trainable` is the same function `build_vla` uses, so the
    values are exactly the experts' starting point without building the VLM.
    """
    from prismatic.models.lora import init_trainable

    model = _meta_model(cfg)
    for prefix in ("proprio_proj", "action_expert"):
        getattr(model, prefix).to_empty(device="cpu")
    model.action_queries = nn.Parameter(torch.empty(model.action_queries.shape))
    init_trainable(model, seed)
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith(model.SCRATCH_PREFIXES)}
