"""The environment side of an episode: build, no-ops, open-loop chunks, frames.

The same `EpisodeDriver` runs in the main process (`num_workers=0`) or inside a worker process, so both paths
execute exactly the same protocol. Only observations and small dicts cross a process boundary; a whole chunk
is executed per round trip.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from experiments.robot.harness.episodes import EpisodeSpec
from experiments.robot.harness.video import video_name, write_mp4

EnvFactory = Callable[[str, int, int], object]  # (suite, task_id, init_state_id) -> env
FrameFn = Callable[[dict], np.ndarray]  # obs -> (H, W, 3) uint8 video frame


@dataclass(frozen=True)
class Protocol:
    """Knobs of the rollout loop (docs/DESIGN.md §5 defaults)."""

    num_noop_steps: int = 10  # objects settle while the robot sends `noop_action`
    noop_action: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0)  # gripper open (-1)
    num_open_loop_steps: int = 8  # actions of each predicted chunk executed before the next query
    video_fps: int = 30


def agentview_frame(obs: dict) -> np.ndarray:
    return obs["agentview_image"]


def env_instruction(env, spec: EpisodeSpec) -> str:
    if spec.instruction is not None:
        return spec.instruction
    for attr in ("instruction", "language_instruction"):
        text = getattr(env, attr, None)
        if isinstance(text, str) and text:
            return text
    raise TypeError(
        f"env for {spec.key} ({type(env).__name__}) has no `instruction` string attribute and the episode spec "
        "gives none; an env factory must return envs with `.instruction`"
    )


class EpisodeDriver:
    """Drives one env slot through successive episodes."""

    def __init__(self, env_factory: EnvFactory, protocol: Protocol, video_dir: Path | None = None,
                 frame_fn: FrameFn | None = None):
        self.env_factory = env_factory
        self.protocol = protocol
        self.video_dir = Path(video_dir) if video_dir is not None else None
        self.frame_fn = frame_fn or agentview_frame
        self.env = None
        self.spec: EpisodeSpec | None = None

    def start(self, spec: EpisodeSpec, record: bool) -> dict:
        t0 = time.perf_counter()
        self.spec, self.steps, self.done = spec, 0, False
        self.frames: list[np.ndarray] | None = [] if record else None
        self.env = self.env_factory(spec.suite, spec.task_id, spec.init_state_id)
        obs = self.env.reset()
        instruction = env_instruction(self.env, spec)
        noop = np.asarray(self.protocol.noop_action, dtype=np.float64)
        for _ in range(self.protocol.num_noop_steps):
            # success during the settling steps does not count (as in the published protocol)
            obs, _, _, _ = self.env.step(noop)
        self._record(obs)
        reply = {"instruction": instruction, "env_setup_s": time.perf_counter() - t0}
        return {**reply, **self._after(obs)}

    def run_chunk(self, actions: np.ndarray) -> dict:
        if self.spec is None:
            raise RuntimeError("run_chunk called without a started episode")
        obs = None
        for a in actions[: self.protocol.num_open_loop_steps]:
            if self.steps >= self.spec.max_steps:
                break
            obs, _, done, _ = self.env.step(np.asarray(a, dtype=np.float64))
            self.steps += 1
            self._record(obs)
            if done:
                self.done = True
                break
        return self._after(obs)

    def _after(self, obs) -> dict:
        if self.done or self.steps >= self.spec.max_steps:
            return {"finished": True, **self._finish()}
        return {"finished": False, "obs": obs}

    def _finish(self) -> dict:
        out = {"success": bool(self.done), "steps": self.steps}
        if self.frames is not None and self.video_dir is not None:
            s = self.spec
            out["video"] = str(write_mp4(self.video_dir / video_name(s.suite, s.task_id, s.trial, self.done),
                                         self.frames, fps=self.protocol.video_fps))
        self.frames, self.spec = None, None
        self.close()
        return out

    def _record(self, obs) -> None:
        if self.frames is not None:
            self.frames.append(np.asarray(self.frame_fn(obs), dtype=np.uint8).copy())

    def close(self) -> None:
        env, self.env = self.env, None
        if env is not None and hasattr(env, "close"):
            env.close()


def worker_main(conn, env_factory: EnvFactory, protocol: Protocol, video_dir, frame_fn, seed: int) -> None:
    """Worker process loop: one driver per slot; commands ("start" | "chunk" | "close", slot, payload)."""
    import traceback

    np.random.seed(seed)
    drivers: dict[int, EpisodeDriver] = {}
    while True:
        try:
            cmd, slot, payload = conn.recv()
        except (EOFError, KeyboardInterrupt):
            break
        try:
            if cmd == "close":
                for d in drivers.values():
                    d.close()
                conn.send(("ok", slot, {}))
                break
            if cmd == "start":
                d = drivers.setdefault(slot, EpisodeDriver(env_factory, protocol, video_dir, frame_fn))
                reply = d.start(*payload)
            elif cmd == "chunk":
                reply = drivers[slot].run_chunk(payload)
            else:
                raise ValueError(f"unknown worker command {cmd!r}")
            conn.send(("ok", slot, reply))
        except Exception:
            conn.send(("error", slot, traceback.format_exc()))

