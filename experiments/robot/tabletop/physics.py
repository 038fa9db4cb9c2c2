"""Deterministic kinematic physics of TableTop-4.

The robot is a Cartesian gantry: its fingertip centre moves by the commanded delta (clipped), its two
fingers open and close over a few steps. Rules, in the order `step_physics` applies them:
- the tip cannot go below the table or a fixture's surface; a closed, empty gripper is a solid paddle that
  also rests on top of objects it is lowered onto, while an open gripper straddles them;
- the paddle pushes objects it moves into (radially, out of overlap), carrying what rests on them; an object
  the paddle cannot move (a bowl's or basket's wall, below its rim, or another object in the way) stops the
  paddle instead, so the paddle never passes through an object;
- closing fingers grasp an object when they cross its width while the tip is centred on it (within
  GRASP_TOL) and between 4 mm above its base and 90 % of its height; a held object follows the tip;
- opening releases it: it drops onto the highest support under its centre (a fixture's surface or the flat
  top of a cube/cylinder, never a ball), slides off a bowl's or basket's wall to the side its centre is on
  (so "in the bowl" means its whole footprint is inside), then out of overlap with other objects;
- pressing the stove's knob with the closed, empty gripper turns the stove on.
There are no other collisions: an open gripper and a held object pass through bodies sideways (a held object
is lifted onto a support only when it comes from above), and objects are discs for pushing, separating and
walls (their footprints for supporting).
"""

from __future__ import annotations

import numpy as np

from experiments.robot.tabletop.bodies import KNOB_RADIUS, OPEN_FINGER, Body, SceneState

# Bumped whenever a rule changes so that an episode can end differently; part of the identity of cached
# rollouts. 2: bowl and basket walls stop pushed objects (before, shoving one in counted as placing it).
# 3: released objects slide off walls (one on a rim counted as in), separate from every object they overlap,
# always end on what is under them; a blocked push stops the paddle; a held object no longer hops onto
# taller bodies it is moved into sideways. 4: a paddle whose push is refused keeps a height allowed where it
# stays (it could sink into an object there).
PHYSICS_VERSION = 4
MAX_DELTA = 0.03  # metres per step at |action| = 1
WORKSPACE_LOW = np.array([-0.22, -0.22, 0.005])
WORKSPACE_HIGH = np.array([0.22, 0.22, 0.25])
TABLE_HALF = 0.26  # bodies never leave the table
FINGER_SPEED = 0.012  # per step: open → grasp in 2 steps, open → closed in 4
FINGER_LENGTH = 0.045
GRASP_TOL = 0.018
PADDLE_RADIUS = 0.014
CLOSED = 0.01  # fingers below this count as closed
SUPPORT_TOL = 0.02  # a released body lands on a support at most this far above its base


def _radius(b: Body) -> float:
    return max(b.spec.half)


def support_under(s: SceneState, b: Body, max_z: float) -> tuple[str, float]:
    """Highest support (name, surface z) under `b`'s centre whose surface is at most `max_z`."""
    best, best_z = "", 0.0
    x, y = b.pos[0], b.pos[1]
    for c in s.bodies:
        surf = c.spec.surface
        if c is b or surf is None or c.name == s.held or c.support == b.name or not c.contains_xy(x, y):
            continue
        z = c.pos[2] + surf
        if best_z < z <= max_z:
            best, best_z = c.name, z
    return best, best_z


def settle(s: SceneState, b: Body) -> None:
    """Drop `b` onto what is under it, slide it off walls and out of overlaps, and let what rested on it follow."""
    for _ in range(10):
        b.support, b.pos[2] = support_under(s, b, b.pos[2] + SUPPORT_TOL)
        if not b.spec.movable:
            break
        if not (_off_walls(s, b) or _separate(s, b)):
            break
    # the last pass may have moved it sideways: it always ends on what is under it
    b.support, b.pos[2] = support_under(s, b, b.pos[2] + SUPPORT_TOL)
    for c in s.bodies:  # what rests on it follows it down (or falls off)
        if c.support == b.name:
            settle(s, c)


def _walled(c: Body) -> bool:
    """Bowls and baskets: fixtures whose rim stands above their floor (plates, trays, stoves are flat)."""
    return not c.spec.movable and c.spec.surface is not None and c.spec.height - c.spec.surface > SUPPORT_TOL


def _wall_side(c: Body, xy, r: float) -> str:
    """Where a disc of radius `r` centred at `xy` lies against `c`'s wall: "in", "out" or "wall" (across it)."""
    dx, dy = xy[0] - c.pos[0], xy[1] - c.pos[1]
    hx, hy = c.spec.half
    if c.spec.round:
        d = float(np.hypot(dx, dy))
        return "in" if d <= hx - r else "out" if d >= hx + r else "wall"
    if abs(dx) <= hx - r and abs(dy) <= hy - r:
        return "in"
    gap = np.hypot(max(abs(dx) - hx, 0.0), max(abs(dy) - hy, 0.0))  # distance to the rectangle
    return "out" if gap >= r else "wall"


def _below_rim(b: Body, c: Body) -> bool:
    return b.pos[2] < c.top - SUPPORT_TOL


def _off_walls(s: SceneState, b: Body) -> bool:
    """Slide `b` off any wall it lies across (below the rim) to the side its centre is on; True if it moved."""
    moved, r = False, _radius(b)
    for c in s.bodies:
        if not _walled(c) or not _below_rim(b, c) or _wall_side(c, b.pos, r) != "wall":
            continue
        dx, dy = b.pos[0] - c.pos[0], b.pos[1] - c.pos[1]
        hx, hy = c.spec.half
        if c.contains_xy(b.pos[0], b.pos[1]):  # inside: in by its radius (+1 mm, clear of the wall)
            if c.spec.round:
                d = float(np.hypot(dx, dy))
                dx, dy = (dx, dy) if d < 1e-12 else (dx * (hx - r - 1e-3) / d, dy * (hx - r - 1e-3) / d)
            else:
                dx, dy = np.clip(dx, -(hx - r - 1e-3), hx - r - 1e-3), np.clip(dy, -(hy - r - 1e-3), hy - r - 1e-3)
        elif c.spec.round:  # outside: out by its radius
            d = float(np.hypot(dx, dy))
            dx, dy = dx * (hx + r + 1e-3) / d, dy * (hx + r + 1e-3) / d
        else:
            nx, ny = np.clip(dx, -hx, hx), np.clip(dy, -hy, hy)  # nearest point of the rectangle
            ox, oy = dx - nx, dy - ny
            gap = float(np.hypot(ox, oy))
            dx, dy = nx + ox * (r + 1e-3) / gap, ny + oy * (r + 1e-3) / gap
        b.pos[:2] = np.clip((c.pos[0] + dx, c.pos[1] + dy), -TABLE_HALF, TABLE_HALF)
        moved = True
    return moved


def _blocked_by_wall(s: SceneState, b: Body, xy: np.ndarray, spill: bool = False) -> bool:
    """Would moving `b` sideways to `xy` take it into, out of or across a bowl's or basket's wall below the rim?
    With `spill` (over the rim: nothing else has room) only ending across a wall is blocked."""
    r = _radius(b)
    for c in s.bodies:
        if not _walled(c) or not _below_rim(b, c):
            continue  # no wall, or high enough to pass over the rim
        side = _wall_side(c, xy, r)
        if side == "wall" or (not spill and side != _wall_side(c, b.pos, r)):
            return True
    return False


def _overlapping(b: Body, c: Body, xy) -> bool:
    """Do `b` (moved to `xy`) and `c` overlap, as discs, at heights that overlap?"""
    if c is b or not c.spec.movable or c.support == b.name or b.support == c.name:
        return False
    if c.pos[2] >= b.top - 1e-6 or b.pos[2] >= c.top - 1e-6:
        return False
    return float(np.hypot(xy[0] - c.pos[0], xy[1] - c.pos[1])) < _radius(b) + _radius(c) - 1e-6


_TURNS = np.deg2rad([0, 15, -15, 30, -30, 45, -45, 60, -60, 75, -75, 90, -90, 105, -105, 120, -120, 135, -135,
                     150, -150, 165, -165, 180])


def _separate(s: SceneState, b: Body) -> bool:
    """Slide `b` out of overlap by the shortest move to a free spot (clear of every object, not through a wall):
    straight away from the object it overlaps first, then turning and going farther; with no room left in a
    bowl or basket it spills over the rim. True if it moved."""
    others = [c for c in s.bodies if c.name != s.held and c is not b]
    hit = next((c for c in others if _overlapping(b, c, b.pos)), None)
    if hit is None:
        return False
    d = b.pos[:2] - hit.pos[:2]
    dist = float(np.hypot(*d))
    need = _radius(b) + _radius(hit) + 1e-3
    base = np.arctan2(d[1], d[0]) if dist > 1e-9 else 0.0
    for spill in (False, True):
        for extra in np.arange(0.0, 0.2, 0.005):
            for turn in _TURNS:
                u = np.array([np.cos(base + turn), np.sin(base + turn)])
                along = float(d @ u)  # the move along u that puts the centres `need` apart, plus `extra`
                xy = np.clip(b.pos[:2] + u * (-along + np.sqrt(max(need**2 - (dist**2 - along**2), 0.0)) + extra),
                             -TABLE_HALF, TABLE_HALF)
                if any(_overlapping(b, c, xy) for c in others) or _blocked_by_wall(s, b, xy, spill):
                    continue
                b.pos[:2] = xy
                return True
    return False


def _tip_floor(s: SceneState, x: float, y: float, prev_z: float, paddle: bool) -> float:
    """Lowest tip height allowed at (x, y)."""
    floor = WORKSPACE_LOW[2]
    held = s.body(s.held) if s.held else None
    for c in s.bodies:
        if c is held:
            continue
        if not c.spec.movable:  # fixtures are solid at their surface (bowl and basket: their floor)
            if c.spec.surface is not None and c.contains_xy(x, y):
                floor = max(floor, c.pos[2] + c.spec.surface)
        elif paddle and prev_z >= c.top - 1e-9 and np.hypot(x - c.pos[0], y - c.pos[1]) < _radius(c) + PADDLE_RADIUS:
            floor = max(floor, c.top)  # the paddle and objects meet as discs, as in _push
    if held is not None:  # the held body's base stays above what it comes onto from above (as a release lands)
        probe = Body("_probe", held.kind, held.color, (x, y, prev_z - s.grasp_offset))
        _, z = support_under(s, probe, prev_z - s.grasp_offset + SUPPORT_TOL)
        floor = max(floor, z + s.grasp_offset)
    return floor


def _push(s: SceneState) -> bool:
    """Push what the paddle overlaps out of its way; False if something could not move (the paddle must stop)."""
    g = s.gripper_pos
    for b in s.bodies:
        if not b.spec.movable or b.name == s.held:
            continue
        if not (g[2] < b.top - 1e-9 and g[2] + FINGER_LENGTH > b.pos[2]):
            continue
        d = b.pos[:2] - g[:2]
        dist = float(np.hypot(*d))
        need = _radius(b) + PADDLE_RADIUS
        if dist >= need:
            continue
        u = d / dist if dist > 1e-9 else np.array([0.0, 1.0])
        shift = u * (need - dist + 1e-4)
        xy = np.clip(b.pos[:2] + shift, -TABLE_HALF, TABLE_HALF)
        if _blocked_by_wall(s, b, xy) or any(_overlapping(b, c, xy) for c in s.bodies if c.name != s.held):
            return False  # a wall or another object holds it (objects do not push objects)
        riders = [c for c in s.bodies if c.support == b.name]
        b.pos[:2] = xy
        for c in riders:
            c.pos[:2] = np.clip(c.pos[:2] + shift, -TABLE_HALF, TABLE_HALF)
        settle(s, b)
        for c in riders:
            settle(s, c)
    return True


def _grasp_candidate(s: SceneState, new_finger: float) -> Body | None:
    g = s.gripper_pos
    best, best_d = None, np.inf
    for b in s.bodies:
        if not b.spec.graspable:
            continue
        half = b.spec.half[0]
        if not (new_finger <= half <= s.finger):  # fingers must cross the body's width this step
            continue
        dx, dy = abs(g[0] - b.pos[0]), abs(g[1] - b.pos[1])
        if dx > GRASP_TOL or dy > GRASP_TOL:
            continue
        if not (b.pos[2] + 0.004 <= g[2] <= b.pos[2] + 0.9 * b.spec.height):
            continue
        if dx + dy < best_d:
            best, best_d = b, dx + dy
    return best


def _update_fingers(s: SceneState, close: bool) -> None:
    if close:
        if s.held:
            return
        new_finger = max(s.finger - FINGER_SPEED, 0.0)
        b = _grasp_candidate(s, new_finger)
        if b is None:
            s.finger = new_finger
            return
        s.finger, s.held, s.grasp_offset = b.spec.half[0], b.name, float(s.gripper_pos[2] - b.pos[2])
        b.support = ""
        for c in s.bodies:  # whatever rested on it falls
            if c.support == b.name:
                settle(s, c)
        return
    s.finger = min(s.finger + FINGER_SPEED, OPEN_FINGER)
    if s.held:
        b = s.body(s.held)
        s.held = ""
        settle(s, b)


def _press_stoves(s: SceneState) -> None:
    if s.held or s.finger >= CLOSED:
        return
    g = s.gripper_pos
    for b in s.bodies:
        if b.kind == "stove" and g[2] <= b.top + 0.008:
            kx, ky = b.knob_xy()
            if (g[0] - kx) ** 2 + (g[1] - ky) ** 2 <= KNOB_RADIUS**2:
                b.on = True


def step_physics(s: SceneState, action: np.ndarray) -> None:
    """Advance `s` in place by one control step. `action`: (7,) delta xyz in [-1, 1] (scaled by MAX_DELTA),
    3 ignored rotation entries, gripper (> 0 closes)."""
    prev = s.gripper_pos.copy()
    new = np.clip(prev + np.clip(action[:3], -1.0, 1.0) * MAX_DELTA, WORKSPACE_LOW, WORKSPACE_HIGH)
    paddle = not s.held and s.finger < CLOSED
    wanted_z = new[2]
    new[2] = max(wanted_z, _tip_floor(s, new[0], new[1], prev[2], paddle))
    s.gripper_pos = new
    if paddle and not _push(s):  # blocked: the paddle stays where it was sideways (what it pushed this step stays pushed)
        # and its height is floored where it stays, not where it was refused (it must not sink into what is under it)
        new = np.array([prev[0], prev[1], max(wanted_z, _tip_floor(s, prev[0], prev[1], prev[2], paddle))])
        s.gripper_pos = new
    if s.held:
        s.body(s.held).pos[:] = new - (0.0, 0.0, s.grasp_offset)
    _update_fingers(s, bool(action[6] > 0))
    _press_stoves(s)


def goal_done(s: SceneState, verb: str, obj: str, target: str) -> bool:
    b = s.body(obj)
    if verb == "press":
        return b.on
    if b.name == s.held:
        return False
    if verb == "place":
        return rests_in(s, b, target)
    if verb == "push":
        z = s.body(target)
        inside = abs(b.pos[0] - z.pos[0]) <= z.spec.half[0] and abs(b.pos[1] - z.pos[1]) <= z.spec.half[1]
        return bool(b.support == "" and inside)
    raise ValueError(f"unknown goal verb {verb!r}; expected place, push or press")


def rests_in(s: SceneState, b: Body, target: str) -> bool:
    """`b` rests on `target`, or — for a fixture target — on objects that rest on it ("in the basket" holds for
    a ball resting on a cube in the basket; "on the cube" needs direct contact)."""
    if b.support == target:
        return True
    if not s.body(target).spec.movable:
        sup = b.support
        while sup and s.body(sup).spec.movable and s.body(sup).name != s.held:
            sup = s.body(sup).support
            if sup == target:
                return True
    return False


def success(s: SceneState) -> bool:
    return bool(s.goals) and all(goal_done(s, g.verb, g.obj, g.target) for g in s.goals)
