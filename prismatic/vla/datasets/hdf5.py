"""Raw LIBERO demo files (`<suite>/<task>_demo.hdf5`), read directly: no conversion step.

What the RLDS release did to these files, done here on the fly: images rotated 180° (unless the file says
`mergevla_images_upright`, as TableTop-4 files do), no-op actions dropped (unless the file says
`mergevla_keep_noops`, as TableTop-4's scripted demos do), proprio = ee_states (6) +
gripper_states (2), the instruction taken from `problem_info`. (The release also re-rendered every demo at
256 px and dropped the demos that failed on replay; that needs the simulator and is not done here.)
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import h5py
import numpy as np

from prismatic.vla.datasets.episodes import ArrayImages, DatasetError, Episode, noop_keep_mask
from prismatic.vla.normalization import gripper_to_train

CAMERAS = ("agentview_rgb", "eye_in_hand_rgb")
UPRIGHT_ATTR = "mergevla_images_upright"
# set by scripted demos (TableTop-4), which never idle: a step without motion waits for the fingers to close, and
# dropping it as the release dropped teleoperators' idle steps would teach a grasp that lets go
KEEP_NOOPS_ATTR = "mergevla_keep_noops"


def _demo_order(name: str) -> tuple[int, str]:
    m = re.fullmatch(r"demo_(\d+)", name)
    return (int(m.group(1)) if m else 1 << 30, name)


def read_instruction(path: Path, data: h5py.Group) -> str:
    raw = data.attrs.get("problem_info")
    if raw is None:
        raise DatasetError(f"{path}: attribute data.attrs['problem_info'] is missing (it holds the instruction)")
    try:
        info = json.loads(raw.decode() if isinstance(raw, bytes) else str(raw))
        instruction = info["language_instruction"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DatasetError(
            f"{path}: data.attrs['problem_info'] must be JSON with a 'language_instruction' string ({e!r})"
        ) from e
    if isinstance(instruction, list):  # LIBERO's own loader joins it with "" (pieces of one string)
        instruction = "".join(map(str, instruction))
    instruction = instruction.strip().strip('"').strip() if isinstance(instruction, str) else ""
    if not instruction:  # (some files wrap the text in double quotes, hence the strip)
        raise DatasetError(f"{path}: problem_info.language_instruction is empty or not a string")
    return instruction


def _array(path: Path, group: h5py.Group, key: str, shape_tail: tuple, dtype=None) -> h5py.Dataset:
    if key not in group:
        raise DatasetError(f"{path}: {group.name}/{key} is missing")
    ds = group[key]
    if not isinstance(ds, h5py.Dataset) or (shape_tail != () and ds.shape[1:] != shape_tail):
        got = getattr(ds, "shape", "a group")
        raise DatasetError(f"{path}: {group.name}/{key} has shape {got}, expected (T, {', '.join(map(str, shape_tail))})")
    if dtype is not None and ds.dtype != dtype:
        raise DatasetError(f"{path}: {group.name}/{key} has dtype {ds.dtype}, expected {np.dtype(dtype)}")
    return ds


class HDF5Images:
    """Images read from the file on demand (for suites too large to preload). One handle per process."""

    def __init__(self, path: Path, demo: str, steps: np.ndarray, flip: bool):
        self.path, self.demo, self.steps, self.flip = path, demo, steps, flip
        self._handle: tuple[int, h5py.File] | None = None

    def __len__(self) -> int:
        return len(self.steps)

    def __getstate__(self):  # h5py handles do not survive a fork / pickle into a worker
        return {**self.__dict__, "_handle": None}

    def _file(self) -> h5py.File:
        if self._handle is None or self._handle[0] != os.getpid():
            self._handle = (os.getpid(), h5py.File(self.path, "r"))
        return self._handle[1]

    def get(self, steps: np.ndarray) -> np.ndarray:
        obs = self._file()[f"data/{self.demo}/obs"]
        raw = self.steps[np.asarray(steps)]
        try:
            out = np.stack([np.stack([obs[c][int(t)] for c in CAMERAS]) for t in raw])
        except OSError as e:
            raise DatasetError(f"{self.path}: cannot read images of {self.demo} ({e})") from e
        return out[:, :, ::-1, ::-1] if self.flip else out


def read_hdf5_file(path: Path, filter_noops: bool, preload: bool) -> list[Episode]:
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise DatasetError(f"{path} cannot be opened as HDF5 (truncated or corrupt?): {e}") from e
    episodes = []
    try:
        with f:
            if "data" not in f:
                raise DatasetError(f"{path}: group 'data' is missing (expected LIBERO's data/demo_<k> layout)")
            data = f["data"]
            instruction = read_instruction(path, data)
            flip = not bool(data.attrs.get(UPRIGHT_ATTR, False))
            filter_file = filter_noops and not bool(data.attrs.get(KEEP_NOOPS_ATTR, False))
            for demo in sorted(data.keys(), key=_demo_order):
                g = data[demo]
                if not isinstance(g, h5py.Group) or "obs" not in g:
                    raise DatasetError(f"{path}: data/{demo}/obs is missing")
                obs = g["obs"]
                actions = _array(path, g, "actions", (7,))[:].astype(np.float64)
                t = len(actions)
                ee = _array(path, obs, "ee_states", (6,))[:]
                grip = _array(path, obs, "gripper_states", (2,))[:]
                cams = [_array(path, obs, c, (), np.uint8) for c in CAMERAS]
                for c, ds in zip(CAMERAS, cams):
                    if ds.ndim != 4 or ds.shape[-1] != 3:
                        raise DatasetError(f"{path}: data/{demo}/obs/{c} has shape {ds.shape}, expected (T, H, W, 3)")
                if cams[0].shape[1:] != cams[1].shape[1:]:  # a training batch stacks both cameras
                    raise DatasetError(f"{path}: data/{demo}: the cameras' frames differ in size ({CAMERAS[0]} "
                                       f"{cams[0].shape[1:3]}, {CAMERAS[1]} {cams[1].shape[1:3]}); expected one size")
                lengths = {len(ee), len(grip), *(len(c) for c in cams)}
                if lengths != {t}:
                    raise DatasetError(f"{path}: data/{demo} arrays disagree on the number of steps ({lengths | {t}})")
                keep = noop_keep_mask(actions) if filter_file else np.ones(t, dtype=bool)
                steps = np.flatnonzero(keep)
                if len(steps) == 0:
                    continue
                acts = actions[steps].astype(np.float32)
                acts[:, -1] = gripper_to_train(acts[:, -1])
                proprio = np.concatenate([ee[steps], grip[steps]], axis=1).astype(np.float32)
                if preload:
                    ims = np.stack([c[:][steps] for c in cams], axis=1)  # (T, 2, H, W, 3)
                    images = ArrayImages(np.ascontiguousarray(ims[:, :, ::-1, ::-1]) if flip else ims)
                else:
                    images = HDF5Images(path, demo, steps, flip)
                episodes.append(Episode(instruction, acts, proprio, images, f"{path}:{demo}"))
    except OSError as e:  # a corrupt chunk inside an otherwise readable file
        raise DatasetError(f"{path}: read error, the file is corrupt ({e})") from e
    return episodes


def image_bytes(path: Path) -> int:
    """Uncompressed size of a file's camera arrays (to decide whether a suite fits in memory)."""
    try:
        with h5py.File(path, "r") as f:
            data = f.get("data")
            if data is None:
                return 0
            total = 0
            for demo in data.values():
                for c in CAMERAS:
                    ds = demo.get(f"obs/{c}") if isinstance(demo, h5py.Group) else None
                    if isinstance(ds, h5py.Dataset):
                        total += ds.size * ds.dtype.itemsize
            return total
    except OSError as e:
        raise DatasetError(f"{path} cannot be opened as HDF5 (truncated or corrupt?): {e}") from e


def read_hdf5_suite(files: list[Path], filter_noops: bool = True, preload_images_gb: float = 4.0) -> list[Episode]:
    """Every demo of every file. Images are loaded into memory when they fit in `preload_images_gb`."""
    preload = sum(image_bytes(p) for p in files) <= preload_images_gb * 2**30
    episodes, first = [], None  # first: (file, its frame size)
    for p in files:
        eps = read_hdf5_file(p, filter_noops, preload)
        size = tuple(eps[0].images.get(np.array([0])).shape[-3:-1]) if eps else None
        first = first or (size and (p, size))
        if size and size != first[1]:  # a training batch stacks frames of every file
            raise DatasetError(f"{p}: frames are {size} px, but {first[0]}'s are {first[1]}; every file of a "
                               "suite needs one frame size (re-render or resize them alike)")
        episodes.extend(eps)
    return episodes
