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
  correlation near 0 where an axis set by the scene alone is near 1;
- grasps: closed-loop rollouts (chunks executed open-loop, as the harness does) of every task whose first goal
  is a pick-and-place, over `grasp_states` init states: where the gripper is when it is first told to close on
  nothing held, how far that is from the object the instruction names, and whether that object is the nearest
  movable one. A policy that localises the right object but misses it shows a small distance and "nearest is
  the named object" near 1; one that cannot tell the objects apart shows "nearest" near chance (1 / objects);
- training fit: on the checkpoint's own training demos, per episode step 0..`fit_steps`-1, the error of the
  predicted chunk's position actions (normalised) against the variance of the demos' chunks *within* each
  task, and R² = 1 - error / variance. R² near 0 on the first steps means the model plays each task's mean
  opening move: it has not learned, even on the scenes it was trained on, where the scene puts the target.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from experiments.robot.policy import CenterCrop, VLAPolicy
from experiments.robot.tabletop import get_suite, make_env
from experiments.robot.tabletop.expert import ScriptedExpert
from experiments.robot.tabletop.physics import GRASP_TOL
from experiments.robot.tabletop.suites import NUM_INIT_STATES
from prismatic.cli import run_cli


@dataclass
class DiagnoseConfig:
    checkpoint: Path = Path("runs/demo/train/mergevla/goal/checkpoints/step_001500")  # a fine-tuned checkpoint
    suite: str = "goal"  # the TableTop-4 suite the checkpoint was trained on
    task_id: int = 0  # whose observation the instructions are swapped on, and whose scenes are swapped
    init_states: int = 8  # scenes (init states 0..n-1) for the scene swap
    image_size: int = 64  # camera frame side in pixels (the data's)
    crop_area: Optional[float] = None  # centre crop shown to the model (None: its training crop area, 1 without aug)
    agreement_states: int = 4  # init states per task for the per-axis agreement (0: skip it)
    grasp_states: int = 2  # init states per pick-and-place task for the first-grasp rollouts (0: skip them)
    fit_steps: int = 6  # episode steps 0..n-1 scored on the training demos (0: skip)
    data_root: Optional[Path] = None  # the demos for the training fit (None: the checkpoint's training data_root)


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


def first_grasp(env, policy, instruction: str) -> dict:
    """Roll `policy` out in `env` until it first commands the fingers closed with nothing held (or the episode
    ends); the tip's position then, against the bodies as they are at that moment."""
    obs, goal, done = env.reset(), env.state.goals[0], False
    while not done and env.steps < env.max_steps:
        for a in policy.act([obs], [instruction], [0])[0]:
            s = env.state
            if a[6] > 0 and not s.held:
                movable = [b for b in s.bodies if b.spec.movable]
                dist = {b.name: float(np.hypot(*(b.pos[:2] - s.gripper_pos[:2]))) for b in movable}
                return {"closed": True, "distance_to_named": dist[goal.obj],
                        "nearest_is_named": min(dist, key=dist.get) == goal.obj, "objects": len(movable)}
            obs, _, done, _ = env.step(a)
            if done or env.steps >= env.max_steps:
                break
    return {"closed": False}


def grasp_report(policy, suite: str, init_states: int, image_size: int = 64) -> dict:
    """`first_grasp` over the suite's pick-and-place tasks × init states, with a summary."""
    rows = []
    for t, task in enumerate(get_suite(suite)):
        for i in range(init_states):
            env = make_env(suite, t, i, image_size=image_size)
            if env.state.goals[0].verb != "place":
                continue
            rows.append({"task_id": t, "init_state": i, **first_grasp(env, policy, task.instruction)})
    closed = [r for r in rows if r["closed"]]
    summary = {"episodes": len(rows), "closed": len(closed)}
    if closed:
        summary.update({
            "nearest_is_named": float(np.mean([r["nearest_is_named"] for r in closed])),
            "chance": float(np.mean([1.0 / r["objects"] for r in closed])),
            "median_distance_m": float(np.median([r["distance_to_named"] for r in closed])),
            "within_grasp_tol": float(np.mean([r["distance_to_named"] <= GRASP_TOL for r in closed])),
        })
    return {"summary": summary, "episodes": rows}


def training_fit(predict, ds, norm_stats: dict, fit_steps: int, batch_size: int = 64) -> list[dict]:
    """Per episode step k < fit_steps of `ds`: mean squared error of `predict(batch)` (normalised (B, T, 7)
    chunks) on the position actions, the within-task variance of the demos' chunks there, and R²."""
    from prismatic.vla.normalization import normalize

    rows = []
    for k in range(fit_steps):
        idx = np.flatnonzero(ds.step_of == k)
        if not len(idx):
            break
        preds, targets, tasks = [], [], []
        for start in range(0, len(idx), batch_size):
            raw = ds.get_batch(idx[start:start + batch_size])
            preds.append(np.asarray(predict(raw))[:, :, :3])
            targets.append(normalize(raw["actions"], norm_stats["action"])[:, :, :3])
            tasks += raw["instructions"]
        pred, target, tasks = np.concatenate(preds), np.concatenate(targets), np.array(tasks)
        dev = np.concatenate([target[tasks == t] - target[tasks == t].mean(0) for t in np.unique(tasks)])
        mse, var = float(((pred - target) ** 2).mean()), float((dev ** 2).mean())
        rows.append({"step": k, "samples": len(idx), "mse": mse, "within_task_var": var,
                     "r2": 1.0 - mse / var if var > 0 else float("nan")})
    return rows


def vla_predict(model, crop_area: float = 1.0):
    """A dataset batch → the model's normalised chunks (what `training_fit` scores)."""
    policy = VLAPolicy(model, CenterCrop(crop_area))
    return lambda raw: policy.normalised_chunks(raw["images"], raw["proprio"], raw["instructions"])


def train_config_of(checkpoint: Path) -> dict:
    """The training config stored in a checkpoint's manifest ({} for one saved without it)."""
    from prismatic.checkpoint import CHECKPOINT_KIND, read_manifest

    return read_manifest(checkpoint, CHECKPOINT_KIND).get("train_config") or {}


def training_crop_area(checkpoint: Path) -> float:
    """The centre-crop area a checkpoint saw in training: its random-crop area with image_aug, else 1."""
    from prismatic.vla.augmentation import trained_crop_area

    area = trained_crop_area(train_config_of(checkpoint))
    return 1.0 if area is None else area


def main(cfg: DiagnoseConfig) -> dict:
    from prismatic.models import from_pretrained

    if not 2 <= cfg.init_states <= NUM_INIT_STATES:
        raise ValueError(f"init_states must be in 2..{NUM_INIT_STATES} (a spread needs two scenes; each task has "
                         f"{NUM_INIT_STATES} init states), got {cfg.init_states}")
    for name in ("agreement_states", "grasp_states"):
        if not 0 <= getattr(cfg, name) <= NUM_INIT_STATES:
            raise ValueError(f"{name} must be in 0..{NUM_INIT_STATES}, got {getattr(cfg, name)}")
    if cfg.fit_steps < 0:
        raise ValueError(f"fit_steps must be >= 0, got {cfg.fit_steps}")
    model = from_pretrained(cfg.checkpoint).eval()
    crop = training_crop_area(cfg.checkpoint) if cfg.crop_area is None else cfg.crop_area
    env = make_env(cfg.suite, cfg.task_id, 0, image_size=cfg.image_size)
    shares = attention_shares(model, env.reset(), env.instruction, crop)
    sens = sensitivity(model, cfg.suite, cfg.task_id, cfg.init_states, cfg.image_size, crop)
    agree = (first_chunk_agreement(model, cfg.suite, cfg.agreement_states, cfg.image_size, crop)
             if cfg.agreement_states else {})
    grasps = (grasp_report(VLAPolicy(model, CenterCrop(crop)), cfg.suite, cfg.grasp_states, cfg.image_size)
              if cfg.grasp_states else {})
    fit = training_fit_of(model, cfg, crop) if cfg.fit_steps else []
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
    g = grasps.get("summary", {})
    if g.get("closed"):
        print(f"first grasp ({g['closed']} of {g['episodes']} pick-and-place episodes closed the fingers): nearest "
              f"object is the named one {g['nearest_is_named']:.0%} (chance {g['chance']:.0%}), median distance to "
              f"it {100 * g['median_distance_m']:.1f} cm, within grasp tolerance {g['within_grasp_tol']:.0%}")
    elif grasps:
        print(f"first grasp: none of {g['episodes']} pick-and-place episodes closed the fingers")
    for r in fit:
        print(f"training fit, episode step {r['step']} ({r['samples']} demos): chunk error {r['mse']:.3f} vs "
              f"within-task variance {r['within_task_var']:.3f}, R² {r['r2']:.2f}")
    return {"attention": shares, "sensitivity": sens, "agreement": agree, "grasps": grasps, "training_fit": fit}


def training_fit_of(model, cfg: DiagnoseConfig, crop: float) -> list[dict]:
    """`training_fit` on the demos the checkpoint was trained on (or those under cfg.data_root)."""
    from prismatic.vla.datasets import load_suite

    train = train_config_of(cfg.checkpoint)
    root = cfg.data_root if cfg.data_root is not None else train.get("data_root")
    if root is None:
        raise ValueError(f"{cfg.checkpoint}: its manifest names no training data_root; pass --data_root")
    ds = load_suite(Path(root), train.get("suite") or cfg.suite, chunk_len=model.config.chunk_len)
    return training_fit(vla_predict(model, crop), ds, model.norm_stats, cfg.fit_steps)


def cli() -> int:
    from prismatic.checkpoint import CheckpointError
    from prismatic.vla.datasets import DatasetError

    return run_cli("diagnose", DiagnoseConfig, main, (ValueError, FileNotFoundError, CheckpointError, DatasetError))


if __name__ == "__main__":
    sys.exit(cli())
