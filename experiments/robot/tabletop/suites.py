"""The four TableTop-4 suites (10 tasks each) and their fixed initial states.

They follow LIBERO's axes, and LIBERO's initial states: each task has one layout, which episodes shift and
jitter by a centimetre or two (LIBERO's per-task init regions are about ±1 cm wide):
- spatial: the same two identical red cubes, a bowl, a tray and a plate every time; the cube to move is
  named by where it is ("the cube left of the bowl"); layouts differ between tasks, and tasks that share a
  layout differ only in which cube the instruction names;
- object: a target named by colour and kind among three distractors, into the basket; each task's layout
  (which distractors, which slots, which side the basket is on) is drawn once from the task's own seed;
- goal: one scene family (the same bodies, jittered), ten different goals: put in/on, stack, push to the
  zone, turn on the stove;
- long: two sub-goals in sequence.
Each task has NUM_INIT_STATES fixed initial states (`init_state`), drawn from a seed that depends only on
(suite, task, index); demonstrations draw their scenes from a disjoint seed domain (`demo_scene`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from experiments.robot.tabletop.bodies import FIXTURE_COLORS, Body, Goal, SceneState
from experiments.robot.tabletop.scenes import Spec, sample_scene

NUM_INIT_STATES = 50
SEED_DOMAIN = 0x7AB1E  # mixed into every seed so TableTop streams never coincide with other seeded streams
SPLIT_EVAL, SPLIT_DEMO, SPLIT_PRETRAIN, SPLIT_LAYOUT = 0, 1, 2, 3
SUITE_MAX_STEPS = {"spatial": 64, "object": 64, "goal": 64, "long": 112}  # ≈ 2× the longest demo

Sampler = Callable[[np.random.Generator], SceneState]


@dataclass(frozen=True)
class TaskSpec:
    suite: str
    task_id: int
    instruction: str
    max_steps: int
    sampler: Sampler = field(repr=False, compare=False)

    @property
    def name(self) -> str:
        """LIBERO-style file-safe name: the instruction with underscores."""
        return self.instruction.replace(" ", "_")

    def sample(self, rng: np.random.Generator) -> SceneState:
        return self.sampler(rng)

    def __reduce__(self):  # samplers are closures: pickle a task (and so an env) by its registry key
        return get_task, (self.suite, self.task_id)


def with_goals(s: SceneState, goals: tuple[Goal, ...]) -> SceneState:
    """`s` with its goals set (and their body names checked)."""
    return SceneState(s.bodies, s.gripper_pos, s.finger, s.held, s.grasp_offset, tuple(goals))


def _with_goals(specs: list[Spec], goals: Callable[[SceneState], tuple[Goal, ...]], **kw) -> Sampler:
    def sampler(rng: np.random.Generator) -> SceneState:
        s = sample_scene(rng, specs, **kw)
        return with_goals(s, goals(s))

    return sampler


def _place(obj: str, target: str) -> Callable[[SceneState], tuple[Goal, ...]]:
    return lambda s: (Goal("place", obj, target),)


# ---------------------------------------------------------------- spatial
def _cubes(s: SceneState) -> list[Body]:
    return [b for b in s.bodies if b.kind == "cube"]


def _dist(a: Body, b: Body) -> float:
    return float(np.hypot(*(a.pos[:2] - b.pos[:2])))


def _mid_dist(c: Body, a: Body, b: Body) -> float:
    return float(np.hypot(*(c.pos[:2] - (a.pos[:2] + b.pos[:2]) / 2)))


_SPATIAL_SELECT: dict[str, Callable[[SceneState], Body]] = {
    "left of the bowl": lambda s: min(_cubes(s), key=lambda c: c.pos[0]),
    "right of the bowl": lambda s: max(_cubes(s), key=lambda c: c.pos[0]),
    "in front of the bowl": lambda s: min(_cubes(s), key=lambda c: c.pos[1]),
    "behind the bowl": lambda s: max(_cubes(s), key=lambda c: c.pos[1]),
    "between the bowl and the tray": lambda s: min(_cubes(s), key=lambda c: _mid_dist(c, s.body("bowl"), s.body("tray"))),
    "on the tray": lambda s: next(c for c in _cubes(s) if c.support == "tray"),
    "in the bowl": lambda s: next(c for c in _cubes(s) if c.support == "bowl"),
    "next to the tray": lambda s: min(_cubes(s), key=lambda c: _dist(c, s.body("tray"))),
    "closest to the plate": lambda s: min(_cubes(s), key=lambda c: _dist(c, s.body("plate"))),
    "farthest from the plate": lambda s: max(_cubes(s), key=lambda c: _dist(c, s.body("plate"))),
}


def _spatial_layout(cube_1, cube_2, bowl, tray, plate, cube_1_on: str = "") -> list[Spec]:
    specs = [Spec("bowl", "bowl", "white", *bowl), Spec("tray", "tray", "gray", *tray),
             Spec("plate", "plate", "white", *plate)]
    c1 = Spec("cube_1", "cube", "red", *cube_1, on=cube_1_on)
    return [*specs, c1, Spec("cube_2", "cube", "red", *cube_2)]


# (relation, layout): tasks sharing a layout differ only in which cube the instruction names
_ROW = _spatial_layout((-0.11, 0.07), (0.11, 0.07), (0.0, 0.07), (0.13, -0.11), (-0.12, -0.1))
_COLUMN = _spatial_layout((-0.02, -0.08), (-0.02, 0.15), (-0.02, 0.035), (0.14, 0.1), (0.14, -0.08))
_SPREAD = _spatial_layout((-0.13, 0.12), (0.13, 0.0), (0.13, 0.14), (-0.13, -0.01), (-0.02, -0.12))
_SPATIAL = [
    ("left of the bowl", _ROW),
    ("right of the bowl", _ROW),
    ("in front of the bowl", _COLUMN),
    ("behind the bowl", _COLUMN),
    ("between the bowl and the tray",
     _spatial_layout((0.0, 0.09), (0.02, -0.06), (-0.13, 0.09), (0.14, 0.09), (-0.11, -0.1))),
    ("on the tray", _spatial_layout((0.0, 0.0), (-0.1, 0.12), (-0.12, -0.06), (0.1, 0.11), (0.1, -0.1), "tray")),
    ("in the bowl", _spatial_layout((0.0, 0.0), (0.12, 0.12), (-0.1, 0.11), (0.13, -0.02), (-0.06, -0.1), "bowl")),
    ("next to the tray", _spatial_layout((0.0, 0.1), (0.13, -0.05), (0.12, 0.13), (-0.12, 0.1), (-0.1, -0.1))),
    ("closest to the plate", _SPREAD),
    ("farthest from the plate", _SPREAD),
]


def _spatial_goal(relation: str) -> Callable[[SceneState], tuple[Goal, ...]]:
    return lambda s: (Goal("place", _SPATIAL_SELECT[relation](s).name, "plate"),)


def _spatial_tasks() -> list[TaskSpec]:
    return [
        TaskSpec("spatial", i, f"pick up the cube {rel} and place it on the plate", SUITE_MAX_STEPS["spatial"],
                 _with_goals(layout, _spatial_goal(rel)))
        for i, (rel, layout) in enumerate(_SPATIAL)
    ]


# ---------------------------------------------------------------- object
OBJECT_TARGETS = [("red", "cube"), ("green", "ball"), ("blue", "cylinder"), ("yellow", "cube"), ("purple", "ball"),
                  ("orange", "cylinder"), ("pink", "cube"), ("cyan", "ball"), ("black", "cylinder"), ("brown", "cube")]
_OBJECT_SLOTS = [(x, y) for y in (0.0, -0.11) for x in (-0.15, -0.05, 0.05, 0.15)]
_BASKET_SPOTS = [(-0.12, 0.13), (0.12, 0.13)]


def object_layout(target: int) -> list[Spec]:
    """Object task `target`'s one layout: the basket on one side, the target and three distractors in four
    of the eight slots, all drawn from a seed of the task alone (so every episode, demo or evaluation, sees it)."""
    rng = np.random.default_rng(np.random.SeedSequence([SEED_DOMAIN, SPLIT_LAYOUT, target]))
    others = [i for i in range(len(OBJECT_TARGETS)) if i != target]
    picks = [target, *rng.choice(others, size=3, replace=False)]
    slots = rng.choice(len(_OBJECT_SLOTS), size=len(picks), replace=False)
    specs = [Spec("basket", "basket", "brown", *_BASKET_SPOTS[int(rng.integers(2))])]
    for k, slot in zip(picks, slots):
        color, kind = OBJECT_TARGETS[int(k)]
        specs.append(Spec(f"{color}_{kind}", kind, color, *_OBJECT_SLOTS[int(slot)]))
    return specs


def _object_tasks() -> list[TaskSpec]:
    return [
        TaskSpec("object", i, f"pick up the {c} {k} and place it in the basket", SUITE_MAX_STEPS["object"],
                 _with_goals(object_layout(i), _place(f"{c}_{k}", "basket"), shift=0.01))
        for i, (c, k) in enumerate(OBJECT_TARGETS)
    ]


# ---------------------------------------------------------------- goal
_GOAL_LAYOUT = [
    Spec("stove", "stove", "black", -0.13, 0.12),
    Spec("bowl", "bowl", "white", 0.0, 0.13),
    Spec("plate", "plate", "white", 0.13, 0.12),
    Spec("green_zone", "zone", "green", 0.03, -0.14),
    Spec("red_cube", "cube", "red", -0.07, -0.01),
    Spec("blue_ball", "ball", "blue", 0.09, 0.0),
    Spec("yellow_cylinder", "cylinder", "yellow", -0.15, -0.1),
]
_GOALS = [
    ("put the red cube in the bowl", (Goal("place", "red_cube", "bowl"),)),
    ("put the red cube on the plate", (Goal("place", "red_cube", "plate"),)),
    ("put the blue ball in the bowl", (Goal("place", "blue_ball", "bowl"),)),
    ("put the blue ball on the plate", (Goal("place", "blue_ball", "plate"),)),
    ("put the yellow cylinder on the stove", (Goal("place", "yellow_cylinder", "stove"),)),
    ("push the red cube to the green zone", (Goal("push", "red_cube", "green_zone"),)),
    ("turn on the stove", (Goal("press", "stove"),)),
    ("stack the red cube on the yellow cylinder", (Goal("place", "red_cube", "yellow_cylinder"),)),
    ("put the yellow cylinder in the bowl", (Goal("place", "yellow_cylinder", "bowl"),)),
    ("push the blue ball to the green zone", (Goal("push", "blue_ball", "green_zone"),)),
]


def _goal_tasks() -> list[TaskSpec]:
    return [
        TaskSpec("goal", i, text, SUITE_MAX_STEPS["goal"], _with_goals(_GOAL_LAYOUT, lambda s, g=goals: g, shift=0.015))
        for i, (text, goals) in enumerate(_GOALS)
    ]


# ---------------------------------------------------------------- long
def _obj(color: str, kind: str, x: float, y: float, on: str = "") -> Spec:
    return Spec(f"{color}_{kind}", kind, color, x, y, on)


def _fix(kind: str, x: float, y: float, color: str = "") -> Spec:
    color = color or FIXTURE_COLORS[kind]
    return Spec(f"{color}_zone" if kind == "zone" else kind, kind, color, x, y)


_LONG = [
    ("put the red cube in the bowl and then put the blue ball on the plate",
     [_fix("bowl", -0.12, 0.1), _fix("plate", 0.12, 0.1), _obj("red", "cube", 0.1, -0.06),
      _obj("blue", "ball", -0.08, -0.07), _obj("yellow", "cylinder", 0.0, 0.06)],
     (Goal("place", "red_cube", "bowl"), Goal("place", "blue_ball", "plate"))),
    ("turn on the stove and then put the yellow cylinder on it",
     [_fix("stove", 0.0, 0.11), _fix("bowl", 0.14, -0.04), _obj("yellow", "cylinder", -0.12, -0.06),
      _obj("red", "cube", 0.1, 0.12)],
     (Goal("press", "stove"), Goal("place", "yellow_cylinder", "stove"))),
    ("put both the green cube and the red ball in the basket",
     [_fix("basket", 0.0, 0.12), _obj("green", "cube", -0.13, -0.05), _obj("red", "ball", 0.13, -0.05),
      _obj("blue", "cylinder", 0.0, -0.03)],
     (Goal("place", "green_cube", "basket"), Goal("place", "red_ball", "basket"))),
    ("push the blue cube to the yellow zone and then put the red cube on the plate",
     [_fix("zone", -0.12, 0.11, "yellow"), _obj("blue", "cube", -0.12, -0.04), _fix("plate", 0.12, 0.11),
      _obj("red", "cube", 0.1, -0.06), _obj("green", "ball", 0.02, 0.05)],
     (Goal("push", "blue_cube", "yellow_zone"), Goal("place", "red_cube", "plate"))),
    ("stack the red cube on the blue cube and then put the green ball in the bowl",
     [_obj("blue", "cube", -0.1, 0.08), _obj("red", "cube", 0.08, -0.06), _obj("green", "ball", -0.1, -0.07),
      _fix("bowl", 0.12, 0.11)],
     (Goal("place", "red_cube", "blue_cube"), Goal("place", "green_ball", "bowl"))),
    ("put the yellow cylinder on the tray and then turn on the stove",
     [_fix("tray", 0.11, 0.11), _fix("stove", -0.12, 0.1), _obj("yellow", "cylinder", 0.03, -0.07),
      _obj("purple", "ball", -0.11, -0.08)],
     (Goal("place", "yellow_cylinder", "tray"), Goal("press", "stove"))),
    ("put the purple ball in the bowl and then push the orange cube to the green zone",
     [_fix("bowl", 0.12, 0.11), _fix("zone", 0.1, -0.12, "green"), _obj("purple", "ball", -0.12, -0.08),
      _obj("orange", "cube", -0.06, 0.1), _obj("cyan", "cylinder", -0.15, 0.05)],
     (Goal("place", "purple_ball", "bowl"), Goal("push", "orange_cube", "green_zone"))),
    ("put both the red cube and the blue cube on the tray",
     [_fix("tray", 0.0, 0.12), _obj("red", "cube", -0.12, -0.05), _obj("blue", "cube", 0.12, -0.05),
      _obj("yellow", "ball", 0.0, -0.02)],
     (Goal("place", "red_cube", "tray"), Goal("place", "blue_cube", "tray"))),
    ("put the pink ball on the plate and then put the cyan cube in the bowl",
     [_fix("plate", -0.12, 0.1), _fix("bowl", 0.12, 0.1), _obj("pink", "ball", 0.08, -0.07),
      _obj("cyan", "cube", -0.09, -0.07), _obj("black", "cylinder", 0.0, 0.1)],
     (Goal("place", "pink_ball", "plate"), Goal("place", "cyan_cube", "bowl"))),
    ("put the green cylinder on the plate and then stack the red cube on it",
     [_fix("plate", 0.0, 0.11), _obj("green", "cylinder", -0.12, -0.06), _obj("red", "cube", 0.12, -0.06),
      _obj("blue", "ball", 0.13, 0.1)],
     (Goal("place", "green_cylinder", "plate"), Goal("place", "red_cube", "green_cylinder"))),
]


def _long_tasks() -> list[TaskSpec]:
    return [
        TaskSpec("long", i, text, SUITE_MAX_STEPS["long"], _with_goals(specs, lambda s, g=goals: g))
        for i, (text, specs, goals) in enumerate(_LONG)
    ]


# ---------------------------------------------------------------- registry
SUITES: dict[str, list[TaskSpec]] = {
    "spatial": _spatial_tasks(),
    "object": _object_tasks(),
    "goal": _goal_tasks(),
    "long": _long_tasks(),
}
SUITE_NAMES = tuple(SUITES)


def get_suite(name: str) -> list[TaskSpec]:
    if name not in SUITES:
        raise ValueError(f"unknown TableTop-4 suite {name!r}; expected one of {list(SUITES)}")
    return SUITES[name]


def get_task(suite: str, task_id: int) -> TaskSpec:
    tasks = get_suite(suite)
    if not 0 <= task_id < len(tasks):
        raise ValueError(f"suite {suite!r} has tasks 0..{len(tasks) - 1}, got task_id={task_id}")
    return tasks[task_id]


def _rng(split: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([SEED_DOMAIN, split, *keys]))


def check_trial_range(first_init_state: int, trials_per_task: int, error: type[Exception] = ValueError) -> None:
    """`error` unless trials k = 0 .. trials_per_task − 1, which start from init state first_init_state + k, all
    have one."""
    if first_init_state < 0 or first_init_state + trials_per_task > NUM_INIT_STATES:
        raise error(f"first_init_state + trials_per_task must lie within the {NUM_INIT_STATES} init states, got "
                    f"{first_init_state} + {trials_per_task}")


def init_state(suite: str, task_id: int, index: int) -> SceneState:
    """The `index`-th fixed evaluation initial state of a task (like LIBERO's init states)."""
    task = get_task(suite, task_id)
    if not 0 <= index < NUM_INIT_STATES:
        raise ValueError(f"init_state_id must be in 0..{NUM_INIT_STATES - 1}, got {index}")
    return task.sample(_rng(SPLIT_EVAL, SUITE_NAMES.index(suite), task_id, index))


def get_init_states(suite: str, task_id: int) -> list[SceneState]:
    return [init_state(suite, task_id, i) for i in range(NUM_INIT_STATES)]


def demo_scene(suite: str, task_id: int, seed: int, index: int) -> SceneState:
    """Scene for demonstration `index` of a dataset generated with `seed` (never an evaluation state)."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative, got seed={seed}, index={index}")
    return get_task(suite, task_id).sample(_rng(SPLIT_DEMO, seed, SUITE_NAMES.index(suite), task_id, index))
