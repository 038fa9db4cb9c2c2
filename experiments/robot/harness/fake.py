"""A trivial LIBERO-shaped environment and a scripted policy, for tests and harness benchmarks.

Rule: the episode succeeds once the agent has sent `goal = goal_base + task_id` actions whose first component
is positive; no-op actions (first component 0) never count. Success is therefore hand-computable.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class FakeEnv:
    def __init__(self, suite: str, task_id: int, init_state_id: int, image_size: int = 8, goal_base: int = 3):
        self.suite, self.task_id, self.init_state_id = suite, task_id, init_state_id
        self.goal = goal_base + task_id
        self.image_size = image_size
        self.instruction = f"fake task {task_id} of {suite}"
        self.pushes = 0
        self.steps = 0
        self.closed = False

    def _obs(self) -> dict:
        s = self.image_size
        img = np.full((s, s, 3), (self.task_id * 10 + self.pushes) % 256, dtype=np.uint8)
        return {
            "agentview_image": img,
            "robot0_eye_in_hand_image": img.copy(),
            "robot0_eef_pos": np.array([self.pushes, self.init_state_id, self.task_id], dtype=np.float64),
            "robot0_eef_quat": np.array([0.0, 0.0, 0.0, 1.0]),
            "robot0_gripper_qpos": np.array([0.04, -0.04]),
        }

    def reset(self) -> dict:
        self.pushes = self.steps = 0
        return self._obs()

    def step(self, action):
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (7,):
            raise ValueError(f"FakeEnv.step expects a (7,) action, got {action.shape}")
        self.steps += 1
        if action[0] > 0:
            self.pushes += 1
        done = self.pushes >= self.goal
        return self._obs(), float(done), done, {}

    def close(self) -> None:
        self.closed = True


@dataclass
class FakeEnvFactory:
    image_size: int = 8
    goal_base: int = 3
    fail_task: int | None = None  # building this task's env raises (tests of error handling)
    hang_task: int | None = None  # building this task's env never returns (tests of the worker timeout)
    kill_task: int | None = None  # building this task's env kills its process (tests of a worker's death)

    def __call__(self, suite: str, task_id: int, init_state_id: int) -> FakeEnv:
        if task_id == self.fail_task:
            raise RuntimeError(f"fake env for task {task_id} is broken")
        if task_id == self.kill_task:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
        if task_id == self.hang_task:
            import time

            time.sleep(3600)
        return FakeEnv(suite, task_id, init_state_id, self.image_size, self.goal_base)


@dataclass
class ScriptedPolicy:
    """Pushes (+1) on tasks whose id is in `solves`, pulls (-1) elsewhere; routes to the episode's suite."""

    solves: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9)
    chunk_len: int = 8
    route: bool = False

    def __post_init__(self):
        self.started: list[str] = []
        self.act_batches: list[int] = []

    def start_episodes(self, first_obs, instructions):
        self.started += list(instructions)
        if not self.route:
            return [{} for _ in first_obs]
        return [{"routed_expert": ins.split(" of ")[-1], "route_scores": {"a": 1.0}} for ins in instructions]

    def act(self, obs, instructions, episode_ids):
        self.act_batches.append(len(obs))
        out = np.zeros((len(obs), self.chunk_len, 7), dtype=np.float32)
        for i, o in enumerate(obs):
            out[i, :, 0] = 1.0 if int(o["robot0_eef_pos"][2]) in self.solves else -1.0
        out[..., 6] = -1.0
        return out
