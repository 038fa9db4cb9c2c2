"""The LIBERO-shaped environment (docs/INTERFACES.md "Environments").

    env = make_env("spatial", task_id=0, init_state_id=3)
    obs = env.reset()
    obs, reward, done, info = env.step(action)   # action (7,): dxyz in [-1, 1], 3 ignored, gripper -1/+1

Stepping is deterministic: the same initial state and actions give the same observations. `done` is
success; the environment does not stop at `max_steps` (the harness does, as with LIBERO) but reports
`info["timeout"]` once it is reached.
"""

from __future__ import annotations

import numpy as np

from experiments.robot.tabletop.bodies import SceneState
from experiments.robot.tabletop.physics import goal_done, step_physics, success
from experiments.robot.tabletop.render import AgentView, WristView
from experiments.robot.tabletop.suites import TaskSpec, get_task, init_state

# gripper pointing straight down: 180° about x, (x, y, z, w); its axis-angle is (π, 0, 0)
EEF_QUAT = np.array([1.0, 0.0, 0.0, 0.0])
EEF_AXIS_ANGLE = np.array([np.pi, 0.0, 0.0])


class TableTopEnv:
    def __init__(self, task: TaskSpec, init: SceneState, image_size: int = 64, supersample: int = 2,
                 render: bool = True):
        if image_size < 8:
            raise ValueError(f"image_size must be at least 8 pixels, got {image_size}")
        if supersample < 1:
            raise ValueError(f"supersample must be >= 1, got {supersample}")
        self.task = task
        self.image_size = image_size
        self.supersample = supersample
        self.render_images = render
        self._agentview = AgentView(image_size)
        self._wrist = WristView(image_size)
        self._init = init.copy()
        self.state = init.copy()
        self.steps = 0

    @property
    def language_instruction(self) -> str:
        return self.task.instruction

    instruction = language_instruction

    @property
    def max_steps(self) -> int:
        return self.task.max_steps

    def seed(self, seed: int) -> None:
        """LIBERO compatibility; TableTop-4 has no randomness after the initial state."""

    def reset(self) -> dict:
        self.state = self._init.copy()
        self.steps = 0
        return self.observe()

    def set_init_state(self, state: SceneState) -> dict:
        """Use `state` as the initial state from now on and reset to it (like LIBERO's set_init_state)."""
        if not isinstance(state, SceneState):
            raise TypeError(f"set_init_state expects a SceneState, got {type(state).__name__}")
        self._init = state.copy()
        return self.reset()

    @property
    def init_state(self) -> SceneState:
        return self._init.copy()

    def get_state(self) -> SceneState:
        return self.state.copy()

    def observe(self) -> dict:
        s = self.state
        obs = {
            "robot0_eef_pos": s.gripper_pos.copy(),
            "robot0_eef_quat": EEF_QUAT.copy(),
            "robot0_gripper_qpos": np.array([s.finger, -s.finger]),
        }
        if self.render_images:
            obs["agentview_image"] = self._agentview.render(s, self.supersample)
            obs["robot0_eye_in_hand_image"] = self._wrist.render(s, self.supersample)
        return obs

    def step(self, action) -> tuple[dict, float, bool, dict]:
        a = np.asarray(action, dtype=np.float64)
        if a.shape != (7,):
            raise ValueError(f"action must have shape (7,) (dx, dy, dz, 3 rotations, gripper), got {a.shape}")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"action must be finite, got {a.tolist()}")
        step_physics(self.state, a)
        self.steps += 1
        done = success(self.state)
        info = {
            "success": done,
            "steps": self.steps,
            "timeout": self.steps >= self.max_steps,
            "subgoals": [goal_done(self.state, g.verb, g.obj, g.target) for g in self.state.goals],
        }
        return self.observe(), float(done), done, info

    def close(self) -> None:
        """Nothing to release; here for LIBERO compatibility."""


def make_env(suite: str, task_id: int, init_state_id: int = 0, image_size: int = 64, supersample: int = 2,
             render: bool = True) -> TableTopEnv:
    """Environment for one task at its `init_state_id`-th fixed initial state; call `reset()` for obs."""
    return TableTopEnv(get_task(suite, task_id), init_state(suite, task_id, init_state_id), image_size,
                       supersample, render)
