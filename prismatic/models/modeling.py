"""The whole MergeVLA model in one file.

    images ─► DINOv2-reg ┐ (second-to-last block, patch tokens)
              SigLIP    ─┴► concat ─► projector ─► vision tokens ┐
    prompt ─► [tok0, vision tokens, tok1..n, action queries] ─► Qwen2 (LoRA) ─► hidden states of every layer
    proprio ─► proprio projector ─► one token
    action expert: block i cross-attends from the chunk slots to layer i+1's (action-query states + proprio
    token) and (vision states, logits scaled by a gate); no self-attention in MergeVLA ─► (B, 8, 7) actions

The baseline (`expert_arch="self_attn"`, VLA-Adapter style) adds a self-attention path over the chunk slots
and gates the vision logits with tanh instead of sigmoid; everything else is shared code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import (
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from prismatic.models.configuration import VisionTowerConfig, VLAConfig

# ----------------------------------------------------------------------------------------------- vision


def dino_hf_config(t: VisionTowerConfig, image_size: int, num_layers: int) -> Dinov2WithRegistersConfig:
    if t.intermediate_size % t.hidden_size:
        raise ValueError("DINOv2 intermediate_size must be a multiple of hidden_size (transformers takes a ratio)")
    return Dinov2WithRegistersConfig(
        hidden_size=t.hidden_size, num_hidden_layers=num_layers, num_attention_heads=t.num_heads,
        mlp_ratio=t.intermediate_size // t.hidden_size, image_size=image_size, patch_size=t.patch_size,
        num_register_tokens=t.num_register_tokens, layer_norm_eps=t.layer_norm_eps, layerscale_value=1e-5,
        hidden_act=t.hidden_act, qkv_bias=True,
    )


def siglip_hf_config(t: VisionTowerConfig, image_size: int, num_layers: int) -> SiglipVisionConfig:
    return SiglipVisionConfig(
        hidden_size=t.hidden_size, num_hidden_layers=num_layers, num_attention_heads=t.num_heads,
        intermediate_size=t.intermediate_size, image_size=image_size, patch_size=t.patch_size,
        layer_norm_eps=t.layer_norm_eps, hidden_act=t.hidden_act, vision_use_head=False,
    )


class FusedVisionBackbone(nn.Module):
    """DINOv2-reg + SigLIP side by side; per patch, the second-to-last block's features concatenated.

    The last block of each tower (and SigLIP's pooling head) never influences the output, so they are not
    built: `num_layers - 1` blocks run.
    """

    def __init__(self, cfg: VLAConfig):
        super().__init__()
        self.dino = Dinov2WithRegistersModel(dino_hf_config(cfg.dino, cfg.image_size, cfg.dino.num_layers - 1))
        self.siglip = SiglipVisionModel(siglip_hf_config(cfg.siglip, cfg.image_size, cfg.siglip.num_layers - 1))
        self.num_prefix = 1 + cfg.dino.num_register_tokens
        for name, t in (("dino", cfg.dino), ("siglip", cfg.siglip)):
            self.register_buffer(f"{name}_mean", torch.tensor(t.mean).view(1, 3, 1, 1), persistent=False)
            self.register_buffer(f"{name}_std", torch.tensor(t.std).view(1, 3, 1, 1), persistent=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values: (B, N_img, 3, H, W) in [0, 1] → (B, N_img * patches, dino_dim + siglip_dim)."""
        b, n = pixel_values.shape[:2]
        x = pixel_values.flatten(0, 1)
        d = self.dino(pixel_values=(x - self.dino_mean) / self.dino_std, output_hidden_states=True)
        s = self.siglip(pixel_values=(x - self.siglip_mean) / self.siglip_std, output_hidden_states=True)
        feats = torch.cat([d.hidden_states[-1][:, self.num_prefix:], s.hidden_states[-1]], dim=-1)
        return feats.reshape(b, n * feats.shape[1], feats.shape[2])


def make_projector(vision_dim: int, llm_dim: int) -> nn.Sequential:
    """Prismatic's fused GELU MLP (indices 0, 2, 4 match its checkpoint keys)."""
    return nn.Sequential(
        nn.Linear(vision_dim, 4 * vision_dim), nn.GELU(),
        nn.Linear(4 * vision_dim, llm_dim), nn.GELU(),
        nn.Linear(llm_dim, llm_dim),
    )


def qwen2_hf_config(cfg: VLAConfig) -> Qwen2Config:
    c = cfg.llm
    return Qwen2Config(
        hidden_size=c.hidden_size, num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads, intermediate_size=c.intermediate_size, vocab_size=c.vocab_size,
        rope_theta=c.rope_theta, rms_norm_eps=c.rms_norm_eps, max_position_embeddings=c.max_position_embeddings,
        tie_word_embeddings=c.tie_word_embeddings, hidden_act="silu", use_sliding_window=False,
    )


class PrismaticVLM(nn.Module):
    """The pretrained part θ0: vision towers, projector, LLM. Everything here is frozen; LoRA adapts it."""

    def __init__(self, cfg: VLAConfig):
        super().__init__()
        self.vision = FusedVisionBackbone(cfg)
        self.projector = make_projector(cfg.vision_dim, cfg.llm.hidden_size)
        self.llm = Qwen2ForCausalLM(qwen2_hf_config(cfg))


# ------------------------------------------------------------------------------------------ action expert


def rope(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary embedding over positions 0..T-1 of x: (B, H, T, hd), rotate-half convention."""
    t, hd = x.shape[-2], x.shape[-1]
    inv = 1.0 / (base ** (torch.arange(0, hd, 2, device=x.device, dtype=torch.float32) / hd))
    ang = torch.arange(t, device=x.device, dtype=torch.float32)[:, None] * inv[None, :]
    cos, sin = torch.cat([ang, ang], -1).cos().to(x.dtype), torch.cat([ang, ang], -1).sin().to(x.dtype)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class ExpertBlock(nn.Module):
    """Chunk slots attend to (a) action-query states + proprio token and (b) vision states, one softmax.

    Each key set has its own query projection; the vision logits are multiplied by gate(g), g init 0. The
    baseline (`self_attn`) adds the chunk slots as a third key set, with its own query projection too, and a
    tanh gate: VLA-Adapter shares one query projection over its key sets, but here the baseline differs from
    MergeVLA's block only in the self-attention and the gate.
    """

    def __init__(self, dim: int, heads: int, self_attn: bool):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q_act, self.k_act, self.v_act = (nn.Linear(dim, dim) for _ in range(3))
        self.q_vis, self.k_vis, self.v_vis = (nn.Linear(dim, dim) for _ in range(3))
        self.has_self_attn = self_attn
        if self_attn:
            self.q_self, self.k_self, self.v_self = (nn.Linear(dim, dim) for _ in range(3))
        self.o_proj = nn.Linear(dim, dim)
        self.gate = nn.Parameter(torch.zeros(1))
        self.ffn = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.ReLU())

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.head_dim).transpose(1, 2)

    def attention(self, x: torch.Tensor, h_act: torch.Tensor, h_vis: torch.Tensor):
        """Attention weights (B, H, slots, keys), keys = [self (baseline only), h_act, h_vis], and the values."""
        sp = self._split
        scores, values = [], []
        if self.has_self_attn:
            scores.append(rope(sp(self.q_self(x))) @ rope(sp(self.k_self(x))).transpose(-1, -2))
            values.append(sp(self.v_self(x)))
            gate = torch.tanh(self.gate)
        else:
            gate = torch.sigmoid(self.gate)
        scores.append(rope(sp(self.q_act(x))) @ rope(sp(self.k_act(h_act))).transpose(-1, -2))
        values.append(sp(self.v_act(h_act)))
        scores.append(gate * (rope(sp(self.q_vis(x))) @ rope(sp(self.k_vis(h_vis))).transpose(-1, -2)))
        values.append(sp(self.v_vis(h_vis)))
        return torch.softmax(torch.cat(scores, -1) / math.sqrt(self.head_dim), dim=-1), torch.cat(values, -2)

    def forward(self, x: torch.Tensor, h_act: torch.Tensor, h_vis: torch.Tensor) -> torch.Tensor:
        attn, values = self.attention(x, h_act, h_vis)
        out = (attn @ values).transpose(1, 2).flatten(2)
        return self.ffn(self.o_proj(out) + x)


class ActionExpert(nn.Module):
    def __init__(self, cfg: VLAConfig):
        super().__init__()
        d, a = cfg.llm.hidden_size, cfg.action_dim
        self.chunk_len, self.in_dim, self.noise_std = cfg.chunk_len, a * d, cfg.expert_noise_std
        self.in_norm = nn.LayerNorm(a * d)
        self.in_proj = nn.Linear(a * d, d)
        self.blocks = nn.ModuleList(
            ExpertBlock(d, cfg.expert_heads, cfg.expert_arch == "self_attn") for _ in range(cfg.num_expert_blocks)
        )
        self.out_norm = nn.LayerNorm(d)
        self.out_proj = nn.Linear(d, a)

    def forward(self, act_states, vis_states, proprio_token: torch.Tensor) -> torch.Tensor:
        """act_states / vis_states: per-LLM-layer lists (len L+1) of (B, Q, D) / (B, V, D)."""
        b = proprio_token.shape[0]
        x = proprio_token.new_zeros(b, self.chunk_len, self.in_dim)
        if self.training and self.noise_std > 0:
            # as the reference design has it (docs/DESIGN.md §1.3): in_norm scales this noise to unit variance, so
            # training sees ~N(0, 1) inputs and evaluation the norm's bias alone; kept for fidelity (without the
            # noise the TableTop-4 goal expert did no better, docs/TABLETOP4_FINDINGS.md)
            x = x + self.noise_std * torch.randn_like(x)
        x = F.relu(self.in_proj(self.in_norm(x)))
        for i, block in enumerate(self.blocks):
            x = block(x, torch.cat([act_states[i + 1], proprio_token], dim=1), vis_states[i + 1])
        return self.out_proj(self.out_norm(x))


# ------------------------------------------------------------------------------------------------- VLA

# Mean over the (B, chunk_len, action_dim) normalised chunk. L1 is the published objective; MSE weighs large
# errors more, which at small step budgets makes a tiny expert condition on the instruction sooner.
ACTION_LOSSES = {"l1": F.l1_loss, "mse": F.mse_loss}


@dataclass
class VLAOutput:
    actions: torch.Tensor  # (B, chunk_len, action_dim), normalised
    loss: torch.Tensor | None = None
    act_states: list | None = None  # per layer (B, Q, D): kept for the router
    vis_states: list | None = None  # per layer (B, V, D)


class MergeVLA(nn.Module):
    def __init__(self, cfg: VLAConfig):
        super().__init__()
        self.config = cfg
        d = cfg.llm.hidden_size
        self.vlm = PrismaticVLM(cfg)
        self.action_queries = nn.Parameter(torch.zeros(cfg.num_action_queries, d))
        self.per_task_queries: nn.Module | None = None  # set by a merged model that keeps queries per task
        self.proprio_proj = nn.Sequential(nn.Linear(cfg.proprio_dim, d), nn.GELU(), nn.Linear(d, d))
        self.action_expert = ActionExpert(cfg)

    # Parts trained from scratch (everything outside the VLM). LoRA factors are trained too.
    SCRATCH_PREFIXES = ("action_queries", "proprio_proj.", "action_expert.")

    def query_embeddings(self, b: int) -> torch.Tensor:
        """(B, Q, D) input embeddings of the action queries: the learned set, or each sample's task's own."""
        if self.per_task_queries is not None:
            return self.per_task_queries(b)
        return self.action_queries.expand(b, -1, -1)

    def build_sequence(self, input_ids: torch.Tensor, text_lens: torch.Tensor, pixel_values: torch.Tensor):
        """Input embeddings [tok0, vision, tok1..n-1, queries, pads] and each sample's query positions.

        Prompts are right-padded, so with a causal mask no real token ever sees a pad and no attention mask
        is needed; queries are moved in front of the pads so they directly follow each sample's text.
        """
        b, t = input_ids.shape
        q = self.config.num_action_queries
        tok = self.vlm.llm.get_input_embeddings()(input_ids)
        vis = self.vlm.projector(self.vlm.vision(pixel_values))
        v = vis.shape[1]
        src = torch.cat([tok[:, :1], vis, tok[:, 1:], self.query_embeddings(b).to(tok.dtype)], 1)
        pos = torch.arange(v + t + q, device=tok.device).expand(b, -1)
        n = text_lens.to(tok.device).view(b, 1)
        text_end, query_end = v + n, v + n + q  # in output positions
        idx = torch.where(
            pos < text_end, pos, torch.where(pos < query_end, v + t + (pos - text_end), pos - q)
        )
        x = src.gather(1, idx.unsqueeze(-1).expand(-1, -1, src.shape[-1]))
        query_pos = text_end + torch.arange(q, device=tok.device)
        return x, query_pos, v

    def forward(
        self,
        input_ids: torch.Tensor,
        text_lens: torch.Tensor,
        pixel_values: torch.Tensor,
        proprio: torch.Tensor,
        actions: torch.Tensor | None = None,
        keep_states: bool = False,
        action_loss: str = "l1",
    ) -> VLAOutput:
        x, query_pos, v = self.build_sequence(input_ids, text_lens, pixel_values)
        out = self.vlm.llm.model(inputs_embeds=x, output_hidden_states=True, use_cache=False)
        gidx = query_pos.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        act_states = [h.gather(1, gidx) for h in out.hidden_states]
        vis_states = [h[:, 1 : 1 + v] for h in out.hidden_states]
        proprio_token = self.proprio_proj(proprio.to(x.dtype)).unsqueeze(1)
        pred = self.action_expert(act_states, vis_states, proprio_token)
        if action_loss not in ACTION_LOSSES:
            raise ValueError(f"action_loss is {action_loss!r}, expected one of {sorted(ACTION_LOSSES)}")
        loss = ACTION_LOSSES[action_loss](pred.float(), actions.float()) if actions is not None else None
        keep = keep_states or None
        return VLAOutput(pred, loss, keep and act_states, keep and vis_states)

    @torch.no_grad()
    def predict_action(self, **batch) -> torch.Tensor:
        was_training = self.training
        self.eval()
        try:
            return self(**batch).actions
        finally:
            self.train(was_training)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if is_trainable_name(k)}


def is_trainable_name(name: str) -> bool:
    return name.startswith(MergeVLA.SCRATCH_PREFIXES) or ".lora_A." in name or ".lora_B." in name
