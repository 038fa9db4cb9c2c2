"""Small synthetic suites in the raw LIBERO HDF5 layout (and, with the `rlds` extra, the RLDS release layout).

For tests and smoke runs of the whole pipeline without downloading LIBERO:

    python -m prismatic.vla.datasets.synthetic --out_dir data/synthetic --suite libero_spatial

HDF5 files store images upside down and keep no-op steps, like LIBERO's raw demos; the RLDS copy of the same
demos has them flipped and filtered, like OpenVLA's release, so both read to the same samples.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from prismatic.cli import check_counts, run_cli
from prismatic.io import atomic_dir
from prismatic.vla.datasets.episodes import noop_keep_mask

INSTRUCTIONS = (
    "pick up the black bowl and place it on the plate",
    "put the red cube in the basket",
    "open the top drawer of the cabinet",
    "push the plate to the front of the stove",
)


@dataclass
class Demo:
    actions: np.ndarray  # (T, 7) LIBERO convention (gripper -1 open / +1 close), no-ops included
    ee_states: np.ndarray  # (T, 6)
    gripper_states: np.ndarray  # (T, 2)
    agentview: np.ndarray  # (T, H, W, 3) uint8, upright
    wrist: np.ndarray  # (T, H, W, 3) uint8, upright


@dataclass
class Task:
    instruction: str
    demos: list[Demo] = field(default_factory=list)


def _image(rng: np.random.Generator, size: int, task: int, t: int, wrist: bool) -> np.ndarray:
    """A top-to-bottom gradient (so a flip is visible) with a square that moves with time."""
    im = np.zeros((size, size, 3), dtype=np.uint8)
    im[..., 0] = np.linspace(0, 200, size, dtype=np.uint8)[:, None]
    im[..., 1] = 40 * task + (80 if wrist else 0)
    im[..., 2] = rng.integers(0, 30, (size, size), dtype=np.uint8)
    s, y = max(2, size // 6), (t * 3) % max(1, size - max(2, size // 6))
    im[y : y + s, size // 4 : size // 4 + s] = 255
    return im


def make_demo(rng: np.random.Generator, task: int, steps: int, image_size: int) -> Demo:
    t = np.arange(steps)
    motion = 0.5 * np.sin(0.3 * t[:, None] + task + np.arange(6)[None, :]) + 0.05 * rng.normal(size=(steps, 6))
    grip = np.where(t < steps // 2, -1.0, 1.0)
    still = np.zeros(steps, dtype=bool)
    still[:2] = True  # leading no-ops, as recorded demos start
    still[steps // 3] = True  # a pause: a no-op
    still[steps // 2] = True  # zero motion while the gripper closes: kept
    motion[still] = 0.0
    actions = np.concatenate([motion, grip[:, None]], axis=1).astype(np.float64)
    ee = np.cumsum(0.01 * motion, axis=0)
    grip_q = np.where(grip[:, None] < 0, [0.04, -0.04], [0.01, -0.01])
    agent = np.stack([_image(rng, image_size, task, k, False) for k in t])
    wrist = np.stack([_image(rng, image_size, task, k, True) for k in t])
    return Demo(actions, ee, grip_q, agent, wrist)


def make_tasks(num_tasks: int = 2, demos_per_task: int = 2, steps: int = 20, image_size: int = 32,
               seed: int = 0) -> list[Task]:
    rng = np.random.default_rng(seed)
    return [
        Task(INSTRUCTIONS[k % len(INSTRUCTIONS)] + (f" {k}" if k >= len(INSTRUCTIONS) else ""),
             [make_demo(rng, k, steps, image_size) for _ in range(demos_per_task)])
        for k in range(num_tasks)
    ]


def task_file_name(instruction: str) -> str:
    return instruction.replace(" ", "_") + "_demo.hdf5"


def write_hdf5_suite(root: Path, suite: str, tasks: list[Task], upright: bool = False) -> Path:
    """`<root>/<suite>/<task>_demo.hdf5`, LIBERO's raw layout; images stored upside down unless `upright`."""
    d = Path(root) / suite
    with atomic_dir(d) as tmp_dir:  # a crash must not leave a suite that loads with some of its tasks
        for task in tasks:
            _write_task_file(tmp_dir / task_file_name(task.instruction), task, upright)
    return d


def _write_task_file(path: Path, task: Task, upright: bool) -> None:
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["problem_info"] = json.dumps(
            {"problem_name": "synthetic", "domain_name": "synthetic", "language_instruction": task.instruction}
        )
        if upright:
            data.attrs["mergevla_images_upright"] = True
        for k, demo in enumerate(task.demos):
            g = data.create_group(f"demo_{k}")
            g.create_dataset("actions", data=demo.actions)
            obs = g.create_group("obs")
            flip = (lambda x: x) if upright else (lambda x: np.ascontiguousarray(x[:, ::-1, ::-1]))
            obs.create_dataset("agentview_rgb", data=flip(demo.agentview))
            obs.create_dataset("eye_in_hand_rgb", data=flip(demo.wrist))
            obs.create_dataset("ee_states", data=demo.ee_states)
            obs.create_dataset("gripper_states", data=demo.gripper_states)
            obs.create_dataset("joint_states", data=np.zeros((len(demo.actions), 7)))
            g.attrs["num_samples"] = len(demo.actions)


def write_rlds_suite(root: Path, suite: str, tasks: list[Task], encoding: str = "png") -> Path:
    """`<root>/<suite>_no_noops/1.0.0/`, the layout of OpenVLA's modified LIBERO release (needs `rlds`)."""
    from prismatic.vla.datasets.rlds import import_tfds

    tfds = import_tfds()
    name = f"{suite}_no_noops"
    if (Path(root) / name).exists():
        raise FileExistsError(f"{Path(root) / name} already exists; refusing to overwrite it")
    size = tasks[0].demos[0].agentview.shape[1]
    feat = tfds.features
    image = {"shape": (size, size, 3), "dtype": np.uint8, "encoding_format": encoding}
    features = feat.FeaturesDict({
        "steps": feat.Dataset({
            "observation": feat.FeaturesDict({
                "image": feat.Image(**image),
                "wrist_image": feat.Image(**image),
                "state": feat.Tensor(shape=(8,), dtype=np.float32),
                "joint_state": feat.Tensor(shape=(7,), dtype=np.float32),
            }),
            "action": feat.Tensor(shape=(7,), dtype=np.float32),
            "language_instruction": feat.Text(),
            "is_first": feat.Scalar(dtype=np.bool_),
            "is_last": feat.Scalar(dtype=np.bool_),
        }),
        "episode_metadata": feat.FeaturesDict({"file_path": feat.Text()}),
    })
    examples = []
    for task in tasks:
        for k, demo in enumerate(task.demos):
            keep = np.flatnonzero(noop_keep_mask(demo.actions))
            steps = [
                {"observation": {"image": demo.agentview[t], "wrist_image": demo.wrist[t],
                                 "state": np.concatenate([demo.ee_states[t], demo.gripper_states[t]]).astype(np.float32),
                                 "joint_state": np.zeros(7, np.float32)},
                 "action": demo.actions[t].astype(np.float32), "language_instruction": task.instruction,
                 "is_first": i == 0, "is_last": i == len(keep) - 1}
                for i, t in enumerate(keep)
            ]
            path = task_file_name(task.instruction)
            examples.append((f"{path}_{k}", {"steps": steps, "episode_metadata": {"file_path": path}}))
    builder = tfds.dataset_builders.AdhocBuilder(
        name=name, version="1.0.0", features=features, split_datasets={"train": examples}, data_dir=str(root),
        disable_shuffling=True,
    )
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(verify_ssl=False))
    return Path(root) / name / "1.0.0"


@dataclass
class SyntheticConfig:
    out_dir: Path = Path("data/synthetic_libero")  # data root to create: <out_dir>/<suite>/
    suite: str = "libero_spatial"  # suite directory name (also the RLDS copy's name, with _no_noops)
    num_tasks: int = 2  # <task>_demo.hdf5 files to write
    demos_per_task: int = 3  # demos in each task's file
    steps: int = 24  # raw steps per demo, no-ops included
    image_size: int = 32  # side of the square camera frames, in pixels
    rlds: bool = False  # also write the RLDS copy (needs the `rlds` extra)
    seed: int = 0  # seed of every random image, state and action


def main(cfg: SyntheticConfig) -> None:
    check_counts(cfg, positive=("num_tasks", "demos_per_task", "steps", "image_size"), non_negative=("seed",))
    targets = [Path(cfg.out_dir) / cfg.suite] + ([Path(cfg.out_dir) / f"{cfg.suite}_no_noops"] if cfg.rlds else [])
    for t in targets:  # both checked before either is written, so a refusal leaves nothing behind
        if t.exists():
            raise FileExistsError(f"{t} already exists; refusing to overwrite it")
    if cfg.rlds:
        from prismatic.vla.datasets.rlds import import_tfds

        import_tfds()  # without the extra, say so before writing the HDF5 copy
    tasks = make_tasks(cfg.num_tasks, cfg.demos_per_task, cfg.steps, cfg.image_size, cfg.seed)
    print(f"wrote {write_hdf5_suite(cfg.out_dir, cfg.suite, tasks)}")
    if cfg.rlds:
        print(f"wrote {write_rlds_suite(cfg.out_dir, cfg.suite, tasks)}")


if __name__ == "__main__":  # DatasetError (no rlds extra) is a ValueError
    sys.exit(run_cli("synthetic", SyntheticConfig, main, (ValueError,)))
