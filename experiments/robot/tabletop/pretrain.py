"""Vision-language pretraining pool: random TableTop scenes with captions and question/answer pairs.

The scenes are random compositions (1-4 objects of any colour and kind, 1-3 fixtures, objects sometimes on or
in things, the stove on or off, the gripper anywhere, open or closed, sometimes holding an object) drawn from
their own seed stream, so they are disjoint from every suite's evaluation and demonstration scenes. All text
uses only words of the tiny tokenizer's vocabulary (language.py).

File format (one HDF5 file, default `<out_dir>/pretrain/tabletop4_pretrain.hdf5`):
    images      (N, 2, H, W, 3) uint8   [third-person, wrist] per scene, upright
    prompts     (M,) utf-8 strings      a question, or language.CAPTION_PROMPT for captions
    targets     (M,) utf-8 strings      the answer / caption
    kinds       (M,) utf-8 strings      "qa" or "caption"
    scene       (M,) int32              the row of `images` each text is about
    attrs: format = "tabletop4-pretrain", tabletop_version, pool_version, physics_version, num_scenes, image_size,
           supersample, seed, texts_per_scene, cameras = ["agentview", "eye_in_hand"], mergevla_images_upright = True
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from experiments.robot.tabletop.bodies import FIXTURE_COLORS, OBJECT_COLORS, OBJECT_KINDS, OPEN_FINGER, Body, SceneState
from experiments.robot.tabletop.demos import TABLETOP_VERSION, attrs_dict, create_h5
from experiments.robot.tabletop.language import scene_texts
from experiments.robot.tabletop.physics import PADDLE_RADIUS, PHYSICS_VERSION
from experiments.robot.tabletop.render import AgentView, WristView
from experiments.robot.tabletop.scenes import PLACE_LIMIT, Spec, layout_clear, sample_scene
from experiments.robot.tabletop.suites import SEED_DOMAIN, SPLIT_PRETRAIN

FORMAT = "tabletop4-pretrain"
# Bumped whenever the scenes or texts drawn for a seed change. 2: closed fingers rest on an object, not inside
# it (pools written before have no pool_version).
POOL_VERSION = 2
SUPERSAMPLE = 2  # pools render at this multiple and box-filter down (anti-aliasing)
FIXTURE_CHOICES = ("bowl", "plate", "tray", "basket", "stove", "zone")
ZONE_COLORS = ("green", "yellow", "blue", "red")
CONTAINERS = ("bowl", "plate", "tray", "basket", "stove")


def pretrain_scene(rng: np.random.Generator) -> SceneState:
    n_fix = int(rng.integers(1, 4))
    kinds = [FIXTURE_CHOICES[int(i)] for i in rng.choice(len(FIXTURE_CHOICES), n_fix, replace=False)]
    specs = []
    for k in kinds:
        if k == "zone":
            c = ZONE_COLORS[int(rng.integers(len(ZONE_COLORS)))]
            specs.append(Spec(f"{c}_zone", "zone", c, 0.0, 0.0))
        else:
            specs.append(Spec(k, k, FIXTURE_COLORS[k], 0.0, 0.0))
    pairs = [(c, k) for c in OBJECT_COLORS for k in OBJECT_KINDS]
    n_obj = int(rng.integers(1, 5))
    free_supports = [s.name for s in specs if s.kind in CONTAINERS]
    for i in rng.choice(len(pairs), n_obj, replace=False):
        color, kind = pairs[int(i)]
        on = ""
        r = rng.random()
        if r < 0.3 and free_supports:
            on = free_supports.pop(int(rng.integers(len(free_supports))))
        elif r < 0.4:
            used = {s.on for s in specs}
            flat = [s.name for s in specs if s.kind in ("cube", "cylinder") and not s.on and s.name not in used]
            if flat:
                on = flat[int(rng.integers(len(flat)))]
        specs.append(Spec(f"{color}_{kind}", kind, color, 0.0, 0.0, on=on))
    s = sample_scene(rng, _spread(rng, specs), jitter=0.0, shift=0.0, tries=1)
    for b in s.bodies:
        if b.kind == "stove":
            b.on = bool(rng.random() < 0.5)
    s.gripper_pos = np.array([*rng.uniform(-0.2, 0.2, 2), rng.uniform(0.03, 0.2)])
    s.finger = float(rng.choice([0.0, 0.02, 0.04]))
    if s.finger < OPEN_FINGER:  # closed fingers cannot be inside an object: they rest on top of it
        for b in s.bodies:
            inside = np.hypot(*(s.gripper_pos[:2] - b.pos[:2])) < max(b.spec.half) + PADDLE_RADIUS
            if b.spec.movable and inside and b.pos[2] <= s.gripper_pos[2] < b.top:
                s.gripper_pos[2] = b.top
    loose = [b for b in s.bodies if b.spec.graspable and not any(c.support == b.name for c in s.bodies)]
    if loose and rng.random() < 0.25:  # holding something
        b = loose[int(rng.integers(len(loose)))]
        s.held, s.grasp_offset, s.finger = b.name, 0.5 * b.spec.height, b.spec.half[0]
        s.gripper_pos[2] = max(s.gripper_pos[2], 0.12)
        b.support = ""
        b.pos[:] = s.gripper_pos - (0.0, 0.0, s.grasp_offset)
    return s


def _spread(rng: np.random.Generator, specs: list[Spec]) -> list[Spec]:
    """Random positions, one body at a time, each kept clear of those already placed."""
    placed: list[Body] = []
    out = []
    for sp in specs:
        for _ in range(1000):
            x, y = rng.uniform(-PLACE_LIMIT, PLACE_LIMIT, 2)
            trial = Body(sp.name, sp.kind, sp.color, (x, y, 0.0))
            if sp.on or layout_clear([*placed, trial], {b.name: "" for b in [*placed, trial]}):
                break
        else:
            raise RuntimeError(f"no room left on the table for {sp.name}")
        if not sp.on:
            placed.append(trial)
        out.append(Spec(sp.name, sp.kind, sp.color, float(x), float(y), sp.on))
    return out


def pretrain_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([SEED_DOMAIN, SPLIT_PRETRAIN, seed, index]))


def write_pretrain_pool(path: Path, num_scenes: int, seed: int, image_size: int = 64, supersample: int = SUPERSAMPLE,
                        texts_per_scene: int = 8, compression: dict | None = None) -> dict:
    """Render `num_scenes` scenes and their texts into `path` (a temporary path; the caller renames it)."""
    agent, wrist = AgentView(image_size), WristView(image_size)
    images = np.empty((num_scenes, 2, image_size, image_size, 3), np.uint8)
    prompts, targets, kinds, scene = [], [], [], []
    for i in range(num_scenes):
        rng = pretrain_rng(seed, i)
        s = pretrain_scene(rng)
        images[i, 0] = agent.render(s, supersample)
        images[i, 1] = wrist.render(s, supersample)
        for kind, prompt, target in scene_texts(s, rng, texts_per_scene):
            kinds.append(kind)
            prompts.append(prompt)
            targets.append(target)
            scene.append(i)
    text = h5py.string_dtype("utf-8")
    identity = pool_identity(num_scenes, seed, image_size, supersample, texts_per_scene)
    with create_h5(path) as f:
        f.create_dataset("images", data=images, track_times=False, **(compression or {}))
        f.create_dataset("prompts", data=np.array(prompts, dtype=object), dtype=text, track_times=False)
        f.create_dataset("targets", data=np.array(targets, dtype=object), dtype=text, track_times=False)
        f.create_dataset("kinds", data=np.array(kinds, dtype=object), dtype=text, track_times=False)
        f.create_dataset("scene", data=np.array(scene, np.int32), track_times=False)
        for k, v in identity.items():
            f.attrs[k] = v
        f.attrs["cameras"] = ["agentview", "eye_in_hand"]
        f.attrs["mergevla_images_upright"] = True
    return {"scenes": num_scenes, "texts": len(targets)}


def pool_identity(num_scenes: int, seed: int, image_size: int = 64, supersample: int = SUPERSAMPLE,
                  texts_per_scene: int = 8) -> dict:
    """The attrs that decide a pool's contents; a pool file whose attrs differ holds other scenes or texts."""
    return {"format": FORMAT, "tabletop_version": TABLETOP_VERSION, "pool_version": POOL_VERSION,
            "physics_version": PHYSICS_VERSION,  # the rules its scenes were laid out by
            "num_scenes": num_scenes, "image_size": image_size, "supersample": supersample, "seed": seed,
            "texts_per_scene": texts_per_scene}


def pool_mismatches(path: Path | str, identity: dict) -> list[str]:
    """'field: file has X, expected Y' for every identity attr of the pool at `path` that differs."""
    with h5py.File(path, "r") as f:
        have = attrs_dict(f.attrs)
    return [f"{k}: file has {have.get(k, 'nothing')!r}, expected {v!r}" for k, v in identity.items() if have.get(k) != v]


def read_pretrain_pool(path: Path | str) -> dict:
    """{"images": (N, 2, H, W, 3) uint8, "prompts"/"targets"/"kinds": list[str], "scene": (M,) int, "attrs"}."""
    path = Path(path)
    with h5py.File(path, "r") as f:
        if f.attrs.get("format") != FORMAT:
            raise ValueError(f"{path}: not a TableTop-4 pretraining pool (attrs['format'] != {FORMAT!r})")
        out = {k: [x.decode() for x in f[k][()]] for k in ("prompts", "targets", "kinds")}
        out["images"] = f["images"][()]
        out["scene"] = f["scene"][()]
        out["attrs"] = attrs_dict(f.attrs)
    return out
