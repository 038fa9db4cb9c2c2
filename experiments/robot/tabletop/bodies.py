"""Body kinds, sizes and colours of TableTop-4, and the scene state the simulator evolves.

World frame (metres): x to the right and y away from the robot as seen by the third-person camera, z up;
the table top is z = 0. All bodies are axis-aligned and never rotate. A body's `pos` is the centre of its
base. Words used for kinds and colours are all in the tiny tokenizer's vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Kind:
    half: tuple[float, float]  # footprint half extents (x, y); round kinds use half[0] as the radius
    height: float
    round: bool
    graspable: bool
    # height above the base where something released over the body comes to rest (None: not a support)
    surface: float | None
    movable: bool


KINDS: dict[str, Kind] = {
    # graspable objects; balls cannot carry anything (a released object slides off them)
    "cube": Kind((0.025, 0.025), 0.05, False, True, 0.05, True),
    "ball": Kind((0.026, 0.026), 0.052, True, True, None, True),
    "cylinder": Kind((0.022, 0.022), 0.06, True, True, 0.06, True),
    # fixtures: receptacles and markings, fixed to the table
    "bowl": Kind((0.058, 0.058), 0.035, True, False, 0.008, False),
    "plate": Kind((0.062, 0.062), 0.012, True, False, 0.012, False),
    "tray": Kind((0.075, 0.055), 0.015, False, False, 0.015, False),
    "basket": Kind((0.065, 0.065), 0.05, False, False, 0.008, False),
    "stove": Kind((0.055, 0.055), 0.014, False, False, 0.014, False),
    "zone": Kind((0.05, 0.05), 0.0, False, False, None, False),
}
OBJECT_KINDS = ("cube", "ball", "cylinder")

# Colours far apart in RGB so that a 64-px image tells them apart. Fixture colours are fixed per kind.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (45, 80, 225),
    "yellow": (235, 205, 30),
    "purple": (135, 55, 185),
    "orange": (245, 130, 20),
    "pink": (245, 135, 190),
    "cyan": (35, 205, 215),
    "black": (25, 25, 30),
    "brown": (125, 70, 30),
    "white": (240, 240, 240),
    "gray": (125, 125, 130),
}
OBJECT_COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "pink", "cyan", "black", "brown")
FIXTURE_COLORS = {"bowl": "white", "plate": "white", "tray": "gray", "basket": "brown", "stove": "black"}

# Stove knob: pressing it with the closed gripper turns the stove on.
KNOB_OFFSET = (0.035, -0.035)
KNOB_RADIUS = 0.02


@dataclass
class Body:
    name: str  # unique within a scene, e.g. "red_cube" or "cube_1"; never shown to the policy
    kind: str
    color: str
    pos: np.ndarray  # (3,) centre of the base
    support: str = ""  # name of the body it rests on/in; "" = the table (or held)
    on: bool = False  # stoves only: switched on

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"body {self.name!r}: unknown kind {self.kind!r}; expected one of {sorted(KINDS)}")
        if self.color not in PALETTE:
            raise ValueError(f"body {self.name!r}: unknown colour {self.color!r}; expected one of {sorted(PALETTE)}")
        self.pos = np.asarray(self.pos, dtype=np.float64).reshape(3).copy()

    @property
    def spec(self) -> Kind:
        return KINDS[self.kind]

    @property
    def top(self) -> float:
        return float(self.pos[2]) + self.spec.height

    @property
    def label(self) -> str:
        """How instructions name the body: "red cube", or just "bowl" for fixtures."""
        return self.kind if self.kind in FIXTURE_COLORS else f"{self.color} {self.kind}"

    def contains_xy(self, x: float, y: float, margin: float = 0.0) -> bool:
        dx, dy = x - self.pos[0], y - self.pos[1]
        hx, hy = self.spec.half
        if self.spec.round:
            return dx * dx + dy * dy <= (hx + margin) ** 2
        return abs(dx) <= hx + margin and abs(dy) <= hy + margin

    def knob_xy(self) -> tuple[float, float]:
        return float(self.pos[0] + KNOB_OFFSET[0]), float(self.pos[1] + KNOB_OFFSET[1])

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "color": self.color, "pos": [float(v) for v in self.pos],
                "support": self.support, "on": self.on}

    @classmethod
    def from_dict(cls, d: dict) -> Body:
        return cls(d["name"], d["kind"], d["color"], np.asarray(d["pos"], np.float64), d.get("support", ""),
                   bool(d.get("on", False)))


@dataclass(frozen=True)
class Goal:
    """One sub-goal. verb "place": `obj` rests on/in `target`; "push": `obj` lies inside the zone `target`;
    "press": the stove `obj` is on (`target` unused)."""

    verb: str
    obj: str
    target: str = ""

    def to_dict(self) -> dict:
        return {"verb": self.verb, "obj": self.obj, "target": self.target}


OPEN_FINGER = 0.04  # finger position when fully open (LIBERO's Panda: ≈ 0.04)


@dataclass
class SceneState:
    """Everything the simulator needs: bodies, gripper (tip position, finger position, held body) and the
    goals of the task the scene was sampled for."""

    bodies: list[Body]
    gripper_pos: np.ndarray  # (3,) fingertip centre
    finger: float = OPEN_FINGER  # each finger's distance from the centre line, 0 (closed) .. OPEN_FINGER
    held: str = ""  # name of the held body, "" when empty
    grasp_offset: float = 0.0  # tip z minus held body's base z, fixed at grasp time
    goals: tuple[Goal, ...] = field(default_factory=tuple)

    def __post_init__(self):
        self.gripper_pos = np.asarray(self.gripper_pos, dtype=np.float64).reshape(3).copy()
        names = [b.name for b in self.bodies]
        if len(set(names)) != len(names):
            raise ValueError(f"body names must be unique, got {names}")
        self._index = {b.name: b for b in self.bodies}
        for g in self.goals:
            for n in (g.obj, g.target):
                if n and n not in self._index:
                    raise ValueError(f"goal {g} names body {n!r}, which is not in the scene {names}")

    def body(self, name: str) -> Body:
        try:
            return self._index[name]
        except KeyError:
            raise KeyError(f"no body {name!r} in the scene; bodies: {sorted(self._index)}") from None

    def copy(self) -> SceneState:
        return SceneState.from_dict(self.to_dict())

    def to_dict(self) -> dict:
        return {
            "bodies": [b.to_dict() for b in self.bodies],
            "gripper_pos": [float(v) for v in self.gripper_pos],
            "finger": float(self.finger),
            "held": self.held,
            "grasp_offset": float(self.grasp_offset),
            "goals": [g.to_dict() for g in self.goals],
        }

    @classmethod
    def from_dict(cls, d: dict) -> SceneState:
        return cls(
            bodies=[Body.from_dict(b) for b in d["bodies"]],
            gripper_pos=np.asarray(d["gripper_pos"], np.float64),
            finger=float(d["finger"]),
            held=d["held"],
            grasp_offset=float(d["grasp_offset"]),
            goals=tuple(Goal(**g) for g in d["goals"]),
        )

    def vector(self) -> np.ndarray:
        """Flat float state (gripper xyz, finger, then each body's xyz and on-flag), for logging in HDF5."""
        parts = [self.gripper_pos, [self.finger]]
        parts += [np.append(b.pos, float(b.on)) for b in self.bodies]
        return np.concatenate(parts).astype(np.float32)
