"""`make demo`: the whole MergeVLA pipeline on TableTop-4 with defaults, ending in the results table.

    python -m experiments.robot.demo                       # full demo (target: ≤ 20 min on 2 CPU cores)
    python -m experiments.robot.demo --quick true          # quick mode (fewer tasks, steps, episodes; ≤ 5 min)
    python -m experiments.robot.demo --train.expert_steps 1000 --eval.trials_per_task 5 --out_dir runs/demo-long

Stages (experiments/robot/tabletop_pipeline): generate TableTop-4 demonstrations → load the shipped pretrained
tiny base (pretrained_models/tabletop4-tiny-base) → fine-tune 4 MergeVLA experts, 4 self-attention baseline
experts and a joint multi-task model (same seed, same base) → merge (TA, TIES, TSV, KnOTS, WUDI, EMR with task
masks + router; TA, TIES, EMR with masks and the whole action pathway kept per task, routed by the exemplar
router; naive TA of the baseline experts without masks) → roll out every row with the harness →
print the table, routing accuracy per suite, the router-subspace ablation and the wall time. Each stage is
cached in `out_dir`: running again reuses what exists and matches its settings.

Size knobs left unset (None) take the mode's preset (FULL or QUICK below); every other knob has one default.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from experiments.robot.harness import ResultsError
from experiments.robot.tabletop.demos import DemoFailure
from experiments.robot.tabletop_pipeline.pipeline import (
    DEFAULT_BASE_DIR,
    DEMO_ALGORITHMS,
    PER_TASK_ALGORITHMS,
    SUITES,
    PipelineConfig,
    PipelineError,
    run_pipeline,
)
from model_merging.errors import MergeError
from prismatic.cli import run_cli

# bad input or a run that cannot go on: one line, exit 2
DEMO_USER_ERRORS = (PipelineError, MergeError, DemoFailure, ResultsError)

# Presets of the size knobs. Sized from measured throughput on 2 CPU cores (see the README's demo section).
FULL = {"task_ids": None, "demos_per_task": 50, "expert_steps": 1500, "joint_steps": 3000, "trials_per_task": 4}
QUICK = {"task_ids": [0, 1], "demos_per_task": 6, "expert_steps": 60, "joint_steps": 80, "trials_per_task": 2}


@dataclass
class DataKnobs:
    task_ids: Optional[list[int]] = None  # tasks per suite (preset: full all 10, quick [0, 1])
    demos_per_task: Optional[int] = None  # scripted demos per task (preset: full 50, quick 6)
    demo_noise: float = 0.1  # scripted expert's action noise
    # dataset directory (default <out_dir>/tabletop4); reused when it matches, never replaced when you name it
    data_dir: Optional[Path] = None


@dataclass
class TrainKnobs:
    expert_steps: Optional[int] = None  # optimizer steps per expert (preset: full 1500, quick 60)
    joint_steps: Optional[int] = None  # steps of the joint multi-task model (preset: full 3000, quick 80)
    batch_size: int = 8  # samples per optimizer step
    lr: float = 1e-3  # goal expert, MSE, 1200 steps: 12/40 episodes; 5e-4: 10/40; 2e-3: 3/40
    lr_schedule: str = "cosine"  # constant | cosine | linear
    warmup_steps: int = 20  # optimizer steps over which the lr rises linearly to lr
    min_lr_ratio: float = 0.1  # cosine/linear decay ends at lr × this
    weight_decay: float = 0.01  # AdamW's decoupled weight decay
    max_grad_norm: float = 1.0  # gradient clipping (0: none)
    image_aug: bool = False  # random crops cost the experts precision at this budget (docs/TABLETOP4_FINDINGS.md)
    action_loss: str = "mse"  # mse | l1 (as published; learns far slower at this budget: docs/TABLETOP4_FINDINGS.md)
    joint: bool = True  # train and evaluate the joint multi-task model


@dataclass
class MergeKnobs:
    algorithms: list[str] = field(default_factory=lambda: list(DEMO_ALGORITHMS))  # MergeVLA + masks + router
    unmasked_algorithms: list[str] = field(default_factory=list)  # MergeVLA without masks
    # MergeVLA + masks, every from-scratch part kept per task (only the VLM merged), routed by the exemplar router
    per_task_algorithms: list[str] = field(default_factory=lambda: list(PER_TASK_ALGORITHMS))
    # exemplar router (beyond the paper): first frames of each expert's demos per task; 0: none (the per-task rows
    # then get the task given)
    router_exemplars: int = 50
    baseline_algorithms: list[str] = field(default_factory=lambda: ["task_arithmetic"])  # naive, no masks
    mask_lambda: float = 0.6  # TALL mask λ
    k_gate: int = 8  # router subspace size
    expert_head_layers: int = 1  # L_h: action-expert blocks kept per task
    baseline_head_layers: int = 0  # naive baseline merge shares every parameter


@dataclass
class EvalKnobs:
    trials_per_task: Optional[int] = None  # episodes per task (preset: full 4, quick 2)
    first_init_state: int = 0  # trial k of a task starts from its init state first_init_state + k
    num_envs: int = 16  # concurrent episodes (the policy's batch)
    noop_steps: int = 0  # still steps before the policy acts (TableTop-4 needs none)
    router_variant: str = "value"  # "+ router" rows: value | key | key_value | value_update subspaces, or exemplar
    baseline_experts: bool = True  # roll out the baseline experts themselves too
    blind_replay: bool = True  # the reference row: each task's first demo replayed open-loop, observations ignored
    # MP4s of chosen episodes of every row (<out_dir>/eval/videos/<row>/): globs over suite/task_id/trial keys
    video_episodes: list[str] = field(default_factory=list)  # e.g. '["goal/*/0", "object/3/*"]'
    plots: bool = True  # PNG plots: success per method and suite, routing confusion matrices


@dataclass
class DemoConfig:
    quick: bool = False  # quick mode: QUICK presets (CI)
    seed: int = 0  # seed of the demos, the experts' init and data order, the merges and the rollouts
    out_dir: Optional[Path] = None  # default runs/demo (quick: runs/demo-quick)
    workers: int = 2  # processes (training, merging and rollouts run in parallel)
    base_dir: Path = DEFAULT_BASE_DIR  # pretrained tiny base
    suites: list[str] = field(default_factory=lambda: list(SUITES))  # TableTop-4 suites to run
    data: DataKnobs = field(default_factory=DataKnobs)
    train: TrainKnobs = field(default_factory=TrainKnobs)
    merge: MergeKnobs = field(default_factory=MergeKnobs)
    eval: EvalKnobs = field(default_factory=EvalKnobs)

    def pipeline_config(self) -> PipelineConfig:
        preset = QUICK if self.quick else FULL

        def pick(value, key):
            return preset[key] if value is None else value

        return PipelineConfig(
            out_dir=self.out_dir or Path("runs/demo-quick" if self.quick else "runs/demo"),
            seed=self.seed, workers=self.workers, base_dir=self.base_dir, suites=list(self.suites),
            task_ids=pick(self.data.task_ids, "task_ids"), data_dir=self.data.data_dir,
            demos_per_task=pick(self.data.demos_per_task, "demos_per_task"), demo_noise=self.data.demo_noise,
            expert_steps=pick(self.train.expert_steps, "expert_steps"),
            joint_steps=pick(self.train.joint_steps, "joint_steps"), batch_size=self.train.batch_size,
            lr=self.train.lr, lr_schedule=self.train.lr_schedule, warmup_steps=self.train.warmup_steps,
            min_lr_ratio=self.train.min_lr_ratio, weight_decay=self.train.weight_decay,
            max_grad_norm=self.train.max_grad_norm, image_aug=self.train.image_aug,
            action_loss=self.train.action_loss, train_joint=self.train.joint,
            algorithms=list(self.merge.algorithms), unmasked_algorithms=list(self.merge.unmasked_algorithms),
            per_task_algorithms=list(self.merge.per_task_algorithms), router_exemplars=self.merge.router_exemplars,
            mask_lambda=self.merge.mask_lambda, k_gate=self.merge.k_gate,
            expert_head_layers=self.merge.expert_head_layers, baseline_algorithms=list(self.merge.baseline_algorithms),
            baseline_head_layers=self.merge.baseline_head_layers,
            trials_per_task=pick(self.eval.trials_per_task, "trials_per_task"),
            first_init_state=self.eval.first_init_state, num_envs=self.eval.num_envs, noop_steps=self.eval.noop_steps,
            router_variant=self.eval.router_variant, eval_baseline_experts=self.eval.baseline_experts,
            blind_replay=self.eval.blind_replay,
            video_episodes=list(self.eval.video_episodes), plots=self.eval.plots,
        )


def main(cfg: DemoConfig) -> dict:
    return run_pipeline(cfg.pipeline_config())


def cli() -> int:
    return run_cli("demo", DemoConfig, main, DEMO_USER_ERRORS)


if __name__ == "__main__":
    sys.exit(cli())
