"""Exemplar router: scores by hand, calibration from demos on disk, the files tied to the artifact's weights."""

import json
import re
import shutil

import numpy as np
import pytest
import torch

from model_merging.errors import MergeError
from model_merging.exemplar_router import DataSource, first_frames, main
from model_merging.exemplars import EXEMPLAR_MANIFEST, EXEMPLAR_WEIGHTS, read_exemplars
from model_merging.merge import MergeOptions, merge_experts
from model_merging.merged_model import load_merged
from model_merging.routed_policy import RoutedPolicy
from model_merging.router import exemplar_scores, nearest_neighbour_scale
from model_merging.synthetic import save_perturbed_experts
from prismatic.models import BaseModelConfig, build_vla
from prismatic.vla.datasets import load_suite
from prismatic.vla.datasets.synthetic import make_tasks, write_hdf5_suite

NAMES = ["spatial", "object", "goal"]


def test_scores_by_hand():
    # one sample, two tokens per side: token means act (1, 0), vis (0, 3)
    h_act = torch.tensor([[[2.0, 0.0], [0.0, 0.0]]])
    h_vis = torch.tensor([[[0.0, 2.0], [0.0, 4.0]]])
    ex_act = torch.tensor([[4.0, 0.0], [1.0, 2.0]])  # nearest: (1, 2) at distance 2
    ex_vis = torch.tensor([[0.0, 0.0], [3.0, 7.0]])  # nearest: (0, 0) at distance 3
    s = exemplar_scores(h_act, h_vis, ex_act, ex_vis, scale_act=4.0, scale_vis=1.5)
    assert s.item() == pytest.approx(-0.5 * (2 / 4.0 + 3 / 1.5))
    # nearest other row: 0 → 1 at 5, 1 → 0 at 5, 2 → 1 at 1 (rows 1 and 2 are (3, 4) and (3, 5))
    assert nearest_neighbour_scale(torch.tensor([[0.0, 0.0], [3.0, 4.0], [3.0, 5.0]])) == pytest.approx((5 + 1 + 1) / 3)


@pytest.fixture(scope="module")
def merged_dir(tmp_path_factory):
    model = build_vla("tiny", BaseModelConfig(random_seed=0), seed=0)
    experts = save_perturbed_experts(model, tmp_path_factory.mktemp("experts"), NAMES, noise=0.05, seed=1)
    return merge_experts(experts, tmp_path_factory.mktemp("merged") / "m", MergeOptions(), log=None)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """One HDF5 suite per task, named like the task, each with its own scenes and instructions."""
    root = tmp_path_factory.mktemp("data")
    for i, name in enumerate(NAMES):
        write_hdf5_suite(root, name, make_tasks(num_tasks=2, demos_per_task=3, steps=6, image_size=64, seed=10 + i))
    return root


@pytest.fixture
def fresh(merged_dir, tmp_path):
    """A copy of the merged artifact this test may write exemplars into."""
    return shutil.copytree(merged_dir, tmp_path / "m")


def test_first_frames_are_episode_starts_spread_over_the_suite(data_root):
    ds = load_suite(data_root, "goal")
    instructions, images, fp = first_frames(DataSource(data_root, "goal"), 3)
    picked = [0, 2, 5]  # 6 episodes, 3 wanted: linspace(0, 5, 3) rounded
    assert instructions == [ds.instructions[i] for i in picked]
    assert np.array_equal(images, ds.images(ds.starts[picked])) and fp == ds.fingerprint
    assert len(first_frames(DataSource(data_root, "goal"), 50)[0]) == 6  # never more than the suite has


def test_cli_calibrates_and_the_router_sends_each_task_its_own_frames(fresh, data_root, capsys):
    # frames as they are, as the batches below show them (the default is LIBERO's view, with a 0.9 crop for
    # experts that record no training crop)
    assert main(["--merged", str(fresh), "--data_root", str(data_root), "--per_task", "4", "--frames", "crop",
                 "--crop_area", "1"]) == 0
    out = capsys.readouterr().out
    assert "spatial: 4, object: 4, goal: 4 frames" in out and "note:" not in out  # as many frames as asked for
    merged = load_merged(fresh)
    assert merged.router_variants[-1] == "exemplar"
    meta = json.loads((fresh / EXEMPLAR_MANIFEST).read_text())
    assert meta["sources"]["goal"]["suite"] == "goal" and meta["sources"]["goal"]["frames"] == 4
    for e, name in enumerate(NAMES):
        instructions, images, _ = first_frames(DataSource(data_root, name), 4)
        batch = merged.multi_expert().processor(instructions, images, np.zeros((4, 8), np.float32))
        result = merged.route(batch, "exemplar")
        assert result.names() == [name] * 4  # own frames: distance 0 to an exemplar, the best possible score
        assert torch.all(result.scores[:, e] == 0) and torch.all(result.scores.max(1).values == 0)
        # the exemplars are the token means of candidate e's states in the batched all-candidates forward
        h_act, h_vis, task = merged.candidate_states(batch)
        rows = task == e
        assert torch.allclose(h_act[rows].mean(1), merged.exemplars.states[name]["act"], atol=1e-5)
        assert torch.allclose(h_vis[rows].mean(1), merged.exemplars.states[name]["vis"], atol=1e-5)
        for side in ("act", "vis"):  # each side's typical spacing from its own exemplars
            assert merged.exemplars.scales[name][side] == pytest.approx(
                nearest_neighbour_scale(merged.exemplars.states[name][side]), rel=1e-6)
    # the routed policy accepts the variant and routes with it
    policy = RoutedPolicy(merged, variant="exemplar")
    ins, ims, _ = first_frames(DataSource(data_root, "object"), 2)
    obs = [{"agentview_image": f[0], "robot0_eye_in_hand_image": f[1]} for f in ims]
    assert [i["routed_expert"] for i in policy.start_episodes(obs, ins)] == ["object", "object"]


def test_exemplars_of_other_weights_or_a_changed_file_are_refused(fresh, data_root):
    assert main(["--merged", str(fresh), "--data_root", str(data_root), "--per_task", "2"]) == 0
    manifest = json.loads((fresh / "manifest.json").read_text())
    meta = json.loads((fresh / EXEMPLAR_MANIFEST).read_text())
    assert read_exemplars(fresh, manifest) is not None  # LIBERO's view; no recorded crop: the default 0.9
    assert meta["view"] == {"kind": "libero", "crop_area": 0.9, "resize_size": 224, "jpeg": True}
    with pytest.raises(MergeError, match="other merged weights or tasks: recompute"):
        read_exemplars(fresh, {**manifest, "weights_sha256": "0" * 64})
    with pytest.raises(MergeError, match="the artifact's router reads layer 2"):
        read_exemplars(fresh, {**manifest, "router": {**manifest["router"], "layer": 2}})
    for bad, message in ((0.0, "scales.goal.vis is 0.0, expected a finite number > 0"), ("x", "malformed")):
        broken = {**meta, "scales": {**meta["scales"], "goal": {**meta["scales"]["goal"], "vis": bad}}}
        (fresh / EXEMPLAR_MANIFEST).write_text(json.dumps(broken))
        with pytest.raises(MergeError, match=message):
            read_exemplars(fresh, manifest)
    (fresh / EXEMPLAR_MANIFEST).write_text(json.dumps(meta))
    with open(fresh / EXEMPLAR_WEIGHTS, "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\0\0\0\1")
    with pytest.raises(MergeError, match="does not match the sha256"):
        load_merged(fresh)
    assert load_merged(fresh, exemplars=False).router_variants == manifest["router"]["variants"]


def test_cli_errors_name_what_to_fix(fresh, data_root, capsys):
    # the synthetic experts record no training data: without --data_root there is nowhere to take demos from
    assert main(["--merged", str(fresh)]) == 2
    assert "records no HDF5 dataset to take demos from: give --data_root" in capsys.readouterr().err
    refused = [  # (flags after --merged and --data_root, what the error says)
        (["--suites", "goal"], "--suites entry 'goal': expected TASK=SUITE"),
        (["--suites", "goal="], "--suites entry 'goal=': expected TASK=SUITE"),
        (["--suites", "=goal"], "--suites entry '=goal': expected TASK=SUITE"),
        (["--dataset_format", "parquet"], "--dataset_format is 'parquet', expected hdf5 or rlds"),
        (["--suites", "nope=goal"], "--suites names tasks ['nope']"),
        (["--suites", "goal=missing"], "unknown suite 'missing'"),
        (["--suites", "goal=a", "goal=b"], "--suites names task 'goal' twice"),
        (["--per_task", "1"], "at least 2 frames per task"),
        (["--frames", "raw"], "frame view (--frames) is 'raw', expected one of ['libero', 'crop']"),
        (["--batch_size", "0"], "--batch_size is 0, expected at least 1"),
        (["--crop_area", "0"], "crop area (--crop_area) is 0.0, expected a fraction of the image area in (0, 1]"),
        (["--resize_size", "0"], "resize size (--resize_size) is 0, expected a positive number of pixels"),
    ]
    if not torch.cuda.is_available():
        refused.append((["--device", "cuda"], "device 'cuda' was requested but CUDA is not available"))
    for flags, message in refused:
        assert main(["--merged", str(fresh), "--data_root", str(data_root), *flags]) == 2, flags
        assert message in capsys.readouterr().err
    assert not (fresh / EXEMPLAR_MANIFEST).exists() and not (fresh / EXEMPLAR_WEIGHTS).exists()
    assert main(["--merged", str(fresh), "--data_root", str(data_root), "--per_task", "2"]) == 0
    before = (fresh / EXEMPLAR_WEIGHTS).read_bytes()
    assert main(["--merged", str(fresh), "--data_root", str(data_root), "--per_task", "3"]) == 2
    assert "exists: pass --overwrite true" in capsys.readouterr().err
    assert (fresh / EXEMPLAR_WEIGHTS).read_bytes() == before
    assert main(["--merged", str(fresh), "--data_root", str(data_root), "--per_task", "3", "--overwrite", "true"]) == 0
    assert json.loads((fresh / EXEMPLAR_MANIFEST).read_text())["sources"]["goal"]["frames"] == 3
    capsys.readouterr()
    assert main(["--merged", str(fresh), "--data_root", str(data_root), "--per_task", "500", "--overwrite", "true"]) == 0
    assert ("note: spatial, object, goal: fewer first frames than --per_task 500, as many as the data holds "
            "episodes") in capsys.readouterr().out
    expert = json.loads((fresh / "manifest.json").read_text())["experts"][0]["path"]  # the wrong kind of directory
    assert main(["--merged", expert, "--data_root", str(data_root)]) == 2
    assert ("field 'format' is 'mergevla-checkpoint', expected 'mergevla-merged' (a fine-tuned checkpoint "
            "(finetune.py) was given where a merged artifact (mergy.py --out) is needed)") in capsys.readouterr().err


def test_subspace_variants_still_check_against_the_stored_ones(fresh, data_root):
    assert main(["--merged", str(fresh), "--data_root", str(data_root), "--per_task", "2"]) == 0
    merged = load_merged(fresh)
    with pytest.raises(ValueError, match="router variant 'exemplar'"):
        merged.subspaces("exemplar")
    with pytest.raises(ValueError, match="router variant 'exemplar'"):
        RoutedPolicy(load_merged(fresh, exemplars=False), variant="exemplar")


def test_the_exemplar_router_without_exemplars_says_how_to_compute_them(fresh):
    with pytest.raises(MergeError, match=f"compute them with python -m model_merging.exemplar_router --merged {fresh}"):
        RoutedPolicy(load_merged(fresh), variant="exemplar")


def test_libero_rows_of_another_router_get_their_own_default_label(merged_dir):
    from experiments.robot.libero.policies import default_method

    manifest = json.loads((merged_dir / "manifest.json").read_text())
    plain = default_method(manifest)
    assert default_method(manifest, "value") == plain and plain
    assert default_method(manifest, "exemplar") == f"{plain} (exemplar router)"


def test_libero_view_shows_dataset_frames_as_libero_evaluation_shows_rendered_ones(fresh, data_root):
    from experiments.robot.libero.preprocess import LiberoImageTransform, rotate_180

    assert main(["--merged", str(fresh), "--data_root", str(data_root), "--per_task", "3", "--crop_area", "0.81",
                 "--batch_size", "2"]) == 0
    merged = load_merged(fresh)
    # evaluation renders upside down and rotates: the upright dataset frame, rendered, routes to distance 0
    shown = LiberoImageTransform(224, True, True, 0.81)
    for e, name in enumerate(NAMES):
        instructions, images, _ = first_frames(DataSource(data_root, name), 3)
        rendered = [[shown(rotate_180(c)) for c in frame] for frame in images]
        batch = merged.multi_expert().processor(instructions, np.stack(rendered), np.zeros((3, 8), np.float32))
        result = merged.route(batch, "exemplar")
        assert result.names() == [name] * 3 and torch.allclose(result.scores[:, e], torch.zeros(3), atol=1e-4)
        # not what the frames give without LIBERO's JPEG round trip, resize and crop
        plain = merged.multi_expert().processor(instructions, images, np.zeros((3, 8), np.float32))
        assert merged.route(plain, "exemplar").scores[:, e].max() < -1e-3


def test_a_view_other_than_the_exemplars_is_warned_about(fresh, data_root):
    from model_merging.exemplars import FrameView, exemplars_sha256, view_mismatch
    from prismatic.io import sha256_file

    libero = FrameView("libero", 0.9)
    assert view_mismatch(fresh, libero) is None  # no exemplars yet: nothing to compare
    assert main(["--merged", str(fresh), "--data_root", str(data_root), "--per_task", "2", "--crop_area", "0.9"]) == 0
    meta = json.loads((fresh / EXEMPLAR_MANIFEST).read_text())
    assert view_mismatch(fresh, libero) is None
    assert exemplars_sha256(fresh) == meta["weights_sha256"] == sha256_file(fresh / EXEMPLAR_WEIGHTS)
    assert view_mismatch(fresh, FrameView("libero", 1.0)) == (
        f"warning: the exemplars in {fresh / EXEMPLAR_MANIFEST} were computed from frames shown with LIBERO's JPEG "
        "round trip, Lanczos resize to 224 and a centre crop of 0.9 of the area, this evaluation shows them with "
        "LIBERO's JPEG round trip, Lanczos resize to 224 and no centre crop: recompute them with --frames libero "
        "--resize_size 224 --jpeg_resize true --crop_area 1 --overwrite true")
    assert "--frames libero --resize_size 256 --jpeg_resize false" in view_mismatch(fresh, FrameView("libero", 0.9, 256, False))
    assert "this evaluation shows them with a centre crop of 0.9 of the area: recompute them with --frames crop " \
        "--crop_area 0.9 --overwrite true" in view_mismatch(fresh, FrameView("crop", 0.9))
    (fresh / EXEMPLAR_MANIFEST).write_text(json.dumps({k: v for k, v in meta.items() if k != "view"}))
    assert "computed from frames shown with a view the file does not record" in view_mismatch(fresh, libero)
    with pytest.raises(ValueError, match=r"crop area \(--crop_area\) is 0.0"):
        FrameView("crop", 0.0)


def test_an_expert_manifest_that_is_damaged_is_named_not_a_traceback(tmp_path):
    from types import SimpleNamespace

    from model_merging.exemplar_router import recorded_sources
    from prismatic.checkpoint import MANIFEST_FILE

    ckpt = tmp_path / "expert"
    ckpt.mkdir()
    merged = SimpleNamespace(task_names=["goal"], directory=tmp_path / "m",
                             manifest={"experts": [{"name": "goal", "path": str(ckpt)}]})
    # a checkpoint that is gone records nothing: --data_root stands in for it
    assert recorded_sources(merged, data_root=tmp_path)["goal"].suite == "goal"
    for text, message in [("[1, 2]", "does not hold a JSON object (found list)"),
                          ('{"dataset": "goal"}', "field 'dataset' must be an object, found str")]:
        (ckpt / MANIFEST_FILE).write_text(text)
        with pytest.raises(MergeError, match=re.escape(message)) as e:
            recorded_sources(merged, data_root=tmp_path)
        assert str(ckpt / MANIFEST_FILE) in str(e.value)
    (ckpt / MANIFEST_FILE).write_text('{"dataset": {"format": "hdf5", "path": "%s", "suite": "goal"}}' % (tmp_path / "goal"))
    source = recorded_sources(merged)["goal"]
    assert (source.data_root, source.suite, source.dataset_format) == (tmp_path, "goal", "hdf5")
    assert recorded_sources(merged, suites={"goal": "goal_v2"})["goal"].suite == "goal_v2"  # --suites wins
    # another root keeps the recorded suite's name; --dataset_format wins over the recorded format
    (ckpt / MANIFEST_FILE).write_text('{"dataset": {"format": "hdf5", "path": "%s", "suite": "goal_demos"}}'
                                      % (tmp_path / "goal_demos"))
    source = recorded_sources(merged, data_root=tmp_path / "copy", dataset_format="rlds")["goal"]
    assert (source.data_root, source.suite, source.dataset_format) == (tmp_path / "copy", "goal_demos", "rlds")


def test_exemplars_must_fit_the_artifacts_tasks_and_width(fresh, data_root):
    from safetensors.torch import load_file, save_file

    from prismatic.io import sha256_file

    assert main(["--merged", str(fresh), "--data_root", str(data_root), "--per_task", "2"]) == 0
    manifest = json.loads((fresh / "manifest.json").read_text())
    with pytest.raises(MergeError, match="other merged weights or tasks"):  # same weights, tasks in another order
        read_exemplars(fresh, {**manifest, "task_names": NAMES[::-1]})
    with pytest.raises(MergeError, match=r"tensor spatial.act is \[2, 128\], expected finite \(n >= 2, 64\)"):
        read_exemplars(fresh, {**manifest, "router": {**manifest["router"], "hidden": 64}})
    # one exemplar is no spacing to measure distances in; the file and its recorded sha256 still agree
    meta = json.loads((fresh / EXEMPLAR_MANIFEST).read_text())
    tensors = load_file(str(fresh / EXEMPLAR_WEIGHTS))
    save_file({**tensors, "goal.vis": tensors["goal.vis"][:1].contiguous()}, str(fresh / EXEMPLAR_WEIGHTS))
    (fresh / EXEMPLAR_MANIFEST).write_text(json.dumps({**meta, "weights_sha256": sha256_file(fresh / EXEMPLAR_WEIGHTS)}))
    with pytest.raises(MergeError, match=r"tensor goal.vis is \[1, 128\], expected finite \(n >= 2, 128\)"):
        read_exemplars(fresh, manifest)


def test_calibration_shows_each_task_its_own_frames_and_measures_their_spacing(data_root, tmp_path, monkeypatch):
    from types import SimpleNamespace

    import model_merging.exemplar_router as er
    from model_merging.exemplars import FrameView

    shown = []

    def states(merged, task, instructions, images, view, batch_size):  # stands in for task `task`'s forwards
        shown.append((task, instructions, images))
        return {"act": torch.tensor([[0.0, 0.0], [3.0, 4.0], [3.0, 5.0]]) + task,
                "vis": torch.tensor([[0.0, 0.0], [0.0, 2.0], [0.0, 6.0]])}

    monkeypatch.setattr(er, "task_exemplars", states)
    merged, view = SimpleNamespace(task_names=NAMES, directory=tmp_path / "m"), FrameView("crop")
    sources = {t: DataSource(data_root, t) for t in NAMES}
    exemplars, provenance = er.calibrate(merged, sources, 3, view)
    for e, name in enumerate(NAMES):
        instructions, images, fp = first_frames(sources[name], 3)
        assert shown[e][:2] == (e, instructions) and np.array_equal(shown[e][2], images)
        assert torch.equal(exemplars.states[name]["act"][0], torch.tensor([e, e], dtype=torch.float32))
        # nearest other exemplar: act 5, 1, 1; vis 2, 2, 4
        assert exemplars.scales[name] == {"act": pytest.approx(7 / 3), "vis": pytest.approx(8 / 3)}
        assert provenance[name] == {"data_root": str(data_root), "suite": name, "dataset_format": "hdf5",
                                    "fingerprint": fp, "frames": 3}
    with pytest.raises(MergeError, match="per_task is 1: the exemplar router needs at least 2 frames per task"):
        er.calibrate(merged, sources, 1, view)
    with pytest.raises(MergeError, match=re.escape(f"no demos given for tasks ['object', 'goal'] of {tmp_path / 'm'}")):
        er.calibrate(merged, {"spatial": sources["spatial"]}, 3, view)
    write_hdf5_suite(tmp_path, "single", make_tasks(num_tasks=1, demos_per_task=1, steps=3, image_size=64))
    with pytest.raises(MergeError, match=re.escape("single holds 1 episode(s); the exemplar router needs at least 2 per task")):
        er.calibrate(SimpleNamespace(task_names=["single"], directory=tmp_path), {"single": DataSource(tmp_path, "single")},
                     3, view)
    monkeypatch.setattr(er, "task_exemplars", lambda merged, task, instructions, images, view, batch_size: {
        "act": torch.zeros(len(images), 2), "vis": torch.tensor([[0.0, 1.0]] * len(images))})
    with pytest.raises(MergeError, match="the first frames of spatial give identical states: no exemplar spacing"):
        er.calibrate(merged, sources, 3, view)


def test_each_candidate_is_scored_against_its_own_exemplars_shared_forward_or_not():
    from types import SimpleNamespace

    from model_merging.exemplars import Exemplars
    from model_merging.merged_model import MergedModel

    ex = Exemplars(states={"a": {"act": torch.tensor([[0.0, 0.0], [0.0, 1.0]]), "vis": torch.tensor([[0.0, 0.0], [0.0, 2.0]])},
                           "b": {"act": torch.tensor([[5.0, 0.0], [5.0, 2.0]]), "vis": torch.tensor([[5.0, 0.0], [5.0, 1.0]])}},
                   scales={"a": {"act": 1.0, "vis": 2.0}, "b": {"act": 2.0, "vis": 1.0}})
    merged = SimpleNamespace(task_names=["a", "b"], num_tasks=2, exemplars=ex, router_variants=["exemplar"],
                             directory="m")
    at_a, at_b = torch.tensor([[[0.0, 1.0]]]), torch.tensor([[[5.0, 0.0]]])  # (1 row, 1 token, D)
    # one shared row (task None) serves both candidates: it sits on a's exemplars, at 26 ** 0.5 / 2 and 5 / 1 of b's
    shared = MergedModel._exemplar_scores(merged, at_a, torch.zeros(1, 1, 2), None)
    assert torch.allclose(shared, torch.tensor([[0.0, -0.5 * (26 ** 0.5 / 2 + 5.0)]]))
    # rows b*M + e, each candidate's own forward: a's row sits on a's exemplars, b's row at act distance 1 of b's
    per_candidate = MergedModel._exemplar_scores(merged, torch.cat([at_a, torch.tensor([[[5.0, 1.0]]])]),
                                                 torch.cat([torch.zeros(1, 1, 2), at_b]), torch.tensor([0, 1]))
    assert torch.allclose(per_candidate, torch.tensor([[0.0, -0.5 * (1.0 / 2)]]))


def test_the_default_crop_is_the_experts_recorded_training_crop():
    from model_merging.exemplar_router import default_crop_area

    assert default_crop_area({"trained_crop_area": {"spatial": 0.81, "goal": None}}) == 0.81
    assert default_crop_area({"trained_crop_area": {"spatial": None}}) == default_crop_area({}) == 0.9
    with pytest.raises(ValueError, match="trained with different random crops"):
        default_crop_area({"trained_crop_area": {"spatial": 0.81, "goal": 0.9}})
