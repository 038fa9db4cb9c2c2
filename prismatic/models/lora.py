"""LoRA on every linear layer of the VLM (vision towers, projector, LLM) via peft, and trainable-part init."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from peft import LoraConfig as PeftLoraConfig
from peft import inject_adapter_in_model

from prismatic.models.configuration import LoRAConfig
from prismatic.models.modeling import MergeVLA, is_trainable_name

ADAPTER = "default"
# lm_head is tied to the input embeddings and never used to predict actions.
LORA_EXCLUDE = ("llm.lm_head",)


def lora_target_modules(vlm: nn.Module) -> list[str]:
    return [n for n, m in vlm.named_modules() if isinstance(m, nn.Linear) and n not in LORA_EXCLUDE]


def apply_lora(model: MergeVLA, lora: LoRAConfig) -> None:
    """Wrap the VLM's linear layers with LoRA (in place) and freeze every original VLM weight."""
    peft_cfg = PeftLoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora_target_modules(model.vlm),
        bias="none",
    )
    inject_adapter_in_model(peft_cfg, model.vlm, adapter_name=ADAPTER)
    for name, p in model.named_parameters():
        p.requires_grad_(is_trainable_name(name))


def init_trainable(model: MergeVLA, seed: int) -> None:
    """Initialise every trained-from-scratch part and the LoRA factors from `seed` alone.

    Merging averages the from-scratch parts of experts, which only makes sense when all experts start
    from the same point, whatever base weights were loaded or in what order modules were built.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for prefix in ("proprio_proj", "action_expert"):
            for m in getattr(model, prefix).modules():
                if hasattr(m, "reset_parameters") and m is not model:
                    m.reset_parameters()
        for blk in model.action_expert.blocks:
            nn.init.zeros_(blk.gate)
        nn.init.normal_(model.action_queries, std=0.02)
        for name, p in model.named_parameters():
            if ".lora_A." in name:
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))
            elif ".lora_B." in name:
                nn.init.zeros_(p)
