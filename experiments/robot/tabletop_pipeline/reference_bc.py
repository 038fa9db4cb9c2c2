"""Can the demonstrations be learned at all? A plain visuomotor reference, no VLM, no language.

    python -m experiments.robot.tabletop_pipeline.reference_bc --suites '[goal,spatial]' --steps 1500

Per suite, a small CNN over both cameras (flattened feature map) plus the task's index (an embedding, so the
instruction never has to be read) and the proprio state regresses the 8-step action chunk with MSE on the same
demos, batch size and cosine learning-rate schedule as a demo expert (by default without the expert's 20-step
warm-up and gradient clipping, as every figure in docs/TABLETOP4_FINDINGS.md was measured: `--warmup_steps 20
--max_grad_norm 1.0` adds them), then is rolled out by the evaluation harness on the same episodes (no settling
steps, as the demo). It tells a benchmark that cannot be learned from its demos apart from a VLA that learns
them slowly (it trains at ~30 steps/s on one core, the `tiny` VLA at ~7). Writes <out_dir>/<suite>.jsonl (one
row per episode; a rerun with the same settings skips finished episodes) and <out_dir>/summary.json.
`--head action_expert` swaps the MLP for the VLA's own action expert over the same conv features, which tells
a head that cannot read the features apart from features that lack what the task needs.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from experiments.robot.tabletop.suites import SUITE_NAMES, check_trial_range, get_suite
from prismatic.cli import check_finite, run_cli


class ReferenceBCError(ValueError):
    pass


@dataclass
class ReferenceBCConfig:
    data_root: Path = Path("runs/demo/tabletop4")  # the demos `make demo` writes (or `tabletop.generate`)
    suites: list[str] = field(default_factory=lambda: list(SUITE_NAMES))  # a reference per suite, trained and rolled out
    steps: int = 1500  # optimizer steps per suite (the demo expert's default)
    batch_size: int = 8  # samples per optimizer step (the demo's experts: 8)
    lr: float = 1e-3  # cosine from lr to lr × min_lr_ratio, as the demo's experts
    min_lr_ratio: float = 0.1  # the cosine ends at lr × this (the demo's experts: 0.1)
    warmup_steps: int = 0  # linear warm-up before the cosine (the demo's experts: 20)
    max_grad_norm: float = 0.0  # gradient-norm clip; 0 = none (the demo's experts: 1.0)
    weight_decay: float = 0.01  # AdamW's decoupled weight decay
    seed: int = 0  # the reference's init, data order and rollouts
    trials_per_task: int = 4  # episodes per task, init states first_init_state.. (the demo's)
    first_init_state: int = 0  # trial k starts from init state first_init_state + k
    num_envs: int = 16  # concurrent episodes (the policy's batch)
    out_dir: Path = Path("runs/reference_bc")  # <suite>.jsonl per episode (resumable) and summary.json
    overwrite: bool = False  # replace a <suite>.jsonl holding episodes of other settings or demos
    cpu_threads: int = 1  # torch threads (≥ 1)
    head: str = "flatten"  # flatten (an MLP) | action_expert (the tiny VLA's action expert over the same features)

    def validate(self) -> None:
        unknown = [s for s in self.suites if s not in SUITE_NAMES]
        if not self.suites or unknown:
            raise ReferenceBCError(f"suites is {self.suites}, expected a non-empty subset of {list(SUITE_NAMES)}")
        for name in ("steps", "batch_size", "trials_per_task", "num_envs", "cpu_threads"):
            if getattr(self, name) < 1:
                raise ReferenceBCError(f"{name} is {getattr(self, name)}, expected a positive integer")
        check_head(self.head)
        check_finite(self, ("lr", "min_lr_ratio", "max_grad_norm", "weight_decay"), ReferenceBCError)
        check_trial_range(self.first_init_state, self.trials_per_task, ReferenceBCError)
        if self.seed < 0:
            raise ReferenceBCError(f"seed is {self.seed}, expected >= 0")
        if self.lr <= 0 or self.weight_decay < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ReferenceBCError("need lr > 0, weight_decay >= 0 and min_lr_ratio in [0, 1]")
        if not 0 <= self.warmup_steps < self.steps or self.max_grad_norm < 0:
            raise ReferenceBCError(f"need 0 <= warmup_steps < steps and max_grad_norm >= 0, got {self.warmup_steps}, "
                                   f"{self.steps} and {self.max_grad_norm}")


HEADS = ("flatten", "action_expert")


def check_head(head: str) -> None:
    if head not in HEADS:
        raise ReferenceBCError(f"head is {head!r}, expected one of {list(HEADS)}")


class TaskConditionedCNN(nn.Module):
    """Both cameras through one small conv net (stride 8), a task embedding and the proprio, then a head.

    head "flatten": one MLP over the flattened feature maps, task embedding and proprio. head "action_expert":
    the `tiny` VLA's cross-attention-only action expert (modeling.ActionExpert), every block reading the conv
    features as its vision tokens (with a learned position embedding), 16 learned tokens of the task as its
    action-query states and the proprio token, as in the VLA; it tells the head apart from what feeds it.
    """

    def __init__(self, num_tasks: int, image_size: int = 64, chunk_len: int = 8, action_dim: int = 7,
                 proprio_dim: int = 8, num_cameras: int = 2, head: str = "flatten"):
        super().__init__()
        check_head(head)
        self.chunk_len, self.action_dim, self.image_size, self.head_kind = chunk_len, action_dim, image_size, head
        self.encoder = nn.Sequential(
            nn.Conv2d(3, 32, 3, 2, 1), nn.ReLU(), nn.Conv2d(32, 64, 3, 2, 1), nn.ReLU(),
            nn.Conv2d(64, 64, 3, 2, 1), nn.ReLU(), nn.Conv2d(64, 32, 3, 1, 1),
        )
        tokens = num_cameras * math.ceil(image_size / 8) ** 2
        if head == "flatten":
            self.task = nn.Embedding(num_tasks, 64)
            self.head = nn.Sequential(nn.Linear(tokens * 32 + 64 + proprio_dim, 512), nn.ReLU(), nn.Linear(512, 512),
                                      nn.ReLU(), nn.Linear(512, chunk_len * action_dim))
            return
        from prismatic.models import get_config
        from prismatic.models.modeling import ActionExpert

        vla = get_config("tiny")
        if (vla.chunk_len, vla.action_dim, vla.proprio_dim) != (chunk_len, action_dim, proprio_dim):
            raise ReferenceBCError("head action_expert needs the tiny VLA's chunk_len, action_dim and proprio_dim")
        d, self.num_queries, self.num_layers = vla.llm.hidden_size, vla.num_action_queries, vla.llm.num_layers
        self.task = nn.Embedding(num_tasks, self.num_queries * d)
        self.to_token = nn.Linear(32, d)
        self.position = nn.Parameter(0.02 * torch.randn(tokens, d))
        self.proprio_proj = nn.Sequential(nn.Linear(proprio_dim, d), nn.GELU(), nn.Linear(d, d))
        self.head = ActionExpert(vla)

    def forward(self, images: torch.Tensor, task: torch.Tensor, proprio: torch.Tensor) -> torch.Tensor:
        """images (B, cameras, H, W, 3) uint8, task (B,) long, proprio (B, 8) normalised → (B, chunk, 7)."""
        b = images.shape[0]
        x = images.float().div(255.0).permute(0, 1, 4, 2, 3).flatten(0, 1)
        f = self.encoder(x)  # (B·cameras, 32, h, w)
        if self.head_kind == "flatten":
            out = self.head(torch.cat([f.reshape(b, -1), self.task(task), proprio], -1))
            return out.view(b, self.chunk_len, self.action_dim)
        vis = self.to_token(f.flatten(2).transpose(1, 2).reshape(b, -1, f.shape[1])) + self.position
        act = self.task(task).view(b, self.num_queries, -1)
        layers = self.num_layers + 1  # the expert reads layers 1..L of per-layer lists
        return self.head([act] * layers, [vis] * layers, self.proprio_proj(proprio).unsqueeze(1))


def task_index(suite: str) -> dict[str, int]:
    return {t.instruction: i for i, t in enumerate(get_suite(suite))}


def train_reference(ds, suite: str, cfg: ReferenceBCConfig, log=print) -> TaskConditionedCNN:
    """Fit the reference on one suite's dataset (a VLADataset with norm_stats); deterministic given cfg.seed."""
    from prismatic.training.schedule import lr_at
    from prismatic.vla.normalization import normalize

    index = task_index(suite)
    unknown = sorted({i for i in ds.instructions if i not in index})
    if unknown:
        raise ReferenceBCError(f"{cfg.data_root}/{suite}: instructions not in the {suite} suite: {unknown[:3]}")
    stats = ds.norm_stats
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    image_size = ds.get_batch([0])["images"].shape[2]
    model = TaskConditionedCNN(len(index), image_size, head=cfg.head)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.train()
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.lr, cfg.steps, "cosine", cfg.warmup_steps, cfg.min_lr_ratio)
        raw = ds.get_batch(rng.integers(0, len(ds), cfg.batch_size))
        task = torch.tensor([index[i] for i in raw["instructions"]])
        proprio = torch.as_tensor(normalize(raw["proprio"], stats["proprio"]), dtype=torch.float32)
        target = torch.as_tensor(normalize(raw["actions"], stats["action"]), dtype=torch.float32)
        loss = F.mse_loss(model(torch.as_tensor(raw["images"]), task, proprio), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        opt.step()
        if (step + 1) % 500 == 0 or step + 1 == cfg.steps:
            log(f"[reference] {suite} step {step + 1}/{cfg.steps} loss {loss.item():.4f}")
    return model.eval()


@dataclass
class ReferencePolicy:
    """The harness's policy interface over a trained reference: the task index looked up from the instruction."""

    model: TaskConditionedCNN
    suite: str
    norm_stats: dict

    def __post_init__(self):
        self.index = task_index(self.suite)

    def start_episodes(self, first_obs, instructions):
        return [{} for _ in first_obs]

    @torch.no_grad()
    def act(self, obs, instructions, episode_ids):
        from experiments.robot.policy import camera_images, raw_proprio, to_env_actions
        from prismatic.vla.normalization import normalize

        images = torch.as_tensor(np.stack([camera_images(o) for o in obs]))
        proprio = torch.as_tensor(np.stack([normalize(raw_proprio(o), self.norm_stats["proprio"]) for o in obs]),
                                  dtype=torch.float32)
        pred = self.model(images, torch.tensor([self.index[i] for i in instructions]), proprio)
        return to_env_actions(pred.numpy(), self.norm_stats["action"])


def main(cfg: ReferenceBCConfig, log=print) -> dict:
    from experiments.robot.harness import Protocol, read_rows, run_episodes
    from experiments.robot.tabletop_pipeline.evaluation import TableTopEnvFactory, plan, results_of
    from prismatic.io import check_output_dir, write_json
    from prismatic.vla.datasets import load_suite

    cfg.validate()
    check_output_dir(cfg.out_dir, "--out_dir")  # before any training, not after it
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.cpu_threads)
    summary = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}, "suites": {}}
    try:
        for suite in cfg.suites:
            ds = load_suite(cfg.data_root, suite)
            # rows of another config or other demos are refused (replaced with --overwrite), never mixed in; how
            # many episodes run, in how many envs and where the files go do not change the policy (the threads
            # do: float summation order)
            trained_by = {k: v for k, v in summary["config"].items()
                          if k not in ("num_envs", "out_dir", "trials_per_task", "overwrite")}
            policy_id = hashlib.sha256(json.dumps([trained_by, suite, ds.fingerprint], sort_keys=True)
                                       .encode()).hexdigest()[:16]
            # only the tasks the demos cover: a task the reference never saw would only dilute its score
            trained_tasks = sorted({task_index(suite)[i] for i in ds.instructions})
            episodes = plan([suite], trained_tasks, cfg.trials_per_task, cfg.first_init_state)
            path = Path(cfg.out_dir) / f"{suite}.jsonl"
            rows = read_rows(path) if path.exists() else []
            if not cfg.overwrite and any(r.get("policy_id") != policy_id for r in rows):
                raise ReferenceBCError(
                    f"{path} holds {len(rows)} episode(s) of other settings or demos (policy "
                    f"{rows[0].get('policy_id')}, this run {policy_id}): pass --overwrite true to replace them, "
                    "or choose another --out_dir")
            path = results_of(path, policy_id, log)
            done = {r["key"]: r for r in read_rows(path)} if path.exists() else {}
            if all(e.key in done for e in episodes):  # a rerun with nothing left to roll out: nothing to train
                rows = [done[e.key] for e in episodes]
            else:
                model = train_reference(ds, suite, cfg, log)
                rows = run_episodes(TableTopEnvFactory(model.image_size), ReferencePolicy(model, suite, ds.norm_stats),
                                    episodes, path, num_envs=cfg.num_envs, seed=cfg.seed, log=lambda _m: None,
                                    protocol=Protocol(num_noop_steps=0),  # the demo's: TableTop needs no settling
                                    run_info={"method": "reference CNN BC", "policy_id": policy_id})
            wins = sum(bool(r["success"]) for r in rows)
            summary["suites"][suite] = {"success": wins / len(rows), "episodes": len(rows), "results": str(path)}
            log(f"[reference] {suite}: {wins}/{len(rows)} episodes solved")
    finally:
        torch.set_num_threads(threads)
    write_json(Path(cfg.out_dir) / "summary.json", summary)
    return summary


def cli() -> int:
    from experiments.robot.harness import ResultsError
    from prismatic.vla.datasets import DatasetError

    return run_cli("reference_bc", ReferenceBCConfig, main,
                   (ReferenceBCError, DatasetError, ResultsError, FileNotFoundError))


if __name__ == "__main__":
    sys.exit(cli())
