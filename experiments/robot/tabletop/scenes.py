"""Sampling scenes from layouts: base positions + random shift and per-body jitter, with bodies
kept apart and settled onto what they start on."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from experiments.robot.tabletop.bodies import Body, SceneState
from experiments.robot.tabletop.physics import settle

GRIPPER_HOME = (0.0, -0.16, 0.15)
PLACE_LIMIT = 0.2  # body centres stay within ±PLACE_LIMIT (the gripper reaches ±0.22)
CLEARANCE = 0.012  # minimum gap between footprints (as circles) of bodies on the table


@dataclass(frozen=True)
class Spec:
    """A body in a layout: base position (x, y), or on top of / inside the body named `on`."""

    name: str
    kind: str
    color: str
    x: float = 0.0
    y: float = 0.0
    on: str = ""


def _radius(b: Body) -> float:
    return max(b.spec.half)


def layout_clear(bodies: list[Body], on: dict[str, str]) -> bool:
    """Bodies on the table (`on[name]` empty) lie within ±PLACE_LIMIT and keep CLEARANCE apart."""
    ground = [b for b in bodies if not on[b.name]]
    for i, a in enumerate(ground):
        if np.abs(a.pos[:2]).max() > PLACE_LIMIT:
            return False
        for b in ground[i + 1:]:
            if a.kind == "zone" or b.kind == "zone":
                need = 0.0 if a.spec.movable or b.spec.movable else _radius(a) + _radius(b)
            else:
                need = _radius(a) + _radius(b) + CLEARANCE
            if np.hypot(*(a.pos[:2] - b.pos[:2])) < need:
                return False
    return True


def sample_scene(rng: np.random.Generator, specs: list[Spec], *, jitter: float = 0.012, shift: float = 0.02,
                 tries: int = 200) -> SceneState:
    """Bodies at their base positions, the whole layout shifted by up to ±`shift`, each body jittered by up
    to ±`jitter`; resampled until bodies on the table keep CLEARANCE apart. Goals are left empty (the task
    sets them)."""
    names = [s.name for s in specs]
    for _ in range(tries):
        offset = rng.uniform(-shift, shift, 2)
        bodies, on = [], {}
        for s in specs:
            if s.on:
                parent = bodies[names.index(s.on)]
                xy = parent.pos[:2] + rng.uniform(-0.3, 0.3, 2) * np.array(parent.spec.half) * 0.5
            else:
                xy = np.array([s.x, s.y]) + offset + rng.uniform(-jitter, jitter, 2)
            bodies.append(Body(s.name, s.kind, s.color, (xy[0], xy[1], 0.0)))
            on[s.name] = s.on
        if layout_clear(bodies, on):
            break
    else:
        raise RuntimeError(f"could not place {names} apart in {tries} tries; the layout is too tight")
    gripper = np.array(GRIPPER_HOME) + rng.uniform(-0.01, 0.01, 3)
    scene = SceneState(bodies=bodies, gripper_pos=gripper)
    for b in bodies:  # bodies that start on another wait above the table until their turn
        b.pos[2] = 1.0 if on[b.name] else 0.0
    for b in bodies:  # specs list parents first, so settling in order stacks correctly
        settle(scene, b)
        if on[b.name] and b.support != on[b.name]:
            raise RuntimeError(f"{b.name} should start on {on[b.name]} but settled on {b.support or 'the table'}")
    return scene
