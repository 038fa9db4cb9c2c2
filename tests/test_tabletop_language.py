"""TableTop-4 words: instructions and pretraining texts stay inside the tiny tokenizer's vocabulary (checked
against the real tokenizer), and spatial phrases follow the camera's left/right/front/behind."""

import numpy as np
import pytest

from experiments.robot.tabletop import SUITES, Body, SceneState
from experiments.robot.tabletop.language import CAPTION_PROMPT as CAPTION
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
    texts += ["pick up the shiny cube", "put it on the saucer ?", "Put the RED Cube in the Bowl"]
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
    (0.059, 0.0, None), (-0.061, 0.0, "left of"),  # "too close": both offsets under 6 cm
    (0.09375, 0.0625, "right of"), (0.0625, -0.09375, "in front of"),  # exactly 1.5× the other offset: clear
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
    beside = body("cyan_cube", 0.15, 0.03, color="cyan")  # the zone's column but well in front of it
    assert place_phrase(SceneState([zone, beside], np.array([0.0, 0.0, 0.2])), beside) is None
    s.held = "pink_cube"
    assert place_phrase(s, loose) == "in the gripper"
    basket = body("basket", -0.15, 0.0, "basket", "brown")
    tray = body("tray", 0.0, -0.15, "tray", "gray")
    in_basket = body("green_cube", -0.15, 0.0, color="green", z=0.008, support="basket")
    on_tray = body("cyan_cube", 0.0, -0.15, color="cyan", z=0.015, support="tray")
    s = SceneState([basket, tray, in_basket, on_tray], np.array([0.0, 0.0, 0.2]))
    assert place_phrase(s, in_basket) == "in the basket" and place_phrase(s, on_tray) == "on the tray"


def test_scene_texts_state_the_scene_as_it_is():
    def texts(s, seed):
        return scene_texts(s, np.random.default_rng(seed), max_items=100)

    bowl, cube = body("bowl", 0.0, 0.0, "bowl", "white"), body("red_cube", -0.1, 0.0)
    ball = body("blue_ball", 0.1, -0.1, "ball", "blue")
    s = SceneState([bowl, cube, ball], np.array([0.1, 0.1, 0.2]))  # open gripper, nothing held
    relations = {"the red cube is left of the bowl", "the bowl is right of the red cube",
                 "the red cube is left of the blue ball", "the blue ball is right of the red cube"}
    seen = set()
    for seed in range(5):
        items = texts(s, seed)
        said = {t for k, _, t in items if k == "caption" and " of " in t}
        assert said <= relations, said  # ball vs bowl is diagonal: never stated
        seen |= said
        assert [it for it in items if not (it[0] == "caption" and " of " in it[2])] == [
            ("caption", "what is in the scene ?", "there are two objects"),
            ("qa", "how many objects are there ?", "two"),
            ("qa", "what is in the gripper ?", "no object"),
            ("qa", "is the gripper open ?", "yes"),
            ("qa", "which object is closest to the gripper ?", "the blue ball"),
            ("qa", "what color is the cube ?", "red"),
            ("qa", "what shape is the red object ?", "cube"),
            ("qa", "what color is the ball ?", "blue"),
            ("qa", "what shape is the blue object ?", "ball"),
            ("qa", "what is in the bowl ?", "no object"),
        ]
    assert len(seen) >= 2
    s = SceneState([bowl, cube], np.array([-0.1, 0.0, 0.1]), finger=0.025, held="red_cube")
    for seed in range(3):
        items = texts(s, seed)
        assert ("caption", "what is in the scene ?", "the red cube is in the gripper") in items
        assert ("caption", "what is in the scene ?", "there is one object") in items
        assert ("qa", "how many objects are there ?", "one") in items
        assert ("qa", "what is in the gripper ?", "the red cube") in items
        assert ("qa", "is the gripper open ?", "no") in items
        assert not [t for k, _, t in items if k == "caption" and " of " in t]  # nothing relative to a held object


def test_scene_texts_of_a_row_of_clear_relations_a_stove_and_a_crowded_bowl():
    def texts(s, seed, max_items=100):
        return scene_texts(s, np.random.default_rng(seed), max_items=max_items)

    # three bodies in a row, all clearly left/right of each other: each of the three draws is stated
    row = [body("bowl", 0.0, 0.0, "bowl", "white"), body("red_cube", -0.1, 0.0), body("blue_cube", 0.1, 0.0, color="blue")]
    s = SceneState(row, np.array([0.0, -0.15, 0.2]))
    for seed in range(3):
        items = texts(s, seed)
        assert len([t for k, _, t in items if k == "caption" and " of " in t]) == 3
        assert ("qa", "what shape is the red object ?", "cube") in items
        assert not [q for _, q, _ in items if q == "what color is the cube ?"]  # two cubes: no single answer
        assert len(scene_texts(s, np.random.default_rng(seed))) == 8  # max_items defaults to 8
    twins = SceneState([body("a_cube", -0.1, 0.0), body("b_ball", 0.1, 0.0, "ball")], np.array([0.0, -0.15, 0.2]))
    assert not [q for _, q, _ in texts(twins, 0) if q == "what shape is the red object ?"]  # two red objects
    # a stove that is on, a bowl holding two objects, the gripper right above the nearest object
    stove = body("stove", -0.12, 0.1, "stove", "black")
    stove.on = True
    bowl = body("bowl", 0.1, 0.1, "bowl", "white")
    inside = [body("red_cube", 0.1, 0.1, z=0.008, support="bowl"),
              body("blue_ball", 0.1, 0.1, "ball", "blue", z=0.058, support="red_cube")]
    inside[1].support = "bowl"  # what `place in` counts: resting in the bowl, directly or not
    free = body("green_cube", 0.0, -0.1, color="green")
    s = SceneState([stove, bowl, *inside, free], np.array([0.005, -0.1, 0.08]))
    items = texts(s, 0)
    assert ("qa", "is the stove on ?", "yes") in items and ("caption", CAPTION, "the stove is on") in items
    assert ("qa", "what is in the bowl ?", "the red cube and the blue ball") in items
    assert ("caption", CAPTION, "the gripper is above the green cube") in items
    stove.on = False
    s.gripper_pos = np.array([0.005, -0.1, 0.04])  # beside the cube's sides, below its top (0.05)
    items = texts(s, 0)
    assert ("qa", "is the stove on ?", "no") in items and ("caption", CAPTION, "the stove is on") not in items
    assert not [t for k, _, t in items if t.startswith("the gripper is above")]


def test_no_closest_object_question_when_the_nearest_object_is_held():
    cube, ball = body("red_cube", 0.0, 0.0, z=0.05), body("blue_ball", 0.15, 0.0, "ball", "blue")
    s = SceneState([cube, ball], np.array([0.0, 0.0, 0.075]), finger=0.025, held="red_cube")
    items = scene_texts(s, np.random.default_rng(0), max_items=100)
    assert ("qa", "what is in the gripper ?", "the red cube") in items
    assert not [q for _, q, _ in items if q == "which object is closest to the gripper ?"]
