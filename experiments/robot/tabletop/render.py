"""Numpy renderer: a third-person camera and a wrist camera, painter's algorithm, flat shading.

Third-person ("agentview"): orthographic, looking at the table from the robot's side at ELEVATION degrees,
so every axis-aligned box shows its top and front faces as screen-aligned rectangles; a dark disc on the
surface under the gripper marks where it would land. Wrist ("eye_in_hand"): a pinhole camera WRIST_CAM_HEIGHT
above the fingertips looking straight down, so things grow as the gripper descends; the two fingers show at
the sides, how far apart they are, and a held object sits between them. Both images are upright (+y up,
+x right). Images are drawn at `supersample` times the size and box-filtered down (sub-pixel positions).
"""

from __future__ import annotations

import functools
import math

import numpy as np

from experiments.robot.tabletop.bodies import KNOB_RADIUS, PALETTE, Body, SceneState
from experiments.robot.tabletop.physics import FINGER_LENGTH, TABLE_HALF

ELEVATION = 60.0  # degrees
VIEW_HALF_WIDTH = 0.27  # metres of table across half the third-person image
VIEW_CENTER = 0.03  # screen-up coordinate of the image centre (shows a little height at the back)
WRIST_CAM_HEIGHT = 0.12
WRIST_FOCAL = 0.6  # image widths per unit of (lateral offset / depth)
ARM_LENGTH = 0.16  # the drawn wrist column above the tip (short, so it hides little of the table)

BACKGROUND = np.array([70, 78, 92], np.uint8)
TABLE = np.array([200, 186, 156], np.uint8)
FINGER = np.array([165, 172, 200], np.uint8)
PALM = np.array([110, 110, 118], np.uint8)
ARM = np.array([72, 72, 80], np.uint8)
BURNER_OFF = np.array([95, 95, 100], np.uint8)
BURNER_ON = np.array([255, 90, 20], np.uint8)
KNOB = np.array([215, 215, 215], np.uint8)
_SIN, _COS = math.sin(math.radians(ELEVATION)), math.cos(math.radians(ELEVATION))


@functools.cache
def _shade_cached(rgb: tuple[int, int, int], f: float) -> np.ndarray:
    return np.clip(np.asarray(rgb, np.float32) * f, 0, 255).astype(np.uint8)


def _shade(rgb, f: float) -> np.ndarray:
    return _shade_cached(tuple(int(v) for v in rgb), f)


@functools.cache
def _body_rgb(color: str, kind: str) -> np.ndarray:
    rgb = np.asarray(PALETTE[color], np.float32)
    if kind == "zone":  # a painted marking: the colour washed into the table
        rgb = 0.55 * rgb + 0.45 * TABLE
    return rgb.astype(np.uint8)


def body_rgb(b: Body) -> np.ndarray:
    return _body_rgb(b.color, b.kind)


@functools.lru_cache(maxsize=8)
def _pixel_centres(size: int) -> np.ndarray:
    return np.arange(size) + 0.5


@functools.lru_cache(maxsize=8)
def _plain(size: int) -> np.ndarray:
    img = np.empty((size, size, 3), np.uint8)
    img[:] = BACKGROUND
    return img


class Canvas:
    """An (M, M, 3) uint8 image with pixel-centre rasterisation of rectangles and ellipses."""

    def __init__(self, size: int, fill: np.ndarray):
        self.size = size
        self.img = np.empty((size, size, 3), np.uint8)
        np.copyto(self.img, fill)

    def _span(self, lo: float, hi: float) -> tuple[int, int]:
        return max(0, math.ceil(lo - 0.5)), min(self.size, math.ceil(hi - 0.5))

    def rect(self, u0, v0, u1, v1, rgb) -> None:
        c0, c1 = self._span(min(u0, u1), max(u0, u1))
        r0, r1 = self._span(min(v0, v1), max(v0, v1))
        if c0 < c1 and r0 < r1:
            self.img[r0:r1, c0:c1] = rgb

    def ellipse(self, cu, cv, ru, rv, rgb=None, darken: float | None = None) -> None:
        if ru <= 0 or rv <= 0:
            return
        c0, c1 = self._span(cu - ru, cu + ru)
        r0, r1 = self._span(cv - rv, cv + rv)
        if c0 >= c1 or r0 >= r1:
            return
        centres = _pixel_centres(self.size)
        xx = np.square((centres[c0:c1] - cu) * (1.0 / ru))
        yy = np.square((centres[r0:r1] - cv) * (1.0 / rv))
        mask = np.add.outer(yy, xx) <= 1.0
        win = self.img[r0:r1, c0:c1]
        if darken is not None:
            win[mask] = (win[mask] * darken).astype(np.uint8)
        else:
            win[mask] = rgb

    def downsample(self, factor: int) -> np.ndarray:
        if factor == 1:
            return self.img
        n = self.size // factor
        # slice-and-add beats .sum over small axes by ~10x here
        rows = self.img.reshape(n, factor, self.size, 3).astype(np.uint16)
        acc = rows[:, 0].copy()
        for i in range(1, factor):
            acc += rows[:, i]
        cols = acc.reshape(n, n, factor, 3)
        out = cols[:, :, 0].copy()
        for i in range(1, factor):
            out += cols[:, :, i]
        out += factor * factor // 2
        out //= factor * factor
        return out.astype(np.uint8)


def _surface_under(s: SceneState, x: float, y: float, below: float) -> tuple[float, str]:
    """Height and name of the highest surface under (x, y) lower than `below` ("" = table)."""
    best, name = 0.0, ""
    for b in s.bodies:
        if b.name == s.held or not b.contains_xy(x, y):
            continue
        z = b.pos[2] + (b.spec.surface if b.spec.surface is not None else b.spec.height)
        if best < z < below:
            best, name = z, b.name
    return best, name


class AgentView:
    def __init__(self, size: int):
        self.size = size
        self.k = size / (2 * VIEW_HALF_WIDTH)  # pixels per metre (of the canvas being drawn)
        self._bg: dict[tuple, np.ndarray] = {}

    def uv(self, x, y, z) -> tuple[float, float]:
        return (x + VIEW_HALF_WIDTH) * self.k, (VIEW_CENTER + VIEW_HALF_WIDTH - (y * _SIN + z * _COS)) * self.k

    def box(self, cv: Canvas, x, y, z0, z1, hx, hy, top_rgb, front_rgb=None) -> None:
        if front_rgb is not None and z1 > z0:
            ua, va = self.uv(x - hx, y - hy, z0)
            ub, vb = self.uv(x + hx, y - hy, z1)
            cv.rect(ua, va, ub, vb, front_rgb)
        ua, va = self.uv(x - hx, y - hy, z1)
        ub, vb = self.uv(x + hx, y + hy, z1)
        cv.rect(ua, va, ub, vb, top_rgb)

    def disc(self, cv: Canvas, x, y, z, r, rgb=None, darken=None) -> None:
        u, v = self.uv(x, y, z)
        cv.ellipse(u, v, r * self.k, r * _SIN * self.k, rgb, darken)

    def column(self, cv: Canvas, x, y, z0, z1, r, side_rgb) -> None:
        """Side of a vertical cylinder (its bottom half-ellipse and the rectangle up to the top)."""
        self.disc(cv, x, y, z0, r, side_rgb)
        ua, va = self.uv(x - r, y, z0)
        ub, vb = self.uv(x + r, y, z1)
        cv.rect(ua, va, ub, vb, side_rgb)

    def draw_body(self, cv: Canvas, b: Body) -> None:
        x, y, z = b.pos
        spec, rgb = b.spec, body_rgb(b)
        hx, hy = spec.half
        top = z + spec.height
        if b.kind == "ball":
            u, v = self.uv(x, y, z + hx)
            cv.ellipse(u, v, hx * self.k, hx * self.k, _shade(rgb, 0.8))
            cv.ellipse(u - 0.25 * hx * self.k, v - 0.25 * hx * self.k, 0.6 * hx * self.k, 0.6 * hx * self.k,
                       _shade(rgb, 1.0))
        elif spec.round:  # cylinder, bowl, plate
            self.column(cv, x, y, z, top, hx, _shade(rgb, 0.72))
            self.disc(cv, x, y, top, hx, rgb)
            if b.kind == "bowl":
                self.disc(cv, x, y, top, hx - 0.009, _shade(rgb, 0.75))
            elif b.kind == "plate":
                self.disc(cv, x, y, top, 0.65 * hx, _shade(rgb, 0.9))
        else:  # cube, tray, basket, stove, zone
            self.box(cv, x, y, z, top, hx, hy, rgb, _shade(rgb, 0.65))
            if b.kind == "basket":
                self.box(cv, x, y, top, top, hx - 0.01, hy - 0.01, _shade(rgb, 0.55))
            elif b.kind == "stove":
                self.disc(cv, x - 0.01, y + 0.01, top, 0.03, BURNER_ON if b.on else BURNER_OFF)
                kx, ky = b.knob_xy()
                self.disc(cv, kx, ky, top, 0.6 * KNOB_RADIUS, KNOB)

    def draw_gripper(self, cv: Canvas, s: SceneState) -> None:
        gx, gy, gz = s.gripper_pos
        if s.held:
            self.draw_body(cv, s.body(s.held))
        for side in (-1.0, 1.0):
            self.box(cv, gx + side * (s.finger + 0.006), gy, gz, gz + FINGER_LENGTH, 0.006, 0.01, FINGER,
                     _shade(FINGER, 0.8))
        self.box(cv, gx, gy, gz + FINGER_LENGTH, gz + FINGER_LENGTH + 0.015, 0.058, 0.016, PALM, _shade(PALM, 0.8))
        self.box(cv, gx, gy, gz + FINGER_LENGTH + 0.015, gz + ARM_LENGTH, 0.01, 0.01, ARM, ARM)

    def _background(self, m: int, fixtures: list[Body]) -> np.ndarray:
        """Table and fixtures, drawn once and reused while they stay the same (they never move)."""
        key = (m, tuple((b.name, b.kind, b.color, *b.pos.tolist(), b.on) for b in fixtures))
        if key not in self._bg:
            if len(self._bg) > 8:
                self._bg.clear()
            cv = Canvas(m, _plain(m))
            self.box(cv, 0.0, 0.0, -0.02, 0.0, TABLE_HALF, TABLE_HALF, TABLE, _shade(TABLE, 0.6))
            for b in fixtures:
                self.draw_body(cv, b)
            self._bg[key] = cv.img
        return self._bg[key]

    def render(self, s: SceneState, supersample: int = 2) -> np.ndarray:
        m = self.size * supersample
        self.k = m / (2 * VIEW_HALF_WIDTH)
        fixtures = sorted((b for b in s.bodies if not b.spec.movable), key=lambda b: -b.pos[1])
        cv = Canvas(m, self._background(m, fixtures))
        gx, gy, gz = s.gripper_pos
        shadow_z, shadow_on = _surface_under(s, gx, gy, gz)
        movable = [b for b in s.bodies if b.spec.movable and b.name != s.held]
        # painter's order: far (large y, low z) first; the gripper group sorts by its tip
        items = [(b.pos[1] * _COS - b.pos[2] * _SIN, b) for b in movable]
        items.append((gy * _COS - gz * _SIN, None))
        items.sort(key=lambda t: -t[0])
        if shadow_on == "" or not s.body(shadow_on).spec.movable:
            self.disc(cv, gx, gy, shadow_z, 0.028, darken=0.55)
        for _, b in items:
            if b is None:
                self.draw_gripper(cv, s)
                continue
            self.draw_body(cv, b)
            if b.name == shadow_on:
                self.disc(cv, gx, gy, shadow_z, 0.028, darken=0.55)
        return cv.downsample(supersample)


class WristView:
    def __init__(self, size: int):
        self.size = size

    def render(self, s: SceneState, supersample: int = 2) -> np.ndarray:
        m = self.size * supersample
        cv = Canvas(m, _plain(m))
        f = WRIST_FOCAL * m
        cx, cy, cz = s.gripper_pos[0], s.gripper_pos[1], s.gripper_pos[2] + WRIST_CAM_HEIGHT

        def rect(x, y, z, hx, hy, rgb):
            d = cz - z
            if d > 0.005:
                k = f / d
                cv.rect(m / 2 + k * (x - hx - cx), m / 2 - k * (y + hy - cy), m / 2 + k * (x + hx - cx),
                        m / 2 - k * (y - hy - cy), rgb)

        def disc(x, y, z, r, rgb):
            d = cz - z
            if d > 0.005:
                k = f / d
                cv.ellipse(m / 2 + k * (x - cx), m / 2 - k * (y - cy), k * r, k * r, rgb)

        rect(0.0, 0.0, 0.0, TABLE_HALF, TABLE_HALF, TABLE)
        visible = [b for b in s.bodies if b.name != s.held]
        visible.sort(key=lambda b: (b.spec.movable, b.top))
        if s.held:
            visible.append(s.body(s.held))
        for b in visible:
            x, y, z = b.pos
            spec, rgb = b.spec, body_rgb(b)
            hx, hy = spec.half
            top = z + spec.height
            if b.kind == "ball":
                disc(x, y, z + hx, hx, rgb)
            elif spec.round:
                disc(x, y, top, hx, rgb)
                if b.kind == "bowl":
                    disc(x, y, z + spec.surface, hx - 0.009, _shade(rgb, 0.75))
                elif b.kind == "plate":
                    disc(x, y, top, 0.65 * hx, _shade(rgb, 0.9))
            else:
                rect(x, y, top, hx, hy, rgb)
                if b.kind == "basket":
                    rect(x, y, z + spec.surface, hx - 0.01, hy - 0.01, _shade(rgb, 0.55))
                elif b.kind == "stove":
                    disc(x - 0.01, y + 0.01, top, 0.03, BURNER_ON if b.on else BURNER_OFF)
                    kx, ky = b.knob_xy()
                    disc(kx, ky, top, 0.6 * KNOB_RADIUS, KNOB)
        # fingers: vertical bars seen from above, spanning their tip (inner) to their root (outer)
        d_tip, d_root = WRIST_CAM_HEIGHT, WRIST_CAM_HEIGHT - FINGER_LENGTH
        off = s.finger + 0.006
        for side in (-1.0, 1.0):
            inner = side * (off - 0.006) * f / d_tip
            outer = side * (off + 0.006) * f / d_root
            half_v = 0.01 * f / d_root
            cv.rect(m / 2 + inner, m / 2 - half_v, m / 2 + outer, m / 2 + half_v, FINGER)
        return cv.downsample(supersample)
