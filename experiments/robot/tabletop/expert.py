"""Scripted, state-based expert: solves every TableTop-4 task from the simulator state.

It works on the first unmet goal and is mostly reactive (re-plans from the state each step), with one bit
of memory: whether it is in the middle of closing the fingers on an object. Moves are a proportional
controller per axis (exact within one step, saturating at |action| = 1), plus Gaussian noise of `noise`
(in action units; 0.1 ≈ 3 mm) on the three position entries, so demonstrations are not all identical.
"""

from __future__ import annotations

import numpy as np

from experiments.robot.tabletop.bodies import OPEN_FINGER, Body, SceneState
from experiments.robot.tabletop.physics import CLOSED, MAX_DELTA, PADDLE_RADIUS, goal_done

OPEN, CLOSE = -1.0, 1.0
# tip height for moving sideways: what the expert holds clears the bodies its routes pass over (a test follows the
# object and long suites); not every stack a task can build (a cube on a cylinder on a plate tops out at 0.122)
SAFE_Z = 0.085
ALIGN = 0.008  # xy error below which the expert descends
PUSH_Z = 0.02
PUSH_STEP = 0.02  # how far each step shoves the object; short steps keep it on the line to the zone


def _free_spot(s: SceneState, target: Body, obj: Body) -> tuple[float, float]:
    """Where to release `obj` over `target`: its centre, or for a fixture already holding objects the spot
    inside it farthest from them (so the new object lands beside them, not on top)."""
    cx, cy = float(target.pos[0]), float(target.pos[1])
    residents = [b for b in s.bodies if b.support == target.name and b is not obj]
    if target.spec.movable or not residents:
        return cx, cy
    hx, hy = target.spec.half
    r = max(obj.spec.half) + 0.004  # a margin for the noise, clear of the wall
    if target.spec.round:  # the rim's circle shrunk by the object's radius, and the centre
        angles = np.arange(8) * np.pi / 4
        spots = [(cx, cy)] + [(cx + (hx - r) * np.cos(a), cy + (hx - r) * np.sin(a)) for a in angles]
    else:
        spots = [(cx + fx * (hx - r), cy + fy * (hy - r)) for fx in (-1, 0, 1) for fy in (-1, 0, 1)]
    return max(spots, key=lambda p: min(np.hypot(p[0] - b.pos[0], p[1] - b.pos[1]) for b in residents))


class ScriptedExpert:
    def __init__(self, noise: float = 0.1, rng: np.random.Generator | None = None):
        if noise < 0:
            raise ValueError(f"noise must be >= 0, got {noise}")
        self.noise = noise
        self.rng = rng if rng is not None else np.random.default_rng(0)
        self.closing = False

    def reset(self) -> None:
        self.closing = False

    def act(self, s: SceneState) -> np.ndarray:
        goal = next((g for g in s.goals if not goal_done(s, g.verb, g.obj, g.target)), None)
        if goal is None:
            a = self._move(s, s.gripper_pos, OPEN if not s.held else CLOSE)
        elif goal.verb == "place":
            a = self._place(s, s.body(goal.obj), s.body(goal.target))
        elif goal.verb == "push":
            a = self._push(s, s.body(goal.obj), s.body(goal.target))
        else:
            a = self._press(s, s.body(goal.obj))
        if self.noise:
            a[:3] += self.rng.normal(0.0, self.noise, 3)
        a[:3] = np.clip(a[:3], -1.0, 1.0)
        return a

    @staticmethod
    def _move(s: SceneState, target, grip: float, straight: bool = False) -> np.ndarray:
        """Towards `target`: clipped per axis, or (`straight`) scaled as a whole to keep the direction."""
        a = np.zeros(7)
        d = (np.asarray(target, np.float64) - s.gripper_pos) / MAX_DELTA
        a[:3] = d / max(1.0, float(np.abs(d).max())) if straight else np.clip(d, -1.0, 1.0)
        a[6] = grip
        return a

    def _lift_and_open(self, s: SceneState) -> np.ndarray:
        g = s.gripper_pos
        return self._move(s, (g[0], g[1], max(g[2], SAFE_Z)), OPEN)

    def _place(self, s: SceneState, obj: Body, target: Body) -> np.ndarray:
        g = s.gripper_pos
        if s.held and s.held != obj.name:
            return self._lift_and_open(s)
        if s.held == obj.name:
            self.closing = False
            surface = target.pos[2] + target.spec.surface
            release = surface + 0.012 + s.grasp_offset
            travel = max(release + 0.02, SAFE_Z + s.grasp_offset - 0.01)
            tx, ty = _free_spot(s, target, obj)
            far = np.hypot(tx - g[0], ty - g[1])
            if far > ALIGN:
                if g[2] < travel - 0.02 and far > 0.03:  # lift clear before moving sideways
                    return self._move(s, (g[0], g[1], travel), CLOSE)
                return self._move(s, (tx, ty, travel), CLOSE)
            if g[2] > release + 0.006:
                return self._move(s, (tx, ty, release), CLOSE)
            return self._move(s, (tx, ty, release), OPEN)
        grasp = obj.pos[2] + 0.5 * obj.spec.height
        hover = obj.top + 0.03
        ox, oy = obj.pos[0], obj.pos[1]
        if self.closing:
            if s.finger > 0.004:
                return self._move(s, (ox, oy, grasp), CLOSE)
            self.closing = False  # closed on nothing: open and try again
        if s.finger < OPEN_FINGER - 1e-9:
            return self._move(s, (ox, oy, max(g[2], hover)), OPEN)
        if np.hypot(ox - g[0], oy - g[1]) > ALIGN:
            return self._move(s, (ox, oy, max(hover, min(g[2], SAFE_Z + 0.02)) if g[2] > hover else hover), OPEN)
        if abs(g[2] - grasp) > 0.006:
            return self._move(s, (ox, oy, grasp), OPEN)
        self.closing = True
        return self._move(s, (ox, oy, grasp), CLOSE)

    def _close_high(self, s: SceneState, xy) -> np.ndarray | None:
        """Close the fingers, but only above every grasp zone (so nothing gets picked up by mistake)."""
        self.closing = False
        if s.held:
            return self._lift_and_open(s)
        if s.finger >= CLOSED:
            g = s.gripper_pos
            if g[2] < SAFE_Z - 0.005:
                return self._move(s, (g[0], g[1], SAFE_Z), OPEN)
            return self._move(s, (xy[0], xy[1], SAFE_Z), CLOSE)
        return None

    def _push(self, s: SceneState, obj: Body, zone: Body) -> np.ndarray:
        g = s.gripper_pos
        to_goal = zone.pos[:2] - obj.pos[:2]
        dist = float(np.hypot(*to_goal))
        u = to_goal / max(dist, 1e-9)
        contact = max(obj.spec.half) + PADDLE_RADIUS
        behind = obj.pos[:2] - u * (contact + 0.012)
        a = self._close_high(s, behind)
        if a is not None:
            return a
        rel = g[:2] - obj.pos[:2]
        along = float(rel @ u)
        lateral = float(np.hypot(*(rel - along * u)))
        if g[2] > PUSH_Z + 0.01:
            if np.hypot(*(g[:2] - behind)) > ALIGN:
                return self._move(s, (behind[0], behind[1], max(SAFE_Z, min(g[2], SAFE_Z + 0.02))), CLOSE)
            return self._move(s, (behind[0], behind[1], PUSH_Z), CLOSE)
        if along < -0.4 * contact and lateral < 0.7 * contact:  # behind it: push towards the zone
            xy = obj.pos[:2] - u * (contact - min(PUSH_STEP, dist))
            return self._move(s, (xy[0], xy[1], PUSH_Z), CLOSE, straight=True)
        return self._move(s, (g[0], g[1], SAFE_Z), CLOSE)  # lost contact: go back up and line up again

    def _press(self, s: SceneState, stove: Body) -> np.ndarray:
        kx, ky = stove.knob_xy()
        a = self._close_high(s, (kx, ky))
        if a is not None:
            return a
        g = s.gripper_pos
        if np.hypot(kx - g[0], ky - g[1]) > ALIGN:
            return self._move(s, (kx, ky, max(stove.top + 0.03, min(g[2], SAFE_Z))), CLOSE)
        return self._move(s, (kx, ky, stove.top - 0.01), CLOSE)
