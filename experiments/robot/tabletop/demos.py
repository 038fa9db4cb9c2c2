"""Scripted demonstrations, written in LIBERO's raw HDF5 layout (docs/INTERFACES.md "Episode files").

One file per task, `<root>/<suite>/<task_name>_demo.hdf5`:
    data.attrs: problem_info (JSON: language_instruction, problem_name, domain_name, suite, task_id),
                env_args (JSON: simulator settings), mergevla_images_upright = True, total (samples),
                num_demos, tabletop_version, seed, noise
    data/demo_<k>/actions            (T, 7) float64  dxyz in [-1, 1] (× MAX_DELTA m), 3 zeros, gripper -1 open/+1 close
    data/demo_<k>/obs/agentview_rgb  (T, H, W, 3) uint8, upright (no 180° flip needed)
    data/demo_<k>/obs/eye_in_hand_rgb
    data/demo_<k>/obs/ee_pos         (T, 3)  fingertip position (m)
    data/demo_<k>/obs/ee_ori         (T, 3)  axis-angle (constant: pointing down)
    data/demo_<k>/obs/ee_states      (T, 6)  ee_pos + ee_ori
    data/demo_<k>/obs/gripper_states (T, 2)  finger positions (+q, -q)
    data/demo_<k>/obs/joint_states   (T, 3)  the gantry's three prismatic joints (= ee_pos; no arm joints)
    data/demo_<k>/states             (T, D) float32  flat simulator state (SceneState.vector)
    data/demo_<k>/rewards, dones     (T,) uint8, 1 at the last step (the step that reached success)
    data/demo_<k>.attrs: num_samples, scene_index (which demo scene), init_state (JSON SceneState)
Observation t is the one the action t was chosen from. Only successful episodes are kept; a failed one is
replaced by the next scene index, so `scene_index` can skip numbers.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import h5py
import numpy as np

from experiments.robot.tabletop.bodies import SceneState
from experiments.robot.tabletop.env import EEF_AXIS_ANGLE, TableTopEnv
from experiments.robot.tabletop.expert import ScriptedExpert
from experiments.robot.tabletop.physics import MAX_DELTA, PHYSICS_VERSION
from experiments.robot.tabletop.suites import SEED_DOMAIN, SUITE_NAMES, demo_scene, get_task
from prismatic.vla.datasets.hdf5 import KEEP_NOOPS_ATTR, UPRIGHT_ATTR

TABLETOP_VERSION = 1
# seed stream of the expert's action noise. suites.py's SPLIT_LAYOUT is 3 too, but its seed lists are 3 long and
# these 6, so the streams never coincide (renumbering would change every demo)
NOISE_STREAM = 3
MAX_FAILURES = 20  # per task; more means the expert or the task is broken
T = TypeVar("T")


@dataclass
class Episode:
    scene_index: int
    init: SceneState
    agentview: np.ndarray
    wrist: np.ndarray
    ee_pos: np.ndarray
    gripper: np.ndarray
    states: np.ndarray
    actions: np.ndarray


def record_episode(env: TableTopEnv, expert: ScriptedExpert) -> tuple[Episode | None, int]:
    """Run the expert from the env's initial state; (episode, steps) or (None, steps) when it timed out."""
    obs = env.reset()
    expert.reset()
    frames, wrist, pos, grip, states, actions = [], [], [], [], [], []
    for _ in range(env.max_steps):
        a = expert.act(env.state)
        frames.append(obs["agentview_image"])
        wrist.append(obs["robot0_eye_in_hand_image"])
        pos.append(obs["robot0_eef_pos"])
        grip.append(obs["robot0_gripper_qpos"])
        states.append(env.state.vector())
        actions.append(a)
        obs, _, done, _ = env.step(a)
        if done:
            ep = Episode(-1, env.init_state, np.stack(frames), np.stack(wrist), np.stack(pos), np.stack(grip),
                         np.stack(states), np.stack(actions))
            return ep, len(actions)
    return None, len(actions)


def noise_rng(suite: str, task_id: int, seed: int, index: int) -> np.random.Generator:
    """The scripted expert's action-noise stream in demo scene `index` of the dataset made with `seed`."""
    return np.random.default_rng(np.random.SeedSequence([SEED_DOMAIN, NOISE_STREAM, seed, SUITE_NAMES.index(suite),
                                                         task_id, index]))


class DemoFailure(RuntimeError):
    """The scripted expert failed on more than MAX_FAILURES demo scenes of a task."""


def first_successes(suite: str, task_id: int, count: int, attempt: Callable[[int], T | None],
                    noise: float) -> list[tuple[int, T]]:
    """`attempt(index)` on demo scenes 0, 1, … until `count` of them return a result (None: the expert failed
    there, the scene is skipped); [(scene index, result)] in scene order. The generator and anything that must
    find the same demos (blind replay) go through here, so they skip the same scenes."""
    out, index = [], 0
    while len(out) < count:
        result = attempt(index)
        if result is not None:
            out.append((index, result))
        index += 1
        if index - len(out) > MAX_FAILURES:
            raise DemoFailure(f"{suite} task {task_id}: the scripted expert failed too often ({index - len(out)} "
                              f"times, after {len(out)} successes) with action noise {noise}: lower the demo noise "
                              "(at the default 0.1 this means the task or the expert is broken)")
    return out


def generate_task(suite: str, task_id: int, num_demos: int, seed: int, image_size: int = 64,
                  supersample: int = 2, noise: float = 0.1) -> tuple[list[Episode], dict]:
    """`num_demos` successful expert episodes on demo scenes 0, 1, … (skipping failures), and stats."""
    task = get_task(suite, task_id)
    steps = []

    def attempt(index: int) -> Episode | None:
        env = TableTopEnv(task, demo_scene(suite, task_id, seed, index), image_size, supersample)
        ep, n = record_episode(env, ScriptedExpert(noise, noise_rng(suite, task_id, seed, index)))
        steps.append(n)
        return ep

    found = first_successes(suite, task_id, num_demos, attempt, noise)
    for index, ep in found:
        ep.scene_index = index
    episodes = [ep for _, ep in found]
    attempts = found[-1][0] + 1 if found else 0
    lengths = [len(e.actions) for e in episodes]
    stats = {"demos": len(episodes), "attempts": attempts, "failures": attempts - len(episodes),
             "env_steps": sum(steps), "mean_length": float(np.mean(lengths)) if lengths else 0.0,
             "max_length": max(lengths, default=0)}
    return episodes, stats


def create_h5(path: Path) -> h5py.File:
    """A new HDF5 file whose bytes depend only on what is written: no object timestamps, creation-ordered links."""
    fcpl = h5py.h5p.create(h5py.h5p.FILE_CREATE)
    fcpl.set_obj_track_times(False)
    fcpl.set_link_creation_order(h5py.h5p.CRT_ORDER_TRACKED | h5py.h5p.CRT_ORDER_INDEXED)
    return h5py.File(h5py.h5f.create(str(path).encode(), h5py.h5f.ACC_TRUNC, fcpl=fcpl))


def h5_group(parent: h5py.Group, name: str) -> h5py.Group:
    """`parent.create_group(name)` without timestamps (h5py's create_group always records them)."""
    gcpl = h5py.h5p.create(h5py.h5p.GROUP_CREATE)
    gcpl.set_obj_track_times(False)
    gcpl.set_link_creation_order(h5py.h5p.CRT_ORDER_TRACKED | h5py.h5p.CRT_ORDER_INDEXED)
    return h5py.Group(h5py.h5g.create(parent.id, name.encode(), gcpl=gcpl))


def _compression(name: str) -> dict:
    if name == "gzip":
        return {"compression": "gzip", "compression_opts": 1}  # flat colours: level 1 is ~12x already
    if name == "lzf":
        return {"compression": "lzf"}
    if name == "none":
        return {}
    raise ValueError(f"compression must be gzip, lzf or none, got {name!r}")


def write_task_file(path: Path, suite: str, task_id: int, episodes: list[Episode], *, seed: int, noise: float,
                    image_size: int, supersample: int, compression: str = "gzip") -> None:
    """Write one task's demos to `path` (a temporary path; the caller renames it into place)."""
    task = get_task(suite, task_id)
    comp = _compression(compression)
    # no timestamps anywhere: the bytes of a file are a function of its contents (same seed → same sha256)
    with create_h5(path) as f:
        data = h5_group(f, "data")
        data.attrs["problem_info"] = json.dumps({
            "language_instruction": task.instruction, "problem_name": f"tabletop_{suite}",
            "domain_name": "tabletop4", "suite": suite, "task_id": task_id, "task_name": task.name,
        })
        data.attrs["env_args"] = json.dumps({
            "env_name": "TableTop4", "suite": suite, "task_id": task_id, "image_size": image_size,
            "supersample": supersample, "max_steps": task.max_steps, "action_scale_m": MAX_DELTA,
        })
        data.attrs[UPRIGHT_ATTR] = True
        data.attrs[KEEP_NOOPS_ATTR] = True
        data.attrs["total"] = int(sum(len(e.actions) for e in episodes))
        data.attrs["num_demos"] = len(episodes)
        data.attrs["tabletop_version"] = TABLETOP_VERSION
        data.attrs["physics_version"] = PHYSICS_VERSION
        data.attrs["seed"] = seed
        data.attrs["noise"] = noise
        for k, ep in enumerate(episodes):
            g = h5_group(data, f"demo_{k}")
            t = len(ep.actions)
            g.attrs["num_samples"] = t
            g.attrs["scene_index"] = ep.scene_index
            g.attrs["init_state"] = json.dumps(ep.init.to_dict())
            ori = np.repeat(EEF_AXIS_ANGLE[None], t, axis=0)
            done = np.zeros(t, np.uint8)
            done[-1] = 1

            def put(grp, name, arr, compress=False):
                grp.create_dataset(name, data=arr, track_times=False, **(comp if compress else {}))

            put(g, "actions", ep.actions.astype(np.float64))
            put(g, "states", ep.states.astype(np.float32))
            put(g, "rewards", done)
            put(g, "dones", done)
            obs = h5_group(g, "obs")
            put(obs, "agentview_rgb", ep.agentview, compress=True)
            put(obs, "eye_in_hand_rgb", ep.wrist, compress=True)
            put(obs, "ee_pos", ep.ee_pos.astype(np.float64))
            put(obs, "ee_ori", ori)
            put(obs, "ee_states", np.concatenate([ep.ee_pos, ori], axis=1))
            put(obs, "gripper_states", ep.gripper.astype(np.float64))
            put(obs, "joint_states", ep.ee_pos.astype(np.float64))


def attrs_dict(attrs) -> dict:
    """HDF5 attributes as plain Python values (numpy scalars → scalars, arrays → lists, bytes → str)."""
    def plain(v):
        if isinstance(v, bytes):
            return v.decode()
        if isinstance(v, np.ndarray):
            return [plain(x) for x in v.tolist()]
        return v.item() if isinstance(v, np.generic) else v

    return {k: plain(v) for k, v in attrs.items()}


def read_task_file(path: Path | str) -> dict:
    """{"instruction", "problem_info", "attrs", "demos": [{name: array, "attrs": {...}}]}, demos in index order."""
    path = Path(path)
    with h5py.File(path, "r") as f:
        if "data" not in f:
            raise ValueError(f"{path}: not a LIBERO-layout demo file (no 'data' group)")
        data = f["data"]
        info = json.loads(data.attrs["problem_info"])
        demos = []
        names = sorted(data.keys(), key=lambda n: int(n.split("_")[1]))
        for name in names:
            g = data[name]
            d = {k: g[k][()] for k in ("actions", "states", "rewards", "dones")}
            d.update({f"obs/{k}": g["obs"][k][()] for k in g["obs"]})
            d["attrs"] = attrs_dict(g.attrs)
            demos.append(d)
        attrs = attrs_dict(data.attrs)
    return {"instruction": info["language_instruction"], "problem_info": info, "attrs": attrs, "demos": demos}


def task_file(root: Path | str, suite: str, task_id: int) -> Path:
    return Path(root) / suite / f"{get_task(suite, task_id).name}_demo.hdf5"
