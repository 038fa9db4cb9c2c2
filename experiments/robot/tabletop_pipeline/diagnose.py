"""Why does a TableTop-4 expert fail? Two measurements on one checkpoint, kept runnable for issue 5's work.

    python -m experiments.robot.tabletop_pipeline.diagnose \
        --checkpoint runs/demo/train/mergevla/goal/checkpoints/step_001500 --suite goal

- attention: per action-expert block, the share of attention on the action-query states, the proprio token
  (and, for the baseline, the chunk slots themselves) and the vision tokens, and the largest weight any single
  vision token gets (1 / number of keys when attention is flat);
- sensitivity: how far the first predicted chunk would carry the gripper (the sum of its position actions)
  spreads when only the instruction changes (one observation, every task's instruction of the suite) and when
  only the scene changes (one task, several init states), next to the same spread of the scripted expert's
  first chunk-length steps. A policy that plays one average trajectory shows spreads near 0 where the
  expert's are large;
- agreement: per axis (x, y, z), over `agreement_states` init states of every task of the suite, the correlation
  between the first chunk's summed motion and the scripted expert's over the same steps, and both spreads. An
  axis whose target depends on the instruction and the scene together (spatial: which of two cubes) shows a
  correlation near 0 where an axis set by the scene alone is near 1.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import draccus
import numpy as np
import torch

from experiments.robot.policy import CenterCrop, VLAPolicy
from experiments.robot.tabletop import get_suite, make_env
from experiments.robot.tabletop.expert import ScriptedExpert


@dataclass
class DiagnoseConfig:
    checkpoint: Path = Path("runs/demo/train/mergevla/goal/checkpoints/step_001500")  # a fine-tuned checkpoint
    suite: str = "goal"
    task_id: int = 0  # whose observation the instructions are swapped on, and whose scenes are swapped
    init_states: int = 8  # scenes (init states 0..n-1) for the scene swap
    image_size: int = 64
    crop_area: Optional[float] = None  # centre crop shown to the model (None: its training crop area, 1 without aug)
    agreement_states: int = 4  # init states per task for the per-axis agreement (0: skip it)


def attention_shares(model, obs: dict, instruction: str, crop_area: float = 1.0) -> list[dict[str, float]]:
    """Per expert block: mean attention share of each key set and the largest single vision-token weight."""
    cfg = model.config
    captured = []

    def hook(block, args, _out):
        captured.append((block, block.attention(*args)[0]))

    handles = [b.register_forward_hook(hook) for b in model.action_expert.blocks]
    try:
        VLAPolicy(model, CenterCrop(crop_area)).act([obs], [instruction], [0])
    finally:
        for h in handles:
            h.remove()
    rows = []
    for block, attn in captured:
        w = attn.mean(dim=(0, 1, 2))  # over batch, heads and chunk slots → (keys,)
        n_self = cfg.chunk_len if block.has_self_attn else 0
        n_act = cfg.num_action_queries
        parts = {"self": w[:n_self], "action_queries": w[n_self:n_self + n_act],
                 "proprio": w[n_self + n_act:n_self + n_act + 1], "vision": w[n_self + n_act + 1:]}
        row = {k: float(v.sum()) for k, v in parts.items() if v.numel()}
        row["max_vision_token"] = float(parts["vision"].max())
        row["uniform_weight"] = 1.0 / w.numel()
        gate = torch.tanh(block.gate) if block.has_self_attn else torch.sigmoid(block.gate)
        row["vision_gate"] = gate.item()
        rows.append(row)
    return rows


def displacement_spread(chunks: np.ndarray) -> float:
    """(N, T, 7) action chunks → mean over x, y, z of the std across the N chunks of their summed motion."""
    return float(np.asarray(chunks)[:, :, :3].sum(axis=1).std(axis=0).mean())


def expert_chunk(suite: str, task_id: int, init_state_id: int, steps: int) -> np.ndarray:
    """The scripted expert's (noise-free) first `steps` actions from that init state, (steps, 7)."""
    env, expert = make_env(suite, task_id, init_state_id, render=False), ScriptedExpert(noise=0.0)
    env.reset()
    actions = []
    for _ in range(steps):
        a = expert.act(env.state)
        actions.append(a)
        env.step(a)
    return np.stack(actions)


def sensitivity(model, suite: str, task_id: int, init_states: int, image_size: int = 64,
                crop_area: float = 1.0) -> dict[str, dict]:
    """First-chunk displacement spread of the policy and of the scripted expert: instruction swap, scene swap."""
    policy, steps = VLAPolicy(model, CenterCrop(crop_area)), model.config.chunk_len
    obs = make_env(suite, task_id, 0, image_size=image_size).reset()
    instructions = [t.instruction for t in get_suite(suite)]
    scenes = [make_env(suite, task_id, i, image_size=image_size) for i in range(init_states)]
    by_instruction = policy.act([obs] * len(instructions), instructions, list(range(len(instructions))))
    by_scene = policy.act([e.reset() for e in scenes], [scenes[0].instruction] * init_states, list(range(init_states)))
    # the scripted expert reads the state, so "another instruction" means that task in its own scene
    expert_by_task = [expert_chunk(suite, t, 0, steps) for t in range(len(instructions))]
    expert_by_scene = [expert_chunk(suite, task_id, i, steps) for i in range(init_states)]
    return {
        "instruction_swap": {"policy": displacement_spread(by_instruction),
                             "scripted_expert": displacement_spread(expert_by_task)},
        "scene_swap": {"policy": displacement_spread(by_scene), "scripted_expert": displacement_spread(expert_by_scene)},
    }


def first_chunk_agreement(model, suite: str, init_states: int, image_size: int = 64,
                          crop_area: float = 1.0) -> dict[str, dict[str, float]]:
    """Per axis: correlation of the policy's and the scripted expert's first-chunk motion over the suite's
    tasks × `init_states` init states, and the spread (std) of each."""
    policy, steps = VLAPolicy(model, CenterCrop(crop_area)), model.config.chunk_len
    scenes = [(t, i) for t in range(len(get_suite(suite))) for i in range(init_states)]
    envs = [make_env(suite, t, i, image_size=image_size) for t, i in scenes]
    chunks = policy.act([e.reset() for e in envs], [e.instruction for e in envs], list(range(len(envs))))
    mine = np.asarray(chunks)[:, :, :3].sum(axis=1)
    theirs = np.stack([expert_chunk(suite, t, i, steps)[:, :3].sum(axis=0) for t, i in scenes])
    out = {}
    for k, axis in enumerate("xyz"):
        a, b = mine[:, k], theirs[:, k]
        corr = float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else float("nan")
        out[axis] = {"correlation": corr, "policy_spread": float(a.std()), "scripted_expert_spread": float(b.std())}
    return out


def training_crop_area(checkpoint: Path) -> float:
    """The centre-crop area a checkpoint saw in training: its random-crop area with image_aug, else 1."""
    from prismatic.checkpoint import read_manifest
    from prismatic.models.pretrained import CHECKPOINT_KIND
    from prismatic.vla.augmentation import centre_crop_for

    train = read_manifest(checkpoint, CHECKPOINT_KIND).get("train_config") or {}
    return centre_crop_for(bool(train.get("image_aug")), float(train.get("aug", {}).get("crop_area", 1.0)))


def main(cfg: DiagnoseConfig) -> dict:
    from prismatic.models import from_pretrained

    if cfg.init_states < 2:
        raise ValueError(f"init_states must be >= 2 (a spread needs two scenes), got {cfg.init_states}")
    if cfg.agreement_states < 0:
        raise ValueError(f"agreement_states must be >= 0, got {cfg.agreement_states}")
    model = from_pretrained(cfg.checkpoint).eval()
    crop = training_crop_area(cfg.checkpoint) if cfg.crop_area is None else cfg.crop_area
    env = make_env(cfg.suite, cfg.task_id, 0, image_size=cfg.image_size)
    shares = attention_shares(model, env.reset(), env.instruction, crop)
    sens = sensitivity(model, cfg.suite, cfg.task_id, cfg.init_states, cfg.image_size, crop)
    agree = (first_chunk_agreement(model, cfg.suite, cfg.agreement_states, cfg.image_size, crop)
             if cfg.agreement_states else {})
    print(f"{cfg.checkpoint} on {cfg.suite} task {cfg.task_id} ({env.instruction!r})")
    print("block | " + " | ".join(k for k in shares[0]))
    for i, row in enumerate(shares):
        print(f"{i} | " + " | ".join(f"{v:.3f}" for v in row.values()))
    for name, d in sens.items():
        print(f"{name}: first-chunk displacement spread, policy {d['policy']:.3f} vs scripted expert "
              f"{d['scripted_expert']:.3f} (action units summed over the chunk)")
    for axis, d in agree.items():
        print(f"first chunk vs scripted expert, {axis}: correlation {d['correlation']:.2f}, spread policy "
              f"{d['policy_spread']:.2f} vs expert {d['scripted_expert_spread']:.2f}")
    return {"attention": shares, "sensitivity": sens, "agreement": agree}


def cli() -> int:
    from prismatic.checkpoint import CheckpointError

    cfg = draccus.parse(DiagnoseConfig)
    try:
        main(cfg)
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        print(f"diagnose: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
