"""Words: the tiny tokenizer's vocabulary, and scene captions / questions for VLM pretraining.

The tiny config's word-level tokenizer maps unknown words to <unk>, so every instruction, caption, question
and answer here is built only from words in prismatic/models/tiny_vocab.txt (checked by `unknown_words`
and by the tests). The vocabulary file is read directly so that importing this module stays cheap.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np

import prismatic
from experiments.robot.tabletop.bodies import Body, SceneState

VOCAB_FILE = Path(prismatic.__file__).parent / "models" / "tiny_vocab.txt"
_WORDS = re.compile(r"\w+|[^\w\s]+")  # what the tokenizers library's Whitespace pre-tokenizer splits on
NUMBERS = ("no", "one", "two", "three", "four")
CAPTION_PROMPT = "what is in the scene ?"


@functools.lru_cache(maxsize=1)
def vocabulary() -> frozenset[str]:
    lines = VOCAB_FILE.read_text().splitlines()
    return frozenset(w.strip().lower() for w in lines if w.strip() and not w.startswith("#"))


def unknown_words(text: str) -> list[str]:
    """Tokens of `text` that the tiny tokenizer would map to <unk>."""
    vocab = vocabulary()
    return [w for w in _WORDS.findall(text.lower()) if w not in vocab]


def _the(b: Body) -> str:
    return f"the {b.label}"


def relation(a: Body, b: Body) -> str | None:
    """Where `a` is relative to `b` as the third-person camera sees it, when clear; else None."""
    dx, dy = a.pos[0] - b.pos[0], a.pos[1] - b.pos[1]
    if max(abs(dx), abs(dy)) < 0.06:
        return None
    if abs(dx) >= 1.5 * abs(dy):
        return "left of" if dx < 0 else "right of"
    if abs(dy) >= 1.5 * abs(dx):
        return "in front of" if dy < 0 else "behind"
    return None


def place_phrase(s: SceneState, b: Body) -> str | None:
    """"in the bowl", "on the red cube", "in the gripper", "in the green zone" … or None (on the table)."""
    if s.held == b.name:
        return "in the gripper"
    if b.support:
        sup = s.body(b.support)
        return f"{'in' if sup.kind in ('bowl', 'basket') else 'on'} {_the(sup)}"
    for z in s.bodies:
        if z.kind == "zone" and abs(b.pos[0] - z.pos[0]) <= z.spec.half[0] and abs(b.pos[1] - z.pos[1]) <= z.spec.half[1]:
            return f"in {_the(z)}"
    return None


def scene_texts(s: SceneState, rng: np.random.Generator, max_items: int = 8) -> list[tuple[str, str, str]]:
    """Up to `max_items` (kind, prompt, target) items about `s`: kind "caption" (prompt CAPTION_PROMPT, target
    a sentence) or "qa" (a question and its short answer). All facts are read from the state."""
    objects = [b for b in s.bodies if b.spec.movable]
    fixtures = [b for b in s.bodies if not b.spec.movable]
    items: list[tuple[str, str, str]] = []

    def cap(text: str) -> None:
        items.append(("caption", CAPTION_PROMPT, text))

    def qa(q: str, a: str) -> None:
        items.append(("qa", q, a))

    for b in objects:
        where = place_phrase(s, b)
        if where:
            cap(f"{_the(b)} is {where}")
            qa(f"where is {_the(b)} ?", where)
    bodies = list(s.bodies)
    for _ in range(3):
        a, b = (bodies[int(i)] for i in rng.choice(len(bodies), 2, replace=False))
        rel = relation(a, b)
        if rel and a.name != s.held and b.name != s.held:
            cap(f"{_the(a)} is {rel} {_the(b)}")
    n = len(objects)
    cap(f"there {'is' if n == 1 else 'are'} {NUMBERS[n]} {'object' if n == 1 else 'objects'}")
    qa("how many objects are there ?", NUMBERS[n])
    held = s.body(s.held) if s.held else None
    qa("what is in the gripper ?", _the(held) if held else "no object")
    qa("is the gripper open ?", "yes" if s.finger > 0.03 else "no")
    if objects:
        g = s.gripper_pos
        near = min(objects, key=lambda b: np.hypot(*(b.pos[:2] - g[:2])))
        if near is not held:
            qa("which object is closest to the gripper ?", _the(near))
            if np.hypot(*(near.pos[:2] - g[:2])) < 0.03 and g[2] > near.top:
                cap(f"the gripper is above {_the(near)}")
    kinds = [b.kind for b in objects]
    colors = [b.color for b in objects]
    for b in objects:
        if kinds.count(b.kind) == 1:
            qa(f"what color is the {b.kind} ?", b.color)
        if colors.count(b.color) == 1:
            qa(f"what shape is the {b.color} object ?", b.kind)
    for f in fixtures:
        if f.kind == "stove":
            qa("is the stove on ?", "yes" if f.on else "no")
            if f.on:
                cap("the stove is on")
        if f.kind in ("bowl", "basket", "plate", "tray"):
            inside = [b for b in objects if b.support == f.name]
            qa(f"what is {'in' if f.kind in ('bowl', 'basket') else 'on'} {_the(f)} ?",
               " and ".join(_the(b) for b in inside) if inside else "no object")
    order = rng.permutation(len(items))[:max_items]
    return [items[int(i)] for i in sorted(order)]
