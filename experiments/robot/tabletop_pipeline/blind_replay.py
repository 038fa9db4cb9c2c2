"""How much of each suite can be solved without looking? Replay a demonstration's actions open-loop.

    python -m experiments.robot.tabletop_pipeline.blind_replay --source_demos 5 --trials_per_task 20

For every task, each of its first `source_demos` demonstrations (the scripted expert with the demos' noise on
the demo scenes of `seed`, exactly the actions `tabletop.generate` records; rendering is skipped, it does not
change the dynamics) is replayed action by action, ignoring every observation, from the task's evaluation
init states `first_init_state`, … (the episodes the harness rolls out). An episode succeeds if the env reports
success before the replayed actions run out or the task's max_steps is reached. A policy that learned which
trajectory goes with which instruction, and nothing from its cameras, scores about this; what an expert solves
beyond it, it owes to what it sees. Prints a table (success % per suite and per task) and writes
<out_dir>/blind_replay.json. `ReplayPolicy` is the same reference as a harness policy (one demo per task, the
`make demo` table's "Blind replay" row).
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from experiments.robot.tabletop.demos import DemoFailure, first_successes, noise_rng
from experiments.robot.tabletop.env import TableTopEnv
from experiments.robot.tabletop.expert import ScriptedExpert
from experiments.robot.tabletop.suites import (
    SUITE_NAMES,
    check_trial_range,
    demo_scene,
    get_suite,
    get_task,
    init_state,
)
from prismatic.cli import run_cli


class BlindReplayError(ValueError):
    pass


@dataclass
class BlindReplayConfig:
    suites: list[str] = field(default_factory=lambda: list(SUITE_NAMES))  # TableTop-4 suites to replay
    source_demos: int = 5  # demonstrations replayed per task (its demos 0..source_demos-1); their mean is reported
    trials_per_task: int = 20  # evaluation init states per task, first_init_state..
    first_init_state: int = 0  # trial k starts from init state first_init_state + k
    seed: int = 0  # the demos' dataset seed (`make demo` uses the pipeline's seed, 0 by default)
    noise: float = 0.1  # the scripted expert's action noise in the demos
    out_dir: Path = Path("runs/blind_replay")  # where blind_replay.json is written

    def validate(self) -> None:
        unknown = [s for s in self.suites if s not in SUITE_NAMES]
        if not self.suites or unknown:
            raise BlindReplayError(f"suites is {self.suites}, expected a non-empty subset of {list(SUITE_NAMES)}")
        if self.source_demos < 1 or self.trials_per_task < 1:
            raise BlindReplayError("source_demos and trials_per_task must be positive integers")
        check_trial_range(self.first_init_state, self.trials_per_task, BlindReplayError)
        if self.seed < 0 or not 0 <= self.noise < math.inf:  # written so that NaN fails too
            raise BlindReplayError(f"seed and noise must be >= 0, got seed={self.seed}, noise={self.noise}")


def demo_actions(suite: str, task_id: int, index: int, seed: int = 0, noise: float = 0.1) -> np.ndarray | None:
    """The actions the scripted expert takes in demo scene `index` of dataset `seed` (the same noise stream as
    `demos.generate_task`), (T, 7); None when it does not succeed there (such scenes are skipped by the demos)."""
    task = get_task(suite, task_id)
    env = TableTopEnv(task, demo_scene(suite, task_id, seed, index), render=False)
    expert = ScriptedExpert(noise, noise_rng(suite, task_id, seed, index))
    env.reset()
    actions = []
    for _ in range(task.max_steps):
        actions.append(expert.act(env.state))
        if env.step(actions[-1])[2]:
            return np.stack(actions)
    return None


def replay(suite: str, task_id: int, init_state_id: int, actions: np.ndarray) -> bool:
    """Whether executing `actions` open-loop from that evaluation init state solves the task in time."""
    task = get_task(suite, task_id)
    env = TableTopEnv(task, init_state(suite, task_id, init_state_id), render=False)
    env.reset()
    return any(env.step(a)[2] for a in actions[: task.max_steps])


def source_trajectories(suite: str, task_id: int, count: int, seed: int, noise: float) -> list[np.ndarray]:
    """The first `count` successful demos of a task, in scene order (the scenes the dataset holds)."""
    try:
        found = first_successes(suite, task_id, count, lambda index: demo_actions(suite, task_id, index, seed, noise),
                                noise)
    except DemoFailure as e:
        raise BlindReplayError(str(e)) from e
    return [actions for _, actions in found]


class ReplayPolicy:
    """The harness's policy interface over blind replay: every episode of a task gets its first demo's actions, one
    chunk per call, whatever it observes; once they run out, it holds still (zero motion, the last gripper command).
    `open_loop_steps` is the protocol's actions executed per call: the next call goes on from there."""

    def __init__(self, suite: str, seed: int = 0, noise: float = 0.1, chunk_len: int = 8, open_loop_steps: int = 8):
        self.suite, self.seed, self.noise, self.chunk_len = suite, seed, noise, chunk_len
        self.advance = min(chunk_len, open_loop_steps)
        self.task_of = {t.instruction: t.task_id for t in get_suite(suite)}
        self.sources: dict[int, np.ndarray] = {}
        self.position: dict[int, tuple[int, int]] = {}  # episode id -> (task id, next action)

    def start_episodes(self, first_obs, instructions, episode_ids):
        for eid, instruction in zip(episode_ids, instructions):
            if instruction not in self.task_of:
                raise BlindReplayError(f"instruction {instruction!r} is not a task of the {self.suite} suite")
            task_id = self.task_of[instruction]
            if task_id not in self.sources:
                self.sources[task_id] = source_trajectories(self.suite, task_id, 1, self.seed, self.noise)[0]
            self.position[eid] = (task_id, 0)
        return [{} for _ in first_obs]

    def end_episodes(self, episode_ids):
        for eid in episode_ids:
            self.position.pop(eid, None)

    def act(self, obs, instructions, episode_ids):
        chunks = []
        for eid in episode_ids:
            task_id, start = self.position[eid]
            actions = self.sources[task_id]
            chunk = np.zeros((self.chunk_len, actions.shape[1]))
            chunk[:, -1] = actions[-1, -1]
            part = actions[start: start + self.chunk_len]
            chunk[: len(part)] = part
            self.position[eid] = (task_id, start + self.advance)
            chunks.append(chunk)
        return np.stack(chunks)


def main(cfg: BlindReplayConfig, log=print) -> dict:
    from prismatic.io import check_output_dir, write_json

    cfg.validate()
    check_output_dir(cfg.out_dir, "--out_dir")  # before the rollouts, not after them
    trials = range(cfg.first_init_state, cfg.first_init_state + cfg.trials_per_task)
    result = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}, "suites": {}}
    log("| suite | success % | per task |")
    log("|---|---:|---|")
    for suite in cfg.suites:
        per_task = []
        for task in get_suite(suite):
            sources = source_trajectories(suite, task.task_id, cfg.source_demos, cfg.seed, cfg.noise)
            wins = [replay(suite, task.task_id, k, acts) for acts in sources for k in trials]
            per_task.append(float(np.mean(wins)))
        mean = float(np.mean(per_task))
        result["suites"][suite] = {"success": mean, "per_task": per_task}
        log(f"| {suite} | {100 * mean:.1f} | {' '.join(f'{100 * p:.0f}' for p in per_task)} |")
    write_json(Path(cfg.out_dir) / "blind_replay.json", result)
    return result


def cli() -> int:
    return run_cli("blind_replay", BlindReplayConfig, main, (BlindReplayError,))


if __name__ == "__main__":
    sys.exit(cli())
