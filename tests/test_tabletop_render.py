"""TableTop-4 renderer: upright images, objects where the world puts them, the wrist camera shows the grasp,
the stove's state and the gripper are visible, sizes and anti-aliasing behave."""

import numpy as np
import pytest

from experiments.robot.tabletop import Body, SceneState
from experiments.robot.tabletop.render import BURNER_ON, TABLE, AgentView, Canvas, WristView


def red_mask(img):
    r, g, b = (img[..., i].astype(int) for i in range(3))
    return (r > 150) & (g < 90) & (b < 90)


def centroid(mask):
    rows, cols = np.nonzero(mask)
    assert len(rows), "colour not found in the image"
    return rows.mean() / mask.shape[0], cols.mean() / mask.shape[1]


def lone_cube(x, y, gripper=(0.0, -0.2, 0.2)):
    return SceneState([Body("cube", "cube", "red", (x, y, 0.0))], np.array(gripper))


@pytest.mark.parametrize("x,y,row_top,col_left", [(-0.15, 0.15, True, True), (0.15, -0.15, False, False)])
def test_agentview_is_upright_left_is_left_far_is_up(x, y, row_top, col_left):
    row, col = centroid(red_mask(AgentView(64).render(lone_cube(x, y))))
    assert bool(row < 0.5) is row_top and bool(col < 0.5) is col_left


def test_wrist_view_is_upright_and_centred_on_the_gripper():
    img = WristView(64).render(lone_cube(0.0, 0.05, gripper=(0.0, 0.0, 0.15)))
    row, col = centroid(red_mask(img))
    assert row < 0.45 and abs(col - 0.5) < 0.05  # +y (away from the robot) is up in the image
    img = WristView(64).render(lone_cube(0.05, 0.0, gripper=(0.0, 0.0, 0.15)))
    row, col = centroid(red_mask(img))
    assert col > 0.55 and abs(row - 0.5) < 0.05
    ball = SceneState([Body("ball", "ball", "red", (0.0, 0.05, 0.0))], np.array([0.0, 0.0, 0.15]))
    row, col = centroid(red_mask(WristView(64).render(ball)))  # round bodies are drawn by another path
    assert row < 0.45 and abs(col - 0.5) < 0.05


def test_a_nearer_object_is_drawn_over_a_farther_one():
    # a red cube with a blue one right behind it: the red top face covers the blue front face on screen, so the
    # red cube shows exactly as it does alone (painter's order: far first)
    gripper = np.array([0.2, -0.2, 0.2])
    alone = SceneState([Body("near", "cube", "red", (0.0, 0.0, 0.0))], gripper)
    pair = SceneState([Body("near", "cube", "red", (0.0, 0.0, 0.0)), Body("far", "cube", "blue", (0.0, 0.05, 0.0))],
                      gripper)
    mask = red_mask(AgentView(64).render(alone, supersample=1))
    assert mask.sum() > 20
    np.testing.assert_array_equal(red_mask(AgentView(64).render(pair, supersample=1)), mask)


def test_the_gripper_casts_a_shadow_on_the_table_under_it():
    view = AgentView(64)
    row, col = 35, 32  # the pixel of the table point (0, 0, 0) at 64 px
    over = view.render(SceneState([], np.array([0.0, 0.0, 0.1])), supersample=1)
    np.testing.assert_array_equal(over[row, col], (TABLE * 0.55).astype(np.uint8))  # darkened to 55 %
    away = view.render(SceneState([], np.array([0.15, 0.0, 0.1])), supersample=1)
    np.testing.assert_array_equal(away[row, col], TABLE)


def test_a_raised_object_is_drawn_higher_in_the_third_person_view():
    def cube_at(z):
        return SceneState([Body("cube", "cube", "red", (0.0, 0.0, z))], np.array([0.0, -0.2, 0.2]))

    rows = [centroid(red_mask(AgentView(64).render(cube_at(z))))[0] for z in (0.0, 0.1)]
    assert rows[1] < rows[0] - 0.05


def test_objects_grow_in_the_wrist_view_as_the_gripper_descends():
    high = red_mask(WristView(64).render(lone_cube(0.0, 0.0, gripper=(0.0, 0.0, 0.2)))).sum()
    low = red_mask(WristView(64).render(lone_cube(0.0, 0.0, gripper=(0.0, 0.0, 0.07)))).sum()
    assert low > 3 * high > 0


def test_wrist_view_shows_an_object_inside_a_bowl():
    s = SceneState([Body("bowl", "bowl", "white", (0.0, 0.0, 0.0)), Body("cube", "cube", "red", (0.0, 0.0, 0.008), "bowl")],
                   np.array([0.0, 0.0, 0.15]))
    assert red_mask(WristView(64).render(s))[28:36, 28:36].all()  # fixtures are drawn before the objects in them


def test_third_person_view_shows_the_finger_opening():
    s = SceneState([], np.array([0.0, 0.0, 0.1]))
    opened = AgentView(64).render(s)
    s.finger = 0.0
    closed = AgentView(64).render(s)
    assert (opened != closed).any(axis=-1).sum() > 10


def test_wrist_view_shows_a_held_object_and_the_finger_opening():
    s = lone_cube(0.0, 0.0, gripper=(0.0, 0.0, 0.12))
    s.held, s.grasp_offset, s.finger = "cube", 0.025, 0.025
    s.body("cube").pos[:] = (0.0, 0.0, 0.095)
    img = WristView(64).render(s)
    assert red_mask(img)[28:36, 28:36].all()  # the held cube fills the centre
    empty = SceneState([], np.array([0.0, 0.0, 0.12]))
    opened = WristView(64).render(empty)
    empty.finger = 0.0
    closed = WristView(64).render(empty)
    assert (opened != closed).any(axis=-1).sum() > 50


def test_stove_burner_lights_up_when_on():
    s = SceneState([Body("stove", "stove", "black", (0.0, 0.0, 0.0))], np.array([0.0, -0.2, 0.2]))

    def orange(img):
        return (np.abs(img.astype(int) - BURNER_ON.astype(int)).sum(-1) < 60).sum()

    view = AgentView(64)  # one view, as an env keeps: its cached background must not hide the change
    assert orange(view.render(s)) == 0
    s.body("stove").on = True
    assert orange(view.render(s)) > 5
    assert orange(AgentView(64).render(s)) > 5


def test_gripper_motion_shows_in_the_third_person_view():
    a = AgentView(64).render(lone_cube(0.1, 0.1, gripper=(-0.1, 0.0, 0.1)))
    b = AgentView(64).render(lone_cube(0.1, 0.1, gripper=(0.1, 0.0, 0.1)))
    changed = (a != b).any(axis=-1)
    cols = np.nonzero(changed.any(axis=0))[0]
    assert cols.min() < 32 < cols.max()  # both where the gripper was and where it went


def test_sizes_supersampling_and_determinism():
    s = lone_cube(0.05, 0.02, gripper=(0.0, 0.0, 0.1))
    for size in (32, 64, 128):
        for view in (AgentView(size), WristView(size)):
            img = view.render(s)
            assert img.shape == (size, size, 3) and img.dtype == np.uint8
            np.testing.assert_array_equal(img, view.render(s))
    sharp, smooth = AgentView(64).render(s, supersample=1), AgentView(64).render(s, supersample=2)
    diff = np.abs(sharp.astype(int) - smooth.astype(int))
    assert 0 < diff.mean() < 5  # anti-aliasing changes only edges


def test_downsampling_averages_each_block_and_rounds_to_nearest():
    cv = Canvas(4, np.zeros(3, np.uint8))
    cv.img[:2, :2] = [[[10, 0, 255], [11, 1, 255]], [[11, 1, 255], [11, 0, 255]]]  # sums 43, 2, 1020
    cv.img[:2, 2:] = 7
    cv.img[2:, :, 0] = [[0, 1, 2, 3], [1, 2, 3, 4]]
    out = cv.downsample(2)
    assert out.shape == (2, 2, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0, 0], [11, 1, 255])  # 10.75 → 11, 0.5 → 1 (half up), 255
    np.testing.assert_array_equal(out[0, 1], [7, 7, 7])
    np.testing.assert_array_equal(out[1, :, 0], [1, 3])  # 4 / 4 = 1, 12 / 4 = 3
    assert cv.downsample(1) is cv.img
