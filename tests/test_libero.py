"""LIBERO evaluation: observation preprocessing, action post-processing, and a real env through the harness."""

import dataclasses
import json
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import echo_python, script_env

from experiments.robot.harness import ResultsError
from experiments.robot.libero.env import LiberoEnvFactory, import_libero, libero_available, suite_info, task_categories
from experiments.robot.libero.policies import load_policy
from experiments.robot.libero.preprocess import LiberoImageTransform, center_crop_resize, rotate_180
from experiments.robot.libero.run_libero_eval import (
    GenerateConfig,
    eval_crop_area,
    frame_size_warning,
    main,
    video_patterns,
)
from experiments.robot.policy import CenterCrop, VLAPolicy, to_env_actions
from model_merging.errors import MergeError
from prismatic.checkpoint import CheckpointError

HAVE_LIBERO, WHY_NOT = libero_available()
needs_libero = pytest.mark.skipif(not HAVE_LIBERO, reason=f"the `libero` extra is not installed: {WHY_NOT}")

STATS = {
    "action": {"q01": [-2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], "q99": [2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
               "mask": [True] * 6 + [False]},
    "proprio": {"q01": [0.0] * 8, "q99": [2.0] * 8, "mask": [True] * 8},
}


def test_rotation_is_180_degrees():
    img = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    out = rotate_180(img)
    assert out[0, 0].tolist() == img[1, 2].tolist() and out[1, 2].tolist() == img[0, 0].tolist()
    plain = LiberoImageTransform(size=3, jpeg=False, center_crop=False)
    square = np.arange(3 * 3 * 3, dtype=np.uint8).reshape(3, 3, 3)
    assert plain(square)[:, :, 0].tolist() == [[24, 21, 18], [15, 12, 9], [6, 3, 0]]


def test_rendered_frames_go_through_a_jpeg_round_trip_as_the_training_data_did():
    from io import BytesIO

    from PIL import Image

    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)  # texture JPEG cannot keep
    buf = BytesIO()
    Image.fromarray(rotate_180(img)).save(buf, "JPEG", quality=95)  # the RLDS release's encoding
    want = np.asarray(Image.open(buf).convert("RGB"))
    out = LiberoImageTransform(size=32, center_crop=False)(img)
    assert np.array_equal(out, want) and not np.array_equal(out, rotate_180(img))


def test_center_crop_of_a_ramp_is_hand_computed():
    # 5x5 ramp 10·x, crop 0.64 of the area (side 0.8): samples at x = 0.4 + 0.8·j → 4, 12, 20, 28, 36
    ramp = np.tile((10 * np.arange(5))[None, :, None], (5, 1, 3)).astype(np.uint8)
    out = center_crop_resize(ramp, 0.64)
    assert out[2, :, 0].tolist() == [4, 12, 20, 28, 36] and (out[:, :, 0] == out[0, :, 0]).all()
    # the default 0.9 area on a 224 ramp x: samples from (1 - √0.9)/2 · 223 = 5.72 → 6 to 223 - 5.72 → 217
    big = np.tile(np.arange(224)[None, :, None], (224, 1, 3)).astype(np.uint8)
    row = center_crop_resize(big, 0.9)[100, :, 0]
    assert (row[0], row[1], row[-1]) == (6, 7, 217)  # second sample: 5.72 + √0.9 · 223/223 = 6.67 → 7
    with pytest.raises(ValueError, match=r"area_scale must be in \(0, 1\]"):
        center_crop_resize(ramp, 1.5)


def test_full_transform_keeps_flat_colour_and_sizes():
    flat = np.full((256, 256, 3), (200, 30, 90), dtype=np.uint8)
    out = LiberoImageTransform()(flat)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - [200, 30, 90]).max() <= 2  # JPEG colour conversion rounds by a level or two
    with pytest.raises(ValueError, match=r"expected an \(H, W, 3\) uint8 camera frame"):
        LiberoImageTransform()(flat.astype(np.float32))


def test_unnormalisation_and_gripper_convention():
    # dim 0: [-1, 1] → [-2, 2]; dims 1-5: → [0, 1]; gripper: 1 open / 0 close → sign(2g - 1), negated
    pred = np.array([[0.5, -1.0, 1.0, 0.0, 0.0, 0.0, 0.7], [-0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.2],
                     [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5]], dtype=np.float32)
    out = to_env_actions(pred, STATS["action"])
    np.testing.assert_allclose(out[:, 0], [1.0, -1.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(out[0, 1:3], [0.0, 1.0], atol=1e-6)
    assert out[:, 6].tolist() == [-1.0, 1.0, -1.0]  # open (-1), close (+1), exactly 0.5 counts as open


class StubModel(torch.nn.Module):
    """Stands in for MergeVLA: records what the processor gets, predicts a fixed normalised chunk."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.norm_stats = STATS
        self.seen = {}
        self.processor = self._process

    def _process(self, instructions, images, proprio):
        self.seen = {"instructions": instructions, "images": images, "proprio": proprio}
        return {"x": torch.zeros(len(instructions))}

    def predict_action(self, x):
        chunk = torch.zeros(len(x), 8, 7)
        chunk[..., 0] = 0.5
        chunk[..., 6] = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0])
        return chunk


def test_policy_path_from_libero_obs_to_env_actions():
    agent = np.zeros((4, 4, 3), np.uint8)
    agent[0, 0] = 255  # top-left in LIBERO's upside-down frame → bottom-right upright
    obs = {"agentview_image": agent, "robot0_eye_in_hand_image": agent.copy(),
           "robot0_eef_pos": np.array([1.0, 0.5, 2.0]),
           "robot0_eef_quat": np.array([0.0, 0.0, np.sin(np.pi / 4), np.cos(np.pi / 4)]),  # 90° about z
           "robot0_gripper_qpos": np.array([0.04, -0.04])}
    model = StubModel()
    actions = VLAPolicy(model, LiberoImageTransform(size=4, jpeg=False, center_crop=False)).act(
        [obs], ["put the bowl on the plate"], [0])
    assert model.seen["images"].shape == (1, 2, 4, 4, 3) and model.seen["images"][0, 0, 3, 3, 0] == 255
    # proprio [1, .5, 2, 0, 0, π/2, .04, -.04] normalised from [0, 2] to [-1, 1]: 2x/2 - 1, clipped
    np.testing.assert_allclose(model.seen["proprio"][0], [0.0, -0.5, 1.0, -1.0, -1.0, np.pi / 2 - 1, -0.96, -1.0],
                               atol=1e-5)
    assert actions.shape == (1, 8, 7)
    np.testing.assert_allclose(actions[0, :, 0], 1.0, atol=1e-6)
    assert actions[0, :, 6].tolist() == [-1.0, 1.0] * 4


def test_quaternion_past_half_a_turn_gives_robosuites_axis_angle():
    from experiments.robot.policy import quat_to_axis_angle

    # 270° about z: w = cos(135°) < 0; robosuite's quat2axisangle gives 2·acos(w) = 3π/2 about +z
    q = np.array([0.0, 0.0, np.sin(3 * np.pi / 4), np.cos(3 * np.pi / 4)])
    np.testing.assert_allclose(quat_to_axis_angle(q), [0.0, 0.0, 3 * np.pi / 2], atol=1e-9)
    np.testing.assert_allclose(quat_to_axis_angle(np.array([0.0, 0.0, 0.0, -1.0])), 0.0)
    # a unit quaternion whose w rounds past 1 (float32 observations) is the identity, not NaN
    np.testing.assert_array_equal(quat_to_axis_angle(np.array([0.0, 0.0, 0.0, 1.0 + 1e-7])), 0.0)


def test_checkpoint_kind_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_policy(tmp_path / "nope", None)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    # not an expert checkpoint → handed to the merged loader, which names the format it expected
    with pytest.raises(MergeError, match=r"manifest\.json: field 'format' is 'something-else', expected 'mergevla-merged'"):
        load_policy(tmp_path / "m", None)
    (tmp_path / "m" / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="manifest.json is not valid JSON"):
        load_policy(tmp_path / "m", None)


def test_libero_plus_dimensions_from_classification_file(tmp_path):
    f = tmp_path / "task_classification.json"
    f.write_text(json.dumps({"libero_goal": [{"id": 0, "name": "a_view_1", "category": "Camera Viewpoints"},
                                             {"id": 1, "name": "a_light_2", "category": "Light Conditions"}]}))
    assert task_categories("libero_goal", ["a_light_2", "a_view_1"], f) == ["light", "camera"]
    with pytest.raises(ValueError, match="no category for 1 tasks of libero_goal, e.g. 'b'"):
        task_categories("libero_goal", ["b"], f)
    with pytest.raises(ValueError, match="with suite 'libero_10'"):
        task_categories("libero_10", ["a"], f)


def test_video_selection_names():
    assert video_patterns("all") == ["*"] and video_patterns("first") == ["*/*/0"] and video_patterns("") == []
    assert video_patterns("libero_goal/3/*, libero_10/*/0") == ["libero_goal/3/*", "libero_10/*/0"]


def test_centre_crop_follows_the_checkpoints_training_unless_the_flags_say():
    def ft(train_config):
        return {"format": "mergevla-checkpoint", "train_config": train_config}

    aug, noaug = {"image_aug": True, "aug": {"crop_area": 0.81}}, {"image_aug": False, "aug": {"crop_area": 0.81}}
    cfg = GenerateConfig()
    assert [eval_crop_area(cfg, ft(t)) for t in (aug, noaug, None)] == [0.81, 1.0, 0.9]  # None: docs/DESIGN.md §5's 0.9
    assert eval_crop_area(GenerateConfig(center_crop=False), ft(aug)) == 1.0
    assert eval_crop_area(GenerateConfig(crop_area=0.5), ft(noaug)) == 0.5
    assert eval_crop_area(GenerateConfig(center_crop=True), ft(noaug)) == 0.9  # a crop asked for: the protocol's
    with pytest.raises(ValueError, match="--crop_area is 1.5"):
        eval_crop_area(GenerateConfig(crop_area=1.5), ft(aug))

    def merged(areas):
        return {"format": "mergevla-merged", **({} if areas is None else {"trained_crop_area": areas})}

    assert eval_crop_area(cfg, merged({"a": 0.81, "b": 0.81, "c": None})) == 0.81
    assert eval_crop_area(cfg, merged({"a": 1.0, "b": 1.0})) == 1.0
    assert eval_crop_area(cfg, merged(None)) == 0.9  # an artifact from before the field existed
    with pytest.raises(ValueError, match="different random crops .* set --crop_area"):
        eval_crop_area(cfg, merged({"a": 0.81, "b": 1.0}))
    assert eval_crop_area(GenerateConfig(crop_area=0.9), merged({"a": 0.81, "b": 1.0})) == 0.9


def test_frames_of_another_size_than_the_renders_are_warned_about():
    ft = {"format": "mergevla-checkpoint", "dataset": {"frame_size": [128, 128]}}
    assert frame_size_warning(ft, 256) == (
        "warning: trained on frames of another size than the 256-px renders evaluated here (the checkpoint 128×128): "
        "raw LIBERO HDF5 demos are 128 px, which is why the RLDS release re-rendered them at 256; expect lower success "
        "than on the data the published numbers used (OpenVLA's RLDS, --dataset_format rlds), or evaluate with "
        "--env_img_res at the training size")
    assert frame_size_warning(ft, 128) is None
    assert frame_size_warning({"format": "mergevla-checkpoint", "dataset": {}}, 256) is None  # not recorded
    merged = {"format": "mergevla-merged", "trained_frame_size": {"libero_goal": [256, 256], "libero_10": [128, 128],
                                                                  "libero_object": None}}
    assert "(libero_10 128×128)" in frame_size_warning(merged, 256)
    assert frame_size_warning({"format": "mergevla-merged"}, 256) is None  # an artifact from before the field


def test_env_factory_pickles_without_its_simulator():
    f = LiberoEnvFactory(resolution=128, fast_render=True)
    f._cache["env"] = object()  # an unpicklable simulator must not travel to worker processes
    g = pickle.loads(pickle.dumps(f))
    assert g == f and g._cache == {}


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from prismatic.models import BaseModelConfig, build_vla, save_pretrained

    model = build_vla("tiny", BaseModelConfig(random_seed=0), seed=0)
    model.norm_stats = {"action": {"q01": [-1.0] * 6 + [0.0], "q99": [1.0] * 7, "mask": [True] * 6 + [False]},
                        "proprio": {"q01": [-1.0] * 8, "q99": [1.0] * 8, "mask": [True] * 8}}
    return save_pretrained(model, tmp_path_factory.mktemp("ckpt") / "tiny-spatial")


@pytest.mark.parametrize("flags, says", [
    ({"num_open_loop_steps": 0}, "--num_open_loop_steps is 0, expected >= 1"),
    ({"env_img_res": 0}, "--env_img_res is 0, expected >= 1"),
    ({"resize_size": -1}, "--resize_size is -1, expected >= 1"),
    ({"num_steps_wait": -1}, "--num_steps_wait is -1, expected >= 0"),
    ({"max_steps": 0}, "--max_steps is 0, expected >= 1 (or unset"),
    ({"worker_timeout_s": float("nan")}, "--worker_timeout_s is nan, expected a finite number"),
    ({"mujoco_gl": "foo"}, "--mujoco_gl is 'foo', expected one of ['egl', 'osmesa', 'glfw']"),
    ({"router_variant": "foo"}, "router variant 'foo': expected one of"),
])
def test_settings_no_run_can_use_are_refused_before_anything_is_read(tmp_path, flags, says):
    # the checkpoint does not exist: the settings are checked first, dry runs included, LIBERO installed or not
    cfg = GenerateConfig(pretrained_checkpoint=tmp_path / "none", results_dir=tmp_path / "runs", dry_run=True,
                         **flags)
    with pytest.raises(ValueError, match=re.escape(says)):
        main(cfg)
    assert not (tmp_path / "runs").exists()


def test_a_results_dir_that_is_a_file_is_named_before_anything_runs(tmp_path):
    (tmp_path / "f").write_text("mine")
    for d, says in ((tmp_path / "f", "--results_dir {} is a file, not a directory"),
                    (tmp_path / "f" / "runs", "--results_dir {} cannot be created")):
        with pytest.raises(NotADirectoryError, match=re.escape(says.format(d))):
            main(GenerateConfig(pretrained_checkpoint=tmp_path / "none", results_dir=d, dry_run=True))
    assert (tmp_path / "f").read_text() == "mine"


def test_a_device_that_is_not_one_is_named():
    from experiments.robot.policy import resolve_device

    with pytest.raises(ValueError, match="device 'tpu' is not a torch device"):
        resolve_device("tpu")
    assert resolve_device("cpu") == "cpu"


def test_auto_device_is_cuda_only_where_cuda_is_available(monkeypatch):
    from experiments.robot.policy import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert (resolve_device("auto"), resolve_device("cuda:1")) == ("cuda", "cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    with pytest.raises(ValueError, match="device 'cuda' was requested but CUDA is not available"):
        resolve_device("cuda")


@needs_libero
def test_importing_libero_drops_robosuites_macro_advice_only():
    code = ("import logging; from experiments.robot.libero.env import import_libero; import_libero(); "
            "logging.getLogger('robosuite_logs').warning('a robosuite warning')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1], env=script_env(HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr
    assert "macro" not in proc.stderr and "a robosuite warning" in proc.stderr


@needs_libero
def test_bad_suite_and_init_state_are_clear_errors(tiny_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="unknown LIBERO suite 'libero_nope'"):
        main(GenerateConfig(pretrained_checkpoint=tiny_checkpoint, task_suites=["libero_nope"], dry_run=True))
    with pytest.raises(ValueError, match="unknown LIBERO suite 'libero_spatal'; did you mean 'libero_spatial'"):
        main(GenerateConfig(pretrained_checkpoint=tiny_checkpoint, task_suites=["libero_spatal"], dry_run=True))
    with pytest.raises(ValueError, match="has 50 fixed init states; init_state_id 50 is out of range"):
        LiberoEnvFactory()("libero_spatial", 0, 50)
    # found when planning (dry run too), not after the first 50 episodes of each task have run
    with pytest.raises(ValueError, match="--num_trials_per_task 51 exceeds the 50 fixed init states of libero_spatial"):
        main(GenerateConfig(pretrained_checkpoint=tiny_checkpoint, task_suites=["libero_spatial"],
                            num_trials_per_task=51, results_dir=tmp_path / "runs", dry_run=True))
    assert not (tmp_path / "runs").exists()
    benchmark, _, _ = import_libero()
    if "libero_100" in benchmark.get_benchmark_dict():  # not a variant of libero_10: no 520-step limit
        with pytest.raises(ValueError, match="libero_100"):
            suite_info("libero_100")


@needs_libero
def test_dry_run_prints_the_plan_and_writes_nothing(tiny_checkpoint, tmp_path, capsys):
    main(GenerateConfig(pretrained_checkpoint=tiny_checkpoint, task_suites=["libero_goal", "libero_10"],
                        results_dir=tmp_path / "runs", dry_run=True))
    out = capsys.readouterr().out
    assert "libero_goal: 10 tasks, 500 episodes (0 already done), max 300 steps" in out
    assert "libero_10: 10 tasks, 500 episodes (0 already done), max 520 steps" in out
    assert "FT-experts--tiny-spatial.jsonl" in out and not (tmp_path / "runs").exists()
    main(GenerateConfig(pretrained_checkpoint=tiny_checkpoint, task_suites=["libero_goal"], task_ids=[3],
                        num_trials_per_task=1, results_dir=tmp_path / "runs", dry_run=True))
    assert "libero_goal: 1 of 10 tasks, 1 episode (0 already done), max 300 steps" in capsys.readouterr().out


@needs_libero
def test_real_libero_episode_through_the_harness(tiny_checkpoint, tmp_path, capsys):
    # one episode, one 8-step chunk after the 10 no-ops; a random tiny model cannot succeed
    cfg = GenerateConfig(pretrained_checkpoint=tiny_checkpoint, task_suites=["libero_spatial"], task_ids=[0],
                         num_trials_per_task=1, max_steps=8, env_img_res=128, fast_render=True,
                         results_dir=tmp_path / "runs", device="cpu")
    (row,) = main(cfg)
    assert (row["key"], row["success"], row["steps"], row["method"]) == ("libero_spatial/0/0", False, 8, "FT experts")
    assert row["instruction"] == "pick up the black bowl between the plate and the ramekin and place it on the plate"
    assert (tmp_path / "runs" / "summary" / "results.csv").read_text() == "method,Spatial,avg\nFT experts,0.0,0.0\n"
    assert main(cfg) == [row]  # resumed: nothing re-run, same row back
    main(dataclasses.replace(cfg, save_videos="libero_spatial/0/*", dry_run=True))  # a finished episode: said so
    assert ("warning: 1 episode(s) named by --save_videos are already done and will not be re-run, so get no video "
            "(e.g. libero_spatial/0/0); to record them, evaluate again into another --results_dir") in capsys.readouterr().out
    with pytest.raises(ResultsError, match=r"different run \(row 1: protocol differs in env_img_res: 128 → 256\)"):
        main(dataclasses.replace(cfg, env_img_res=256, dry_run=True))  # another protocol must not resume here


def tiny_merged(tmp_path, suites: list[str]):
    """A TIES merge of tiny experts named after `suites`, each its own random move from one shared init."""
    from model_merging.merge import MergeOptions, merge_experts
    from prismatic.models import BaseModelConfig, build_vla, save_pretrained

    experts = []
    for k, suite in enumerate(suites):
        model = build_vla("tiny", BaseModelConfig(random_seed=0), seed=0)  # one shared initialisation
        gen = torch.Generator().manual_seed(100 + k)
        with torch.no_grad():  # stand-in for fine-tuning: each expert moves its trainable weights its own way
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.02 * torch.randn(p.shape, generator=gen))
        model.norm_stats = {"action": {"q01": [-1.0] * 6 + [0.0], "q99": [1.0] * 7, "mask": [True] * 6 + [False]},
                            "proprio": {"q01": [-1.0] * 8, "q99": [1.0] * 8, "mask": [True] * 8}}
        experts.append((suite, save_pretrained(model, tmp_path / f"expert-{suite}")))
    return merge_experts(experts, tmp_path / "merged-ties", MergeOptions(algorithm="ties"), log=None)


@needs_libero
def test_merged_artifact_is_routed_per_episode_on_real_libero(tmp_path):
    merged = tiny_merged(tmp_path, ["libero_spatial", "libero_object"])
    cfg = GenerateConfig(pretrained_checkpoint=merged, task_suites=["libero_spatial"], task_ids=[0],
                         num_trials_per_task=1, max_steps=8, env_img_res=128, fast_render=True,
                         results_dir=tmp_path / "runs", device="cpu")
    (row,) = main(cfg)
    assert row["method"] == "TIES" and row["routed_expert"] in ("libero_spatial", "libero_object") and row["steps"] == 8
    assert "Routing accuracy" in (tmp_path / "runs" / "summary" / "results.md").read_text()
    main(dataclasses.replace(cfg, router_variant="value"))  # naming the default router is the same run: it resumes
    assert len((tmp_path / "runs" / "TIES--merged-ties.jsonl").read_text().splitlines()) == 1
    with pytest.raises(ResultsError, match="holds episodes of a different run"):  # another router: another run
        main(dataclasses.replace(cfg, router_variant="key", run_name="TIES--merged-ties"))
    # a second TIES merge under the same label is refused before it runs (the summary would count both), even in a
    # dry run; under a label of its own it runs beside the first
    import shutil

    shutil.copytree(merged, tmp_path / "ties-v2")
    with pytest.raises(ResultsError, match=r"TIES--merged-ties.jsonl already holds episode libero_spatial/0/0 of "
                                           r"method 'TIES' \(checkpoint .*merged-ties\)"):
        main(dataclasses.replace(cfg, pretrained_checkpoint=tmp_path / "ties-v2", dry_run=True))
    assert not (tmp_path / "runs" / "TIES--ties-v2.jsonl").exists()
    main(dataclasses.replace(cfg, pretrained_checkpoint=tmp_path / "ties-v2", method="TIES v2", dry_run=True))


@needs_libero
def test_exemplar_router_sees_real_libero_frames_as_the_evaluation_does(tmp_path, capsys):
    from model_merging.exemplar_router import main as calibrate_main
    from prismatic.vla.datasets.synthetic import Demo, Task, write_hdf5_suite

    suites = ["libero_spatial", "libero_object"]
    merged = tiny_merged(tmp_path, suites)
    # each suite's two "demos" start from frames of trial 0 of task 0, recorded as raw LIBERO records them: the first
    # (as rendered after the settling no-ops, what the evaluation sees first) and one after the arm has moved (an
    # expert's exemplars must differ); write_hdf5_suite stores the upright frames it is given upside down
    factory = LiberoEnvFactory(128, 0, True)
    for suite in suites:
        env = factory(suite, 0, 0)
        obs = env.reset()
        demos = []
        for action, steps in (([0.0] * 6 + [-1.0], 10), ([0.0, 0.0, 1.0, 0, 0, 0, -1.0], 5)):
            for _ in range(steps):
                obs, *_ = env.step(action)
            move = np.array([[0.5, 0, 0, 0, 0, 0, -1.0]] * 2)  # not a no-op, so the loader keeps step 0
            frames = [np.stack([rotate_180(obs[k])] * 2) for k in ("agentview_image", "robot0_eye_in_hand_image")]
            demos.append(Demo(move, np.zeros((2, 6)), np.zeros((2, 2)), *frames))
        write_hdf5_suite(tmp_path / "data", suite, [Task(env.instruction, demos)])
    factory.close()
    assert calibrate_main(["--merged", str(merged), "--data_root", str(tmp_path / "data"), "--per_task", "2",
                           "--device", "cpu"]) == 0
    # trial 0 of each suite (LIBERO's scenes take seconds each to build and reset on CPU)
    cfg = GenerateConfig(pretrained_checkpoint=merged, task_suites=suites, task_ids=[0], num_trials_per_task=1,
                         max_steps=8, env_img_res=128, fast_render=True, results_dir=tmp_path / "runs", device="cpu",
                         router_variant="exemplar")
    rows = main(cfg)
    assert "warning" not in capsys.readouterr().out  # calibrated with the evaluation's view: nothing to warn about
    assert sorted((r["suite"], r["routed_expert"]) for r in rows) == [(s, s) for s in sorted(suites)]
    for r in rows:  # the same frame through the same path: at distance 0 from one of its expert's exemplars
        assert r["route_scores"][r["suite"]] == pytest.approx(0.0, abs=1e-3)
    # the view matters: had the evaluation not rotated the rendered frames, they would be far from every exemplar
    policy = load_policy(merged, LiberoImageTransform(224, True, True, 0.9, upside_down=False), "cpu", "exemplar")
    raw = {"agentview_image": rotate_180(demos[1].agentview[0]), "robot0_eye_in_hand_image": rotate_180(demos[1].wrist[0])}
    (info,) = policy.start_episodes([raw], [env.instruction])
    assert max(info["route_scores"].values()) < -1.0, info


@pytest.mark.parametrize("script, var", [("eval.sh", "CKPT_GOAL"), ("eval_merged.sh", "MERGED_CKPT")])
def test_eval_scripts_refuse_missing_checkpoints(script, var, tmp_path):
    repo = Path(__file__).resolve().parents[1]
    env = {**script_env(), "PYTHON": sys.executable, "DRY_RUN": "1", "SUITES": "libero_goal", var: str(tmp_path / "nope"),
           "RESULTS_DIR": str(tmp_path / "runs")}
    done = subprocess.run(["bash", str(repo / "bash_scripts" / script)], env=env, capture_output=True, text=True)
    assert done.returncode == 2
    assert f"{var}={tmp_path / 'nope'}" in done.stderr and "manifest.json" in done.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("script", ["eval.sh", "eval_merged.sh"])
def test_eval_scripts_stop_on_a_missing_interpreter_even_in_a_dry_run(script, tmp_path):
    repo = Path(__file__).resolve().parents[1]
    env = {**script_env(), "PYTHON": str(tmp_path / "no-python"), "DRY_RUN": "1", "SUITES": "libero_goal",
           "RESULTS_DIR": str(tmp_path / "runs")}
    done = subprocess.run(["bash", str(repo / "bash_scripts" / script)], env=env, capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr == f"error: PYTHON={tmp_path / 'no-python'} is not an executable (run 'make install' first)\n"


@pytest.mark.parametrize("env, run_dir", [({}, "libero_goal-qwen25-dinosiglip-224px-cross_attn-seed7"),
                                          ({"EXPERT_ARCH": "self_attn", "TRAIN_SEED": "3"},
                                           "libero_goal-qwen25-dinosiglip-224px-self_attn-seed3"),
                                          ({"SEED": "5", "CONFIG_NAME": "tiny"},  # finetune_libero.sh's SEED
                                           "libero_goal-tiny-cross_attn-seed5")])
def test_eval_script_defaults_to_each_suites_newest_finished_checkpoint(tmp_path, env, run_dir):
    """In the run directory finetune_libero.sh names (config, architecture, training seed)."""
    repo = Path(__file__).resolve().parents[1]
    run = tmp_path / "runs" / run_dir / "checkpoints"
    env = {**script_env(), "PYTHON": sys.executable, "DRY_RUN": "1", "SUITES": "libero_goal",
           "OUT_ROOT": str(tmp_path / "runs"), "RESULTS_DIR": str(tmp_path / "results"), **env}

    def script():
        return subprocess.run(["bash", str(repo / "bash_scripts" / "eval.sh")], env=env, capture_output=True, text=True)

    def stderr():
        return script().stderr

    assert f"CKPT_GOAL={run}/step_<none finished>: no manifest.json there" in stderr()
    assert "note: runs are looked for in OUT_ROOT/<suite>-CONFIG_NAME-EXPERT_ARCH-seedTRAIN_SEED" in stderr()
    for step, finished in ((2, True), (10, True), (30, False)):  # step 30 is still being written
        (run / f"step_{step:06d}").mkdir(parents=True)
        if finished:
            (run / f"step_{step:06d}" / "manifest.json").write_text(json.dumps({"format": "mergevla-checkpoint"},
                                                                                indent=2))
    assert f"checkpoint {run}/step_000010 (format mergevla-checkpoint)" in script().stdout  # the evaluator's plan


def test_eval_scripts_refuse_the_other_kind_of_checkpoint_and_quick_runs_apart(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    merged, expert = tmp_path / "merged", tmp_path / "expert"
    for d, kind in ((merged, "mergevla-merged"), (expert, "mergevla-checkpoint")):
        d.mkdir()
        (d / "manifest.json").write_text(json.dumps({"config": {"format": "x"}, "format": kind}, indent=2))
    env = {**script_env(), "PYTHON": sys.executable, "DRY_RUN": "1", "SUITES": "libero_goal", "CKPT_GOAL": str(merged),
           "MERGED_CKPT": str(expert)}

    def run(script, **extra):
        return subprocess.run(["bash", str(repo / "bash_scripts" / script)], env={**env, **extra}, capture_output=True,
                              text=True, cwd=tmp_path)

    done = run("eval.sh")
    assert done.returncode == 2 and (f"error: CKPT_GOAL={merged}: its manifest.json has format 'mergevla-merged', "
                                     "expected 'mergevla-checkpoint' (a fine-tuned checkpoint directory)") in done.stderr
    done = run("eval_merged.sh")
    assert done.returncode == 2 and done.stderr == (
        f"error: MERGED_CKPT={expert}: its manifest.json has format 'mergevla-checkpoint', expected 'mergevla-merged' "
        "(a merged artifact directory, written by mergy.py)\n")
    # QUICK gives defaults the user's settings override, and a results directory of its own
    fake = echo_python(tmp_path / "python")  # prints the evaluator's command line
    argv = run("eval_merged.sh", PYTHON=str(fake), MERGED_CKPT=str(merged), QUICK="1", NUM_TRIALS="2").stdout.split("\n")
    assert argv[argv.index("--results_dir") + 1] == "runs/libero-quick"
    assert argv[argv.index("--num_trials_per_task") + 1] == "2" and argv[argv.index("--max_steps") + 1] == "16"
    assert argv[argv.index("--env_img_res") + 1] == "128" and argv[argv.index("--seed") + 1] == "7"
    done = run("eval_merged.sh", PYTHON=str(fake), MERGED_CKPT=str(merged), QUICK="1", TASK_IDS="", SEED="3")
    assert "--task_ids" not in done.stdout.split("\n")  # an empty TASK_IDS is all tasks, QUICK or not
    assert "note: SEED=3 is finetune_libero.sh's training seed, not used here; the rollouts' seed is EVAL_SEED=7" \
        in done.stderr
    # a self-attention expert's results file is named after its architecture, read from its manifest
    (expert / "manifest.json").write_text(json.dumps({"config": {"expert_arch": "self_attn"},
                                                      "format": "mergevla-checkpoint"}))
    argv = run("eval.sh", PYTHON=str(fake), CKPT_GOAL=str(expert)).stdout.split("\n")
    assert argv[argv.index("--run_name") + 1] == "ft-self_attn--libero_goal"
    # a path the user gave is not one the script looked up: no hint about how runs are found
    done = run("eval.sh", CKPT_GOAL=str(tmp_path / "nope"))
    assert done.returncode == 2 and "note: runs are looked for" not in done.stderr


def test_center_crop_policy_transform_matches_the_crop_and_checks_its_area():
    ramp = np.tile((10 * np.arange(5))[None, :, None], (5, 1, 3)).astype(np.uint8)
    assert CenterCrop(0.64)(ramp)[2, :, 0].tolist() == [4, 12, 20, 28, 36]  # as in the hand-computed test above
    assert CenterCrop(1.0)(ramp) is ramp  # models trained on full frames see them unchanged
    with pytest.raises(ValueError, match=r"crop area is 0.0, expected a fraction in \(0, 1\]"):
        CenterCrop(0.0)
    with pytest.raises(ValueError, match=r"crop area is 1.5, expected a fraction in \(0, 1\]"):
        CenterCrop(1.5)


class _FakeSuite:
    """A LIBERO task suite's interface, without the simulator: `init_counts[i]` fixed init states for task i."""

    def __init__(self, init_counts):
        self.init_counts = init_counts
        self.n_tasks = len(init_counts)

    def get_task(self, i):
        return type("Task", (), {"name": f"task_{i}", "language": f"do task {i}"})()

    def get_task_init_states(self, i):
        return np.zeros((self.init_counts[i], 4))


@pytest.mark.parametrize("suite, steps", [("libero_spatial", 220), ("libero_object", 280), ("libero_goal", 300),
                                          ("libero_10", 520), ("libero_90", 400),
                                          ("libero_object_with_mug", 280), ("libero_10_swap", 520)])
def test_each_suite_and_its_variants_get_the_protocols_step_limit(monkeypatch, suite, steps):
    # docs/DESIGN.md §5's per-suite limits; a LIBERO-Plus variant takes its base suite's
    import experiments.robot.libero.env as env_mod

    monkeypatch.setattr(env_mod, "_task_suite", lambda name: _FakeSuite([50, 50]))
    monkeypatch.setattr(env_mod, "task_categories", lambda *a: None)
    info = suite_info(suite)
    assert (info.max_steps, info.task_names, info.instructions) == (steps, ["task_0", "task_1"],
                                                                    ["do task 0", "do task 1"])
    assert suite_info(suite, max_steps=9).max_steps == 9  # --max_steps overrides the suite's
    with pytest.raises(ValueError, match="no step limit is known for suite 'libero_100'"):  # no variant of libero_10
        suite_info("libero_100")


def test_a_suites_trial_count_is_capped_by_its_task_with_fewest_init_states(monkeypatch):
    import experiments.robot.libero.env as env_mod

    monkeypatch.setattr(env_mod, "_task_suite", lambda name: _FakeSuite([50, 12, 40]))
    monkeypatch.setattr(env_mod, "task_categories", lambda *a: None)
    assert suite_info("libero_goal").init_states == 12


def test_policy_gets_third_person_camera_first_then_wrist():
    agent, wrist = np.full((4, 4, 3), 10, np.uint8), np.full((4, 4, 3), 200, np.uint8)
    obs = {"agentview_image": agent, "robot0_eye_in_hand_image": wrist, "robot0_eef_pos": np.zeros(3),
           "robot0_eef_quat": np.array([0.0, 0.0, 0.0, 1.0]), "robot0_gripper_qpos": np.zeros(2)}
    model = StubModel()
    VLAPolicy(model, LiberoImageTransform(size=4, jpeg=False, center_crop=False)).act([obs], ["x"], [0])
    assert model.seen["images"][0, 0].max() == 10 and model.seen["images"][0, 1].min() == 200


def test_a_batch_of_episodes_keeps_each_episodes_instruction_and_proprio_in_order():
    def obs(x):
        return {"agentview_image": np.zeros((4, 4, 3), np.uint8), "robot0_eye_in_hand_image": np.zeros((4, 4, 3), np.uint8),
                "robot0_eef_pos": np.array([x, 0.0, 0.0]), "robot0_eef_quat": np.array([0.0, 0.0, 0.0, 1.0]),
                "robot0_gripper_qpos": np.zeros(2)}

    model = StubModel()
    policy = VLAPolicy(model)
    assert policy.start_episodes([obs(0.0), obs(2.0)], ["a", "b"]) == [{}, {}]  # nothing to log, one per episode
    actions = policy.act([obs(0.0), obs(2.0)], ["first task", "second task"], [3, 4])
    assert model.seen["instructions"] == ["first task", "second task"] and actions.shape == (2, 8, 7)
    assert model.seen["proprio"][:, 0].tolist() == [-1.0, 1.0]  # eef x 0 and 2 in [0, 2] → -1 and +1


def test_a_half_precision_model_gives_float32_actions_and_a_model_without_stats_is_refused():
    class HalfModel(StubModel):
        def predict_action(self, x):
            return super().predict_action(x).to(torch.bfloat16)

    obs = {"agentview_image": np.zeros((4, 4, 3), np.uint8), "robot0_eye_in_hand_image": np.zeros((4, 4, 3), np.uint8),
           "robot0_eef_pos": np.zeros(3), "robot0_eef_quat": np.array([0.0, 0.0, 0.0, 1.0]),
           "robot0_gripper_qpos": np.zeros(2)}
    actions = VLAPolicy(HalfModel()).act([obs], ["x"], [0])
    assert actions.dtype == np.float32 and actions[0, :, 6].tolist() == [-1.0, 1.0] * 4
    np.testing.assert_allclose(actions[0, :, 0], 1.0)
    model = StubModel()
    model.norm_stats = None
    with pytest.raises(ValueError, match="the checkpoint has no norm_stats; it cannot turn predictions into actions"):
        VLAPolicy(model).act([obs], ["x"], [0])


def test_run_names_are_file_name_safe():
    from experiments.robot.libero.run_libero_eval import slug

    assert slug("TA (no masks)--merged ties") == "TA-no-masks---merged-ties"  # each run of others: one "-"
    assert slug("(exemplar router)") == "exemplar-router" and slug("/ /") == "run"


def test_every_protocol_knob_is_part_of_the_runs_identity():
    # a resumed run is refused when any of these differ, so each must change the recorded protocol
    from experiments.robot.libero.run_libero_eval import protocol_info

    base = GenerateConfig()
    ref = protocol_info(base, 0.9)
    assert ref["center_crop"] is True and ref["crop_area"] == 0.9 and protocol_info(base, 1.0)["center_crop"] is False
    changes = {"max_steps": 16, "num_steps_wait": 3, "num_open_loop_steps": 4, "env_img_res": 128, "resize_size": 64,
               "jpeg_resize": False, "env_seed": 1, "fast_render": True}
    for k, v in changes.items():
        assert protocol_info(dataclasses.replace(base, **{k: v}), 0.9) == {**ref, k: v}, k


def test_an_artifact_without_a_recorded_router_routes_by_value():
    from experiments.robot.libero.policies import default_method, default_router

    old = {"format": "mergevla-merged", "algorithm": "ties"}  # written before the router's default was recorded
    assert default_router(old) == "value"
    assert default_method(old, "value") == "TIES" and default_method(old, "key") == "TIES (key router)"
    assert default_router({"format": "mergevla-checkpoint"}) is None


def test_video_frames_are_the_third_person_camera_the_right_way_up():
    from experiments.robot.libero.preprocess import upright_agentview

    agent = np.zeros((2, 3, 3), np.uint8)
    agent[0, 0] = 255  # top-left as LIBERO renders it (upside down) → bottom-right upright
    frame = upright_agentview({"agentview_image": agent, "robot0_eye_in_hand_image": np.ones((2, 3, 3), np.uint8)})
    assert frame.shape == (2, 3, 3) and frame[1, 2].tolist() == [255] * 3 and frame.sum() == 3 * 255


class _FakeOffScreenEnv:
    """LIBERO's OffScreenRenderEnv as the factory uses it; records what it is asked."""

    built = []

    def __init__(self, bddl_file_name, camera_heights, camera_widths):
        self.bddl, self.calls, self.closed = bddl_file_name, [], False
        _FakeOffScreenEnv.built.append(self)

    def seed(self, s):
        self.calls.append(("seed", s))

    def reset(self):
        self.calls.append(("reset",))

    def set_init_state(self, state):
        self.calls.append(("init", state.tolist()))
        return {"state": state}

    def close(self):
        self.closed = True


def test_env_factory_builds_one_simulator_per_task_and_seeds_every_episode(monkeypatch):
    import experiments.robot.libero.env as env_mod

    class Suite(_FakeSuite):
        def get_task(self, i):
            return type("Task", (), {"name": f"task_{i}", "language": f"do task {i}", "problem_folder": "p",
                                     "bddl_file": f"t{i}.bddl"})()

        def get_task_init_states(self, i):
            return np.arange(3)[:, None] + 10 * i  # task i, state k: [10 i + k]

    _FakeOffScreenEnv.built = []
    monkeypatch.setattr(env_mod, "import_libero", lambda *a: (None, lambda name: "/bddl", _FakeOffScreenEnv))
    monkeypatch.setattr(env_mod, "_task_suite", lambda name: Suite([3, 3]))
    factory = LiberoEnvFactory(env_seed=5)
    a = factory("libero_goal", 0, 2)
    assert a.instruction == "do task 0" and a.reset() == {"state": np.array([2])}
    b = factory("libero_goal", 0, 1)  # the same task: its simulator is kept
    assert b.reset()["state"].tolist() == [1] and len(_FakeOffScreenEnv.built) == 1
    first = _FakeOffScreenEnv.built[0]
    assert first.bddl == "/bddl/p/t0.bddl" and first.calls == [("seed", 5), ("reset",), ("init", [2]),
                                                               ("seed", 5), ("reset",), ("init", [1])]
    c = factory("libero_goal", 1, 0)  # another task: another simulator, and the old one is closed
    assert c.instruction == "do task 1" and c.reset()["state"].tolist() == [10]
    assert len(_FakeOffScreenEnv.built) == 2 and first.closed and _FakeOffScreenEnv.built[1].bddl == "/bddl/p/t1.bddl"
    factory.close()
    assert _FakeOffScreenEnv.built[1].closed
