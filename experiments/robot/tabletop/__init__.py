"""TableTop-4: a small, fast, deterministic numpy tabletop benchmark with LIBERO's interface and axes.

A Cartesian gripper above a table with coloured cubes, balls and cylinders, receptacles (bowl, plate, tray,
basket), a stove and painted zones; two 64-px cameras; four suites of ten tasks (spatial, object, goal,
long); a scripted expert; demonstrations in LIBERO's raw HDF5 layout; a captioned scene pool for VLM
pretraining.

    from experiments.robot.tabletop import SUITES, get_suite, make_env
    env = make_env("goal", task_id=5, init_state_id=0)   # 50 fixed init states per task
    obs = env.reset()                                   # LIBERO keys, upright images
    obs, reward, done, info = env.step(action)          # done = success

Data: `python -m experiments.robot.tabletop.generate` (see generate.py).
"""

from experiments.robot.tabletop.bodies import Body, Goal, SceneState
from experiments.robot.tabletop.env import TableTopEnv, make_env
from experiments.robot.tabletop.expert import ScriptedExpert
from experiments.robot.tabletop.suites import (
    NUM_INIT_STATES,
    SUITE_MAX_STEPS,
    SUITE_NAMES,
    SUITES,
    TaskSpec,
    demo_scene,
    get_init_states,
    get_suite,
    get_task,
    init_state,
)

__all__ = [
    "Body", "Goal", "NUM_INIT_STATES", "SUITES", "SUITE_MAX_STEPS", "SUITE_NAMES", "SceneState", "ScriptedExpert",
    "TableTopEnv", "TaskSpec", "demo_scene", "get_init_states", "get_suite", "get_task", "init_state", "make_env",
]
