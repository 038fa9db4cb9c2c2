"""TableTop-4 words: instructions and pretraining texts stay inside the tiny tokenizer's vocabulary (checked
against the real tokenizer), and spatial phrases follow the camera's left/right/front/behind."""

import numpy as np
import pytest

from experiments.robot.tabletop import SUITES, Body, SceneState
from experiments.robot.tabletop.language import place_phrase, relation, scene_texts, unknown_words
from experiments.robot.tabletop.pretrain import pretrain_rng, pretrain_scene
from prismatic.models.processing import build_tiny_tokenizer


def test_unknown_words_agrees_with_the_tiny_tokenizer():
    tok = build_tiny_tokenizer()
    unk = tok.token_to_id("<unk>")
    texts = [t.instruction for tasks in SUITES.values() for t in tasks]
    for i in range(30):
        rng = pretrain_rng(0, i)
        texts += [w for _, p, a in scene_texts(pretrain_scene(rng), rng) for w in (p, a)]
    texts += ["pick up the shiny cube", "put it on the saucer ?"]
    for text in texts:
        ids = tok.encode(text).ids
        assert (unk in ids) == bool(unknown_words(text)), text
    assert unknown_words("pick up the shiny cube , please") == ["shiny", "please"]


def test_the_processor_warns_once_about_words_the_tiny_vocabulary_lacks():
    import warnings

    from prismatic.models.processing import VLAProcessor

    proc = VLAProcessor(build_tiny_tokenizer(), 64, 512)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        proc.encode(SUITES["goal"][0].instruction)  # TableTop-4's words are all known: no warning
    with pytest.warns(UserWarning, match=r"\['compartment', 'pots'\] are not in the tokenizer's vocabulary"):
        proc.encode("put the pots in the compartment")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        proc.encode("put the pots in the compartment")  # cached: said once


def body(name, x, y, kind="cube", color="red", z=0.0, support=""):
    return Body(name, kind, color, (x, y, z), support)


@pytest.mark.parametrize("dx,dy,expected", [
    (-0.1, 0.0, "left of"), (0.1, 0.02, "right of"), (0.0, -0.1, "in front of"), (0.01, 0.1, "behind"),
    (0.08, 0.08, None),  # diagonal: no single word fits
    (0.03, 0.0, None),  # too close to tell
])
def test_relation_follows_the_third_person_camera(dx, dy, expected):
    assert relation(body("a", dx, dy), body("b", 0.0, 0.0, "bowl", "white")) == expected


def test_place_phrases():
    bowl = body("bowl", 0.0, 0.0, "bowl", "white")
    cube = body("red_cube", 0.0, 0.0, z=0.008, support="bowl")
    ball = body("blue_ball", 0.0, 0.0, "ball", "blue", z=0.058, support="red_cube")
    zone = body("green_zone", 0.15, 0.15, "zone", "green")
    loose = body("pink_cube", 0.17, 0.13, color="pink")
    s = SceneState([bowl, cube, ball, zone, loose], np.array([0.0, 0.0, 0.2]))
    assert place_phrase(s, cube) == "in the bowl"
    assert place_phrase(s, ball) == "on the red cube"
    assert place_phrase(s, loose) == "in the green zone"
    s.held = "pink_cube"
    assert place_phrase(s, loose) == "in the gripper"
