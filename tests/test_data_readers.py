"""Raw LIBERO HDF5 reading: no-op filter, chunking, flips, instruction, proprio, lazy vs preloaded."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from data_fixtures import SUITE, hdf5_root, kept_steps, small_tasks

from prismatic.vla.datasets import DatasetError, chunk_indices, load_suite, noop_keep_mask
from prismatic.vla.datasets.synthetic import make_tasks, write_hdf5_suite


def test_noop_filter_matches_the_rlds_release_rule():
    z = [0.0] * 6
    actions = np.array([
        z + [-1.0],  # nothing kept yet, no motion: no-op
        [0.1] + z[1:] + [-1.0],  # moves: kept
        z + [-1.0],  # no motion, gripper as the last kept step: no-op
        z + [1.0],  # no motion but the gripper changes: kept
        z + [1.0],  # no-op
        [5e-5] + z[1:] + [1.0],  # motion below the 1e-4 threshold: no-op
        [2e-4] + z[1:] + [1.0],  # above it: kept
    ])
    assert noop_keep_mask(actions).tolist() == [False, True, False, True, False, False, True]
    # a rotation alone is motion too
    assert noop_keep_mask(np.array([[0.0, 0.0, 0.0, 0.1, 0.0, 0.0, -1.0]])).tolist() == [True]


def test_chunks_take_seven_future_steps_and_repeat_the_last():
    assert chunk_indices(3, 4).tolist() == [[0, 1, 2, 2], [1, 2, 2, 2], [2, 2, 2, 2]]
    assert chunk_indices(10, 8)[1].tolist() == [1, 2, 3, 4, 5, 6, 7, 8]


def _expected_samples(tasks):
    """Every kept step of every demo, built from the generator's upright arrays, in the dataset's order."""
    out = []
    for task in tasks:
        for demo in task.demos:
            keep = kept_steps(demo.actions)
            acts = demo.actions[keep].astype(np.float32)
            acts[:, -1] = (1 - acts[:, -1]) / 2  # -1 open → 1, +1 close → 0
            out.append((task.instruction, acts, np.concatenate([demo.ee_states, demo.gripper_states], 1)[keep],
                        np.stack([demo.agentview[keep], demo.wrist[keep]], 1)))
    return out


@pytest.mark.parametrize("preload_gb", [4.0, 0.0], ids=["preloaded", "lazy"])
def test_hdf5_samples_are_flipped_filtered_and_chunked(tmp_path, preload_gb):
    tasks = small_tasks()
    ds = load_suite(hdf5_root(tmp_path, tasks), SUITE, preload_images_gb=preload_gb)
    expected = _expected_samples(tasks)
    assert len(ds) == sum(len(e[1]) for e in expected) == 4 * (20 - 3)  # 3 no-ops per synthetic demo
    by_start = {(e[0], e[1][0].tobytes()): e for e in expected}
    for ep_start in ds.starts:
        s = ds[int(ep_start)]
        instr, acts, proprio, images = by_start[(s["instruction"], s["actions"][0].tobytes())]
        n = len(acts)
        for t in (0, 1, n - 2, n - 1):
            s = ds[int(ep_start) + t]
            np.testing.assert_array_equal(s["images"], images[t])  # upright again, both cameras
            np.testing.assert_allclose(s["proprio"], proprio[t], rtol=1e-6)
            np.testing.assert_allclose(s["actions"], acts[np.minimum(np.arange(t, t + 8), n - 1)], rtol=1e-6)
            assert s["images"].dtype == np.uint8 and s["proprio"].dtype == s["actions"].dtype == np.float32
    assert set(np.unique(ds.actions[:, -1])) == {0.0, 1.0}


def test_lazy_and_preloaded_reads_agree(tmp_path):
    root = hdf5_root(tmp_path)
    a = load_suite(root, SUITE, preload_images_gb=4.0)
    b = load_suite(root, SUITE, preload_images_gb=0.0)
    idx = np.arange(len(a))
    for k in ("images", "proprio", "actions"):
        np.testing.assert_array_equal(a.get_batch(idx)[k], b.get_batch(idx)[k])
    assert a.get_batch(idx)["instructions"] == b.get_batch(idx)["instructions"]


def test_upright_files_are_not_flipped(tmp_path):
    tasks = small_tasks()
    ds = load_suite(hdf5_root(tmp_path, tasks, upright=True), SUITE)
    flipped = load_suite(hdf5_root(tmp_path / "raw", tasks), SUITE)
    np.testing.assert_array_equal(ds.get_batch(np.arange(len(ds)))["images"],
                                  flipped.get_batch(np.arange(len(ds)))["images"])


def test_no_filter_keeps_every_step(tmp_path):
    ds = load_suite(hdf5_root(tmp_path), SUITE, filter_noops=False)
    assert len(ds) == 4 * 20
    assert ds.info["frame_size"] == [16, 16]  # as recorded (what evaluation compares its renders with)


def test_instruction_comes_from_problem_info(tmp_path):
    ds = load_suite(hdf5_root(tmp_path), SUITE)
    assert sorted(set(ds.instructions)) == sorted(t.instruction for t in small_tasks())


@pytest.mark.parametrize("stored", ['"put the red cube in the basket"', ["put the red ", "cube in the basket"]])
def test_quoted_or_split_instructions_are_cleaned(tmp_path, stored):
    root = hdf5_root(tmp_path)
    for f in (root / SUITE).glob("*.hdf5"):
        with h5py.File(f, "a") as h:
            h["data"].attrs["problem_info"] = json.dumps({"language_instruction": stored})
    assert set(load_suite(root, SUITE).instructions) == {"put the red cube in the basket"}


# ------------------------------------------------------------------------------------------- bad input


def test_missing_data_root(tmp_path):
    with pytest.raises(DatasetError, match=r"data_root .*nope does not exist"):
        load_suite(tmp_path / "nope", SUITE)


def test_unknown_suite_lists_the_available_ones(tmp_path):
    with pytest.raises(DatasetError, match=r"unknown suite 'libero_goal'.*available hdf5 suites: \['libero_spatial'\]"):
        load_suite(hdf5_root(tmp_path), "libero_goal")


def test_empty_suite_directory(tmp_path):
    (tmp_path / SUITE).mkdir()
    with pytest.raises(DatasetError, match="holds no \\*.hdf5 files: the dataset is empty"):
        load_suite(tmp_path, SUITE)


def test_file_without_demos_is_an_empty_dataset(tmp_path):
    (tmp_path / SUITE).mkdir()
    with h5py.File(tmp_path / SUITE / "x_demo.hdf5", "w") as f:
        f.create_group("data").attrs["problem_info"] = json.dumps({"language_instruction": "pick up the cube"})
    with pytest.raises(DatasetError, match="the dataset is empty"):
        load_suite(tmp_path, SUITE)


def test_truncated_hdf5_names_the_file(tmp_path):
    root = hdf5_root(tmp_path)
    victim = sorted((root / SUITE).glob("*.hdf5"))[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 3])
    with pytest.raises(DatasetError, match=f"{victim.name}.*(corrupt|truncated)"):
        load_suite(root, SUITE)


def test_garbage_hdf5_names_the_file(tmp_path):
    (tmp_path / SUITE).mkdir()
    (tmp_path / SUITE / "bad_demo.hdf5").write_bytes(b"not an hdf5 file" * 100)
    with pytest.raises(DatasetError, match="bad_demo.hdf5 cannot be opened as HDF5"):
        load_suite(tmp_path, SUITE)


def test_missing_instruction_and_wrong_shapes_are_named(tmp_path):
    root = hdf5_root(tmp_path)
    f0 = sorted((root / SUITE).glob("*.hdf5"))[0]
    with h5py.File(f0, "a") as f:
        del f["data"].attrs["problem_info"]
    with pytest.raises(DatasetError, match="problem_info.*missing"):
        load_suite(root, SUITE)
    with h5py.File(f0, "a") as f:
        f["data"].attrs["problem_info"] = json.dumps({"language_instruction": "pick up the cube"})
        del f["data/demo_0/obs/ee_states"]
        f["data/demo_0/obs"].create_dataset("ee_states", data=np.zeros((20, 7)))
    with pytest.raises(DatasetError, match=r"demo_0/obs/ee_states has shape \(20, 7\), expected \(T, 6\)"):
        load_suite(root, SUITE)


def test_frame_sizes_that_cannot_be_batched_are_named(tmp_path):
    for preload in (4.0, 0.0):  # preloaded, and read from the files on demand
        root = tmp_path / f"p{preload}"
        write_hdf5_suite(root, SUITE, small_tasks(image_size=16)[:1])
        write_hdf5_suite(root / "other", SUITE, make_tasks(num_tasks=2, demos_per_task=1, steps=20, image_size=24,
                                                           seed=0)[1:])
        (later,) = (root / "other" / SUITE).glob("*.hdf5")
        later.rename(root / SUITE / ("z" + later.name))  # sorts after the 16-px file
        with pytest.raises(DatasetError, match=r"z.*_demo.hdf5: frames are \(24, 24\) px, but .*'s are \(16, 16\)"):
            load_suite(root, SUITE, preload_images_gb=preload)
    f0 = sorted((root / SUITE).glob("*.hdf5"))[0]
    with h5py.File(f0, "a") as f:
        wrist = f["data/demo_0/obs/eye_in_hand_rgb"]
        t = wrist.shape[0]
        del f["data/demo_0/obs/eye_in_hand_rgb"]
        f["data/demo_0/obs"].create_dataset("eye_in_hand_rgb", data=np.zeros((t, 8, 8, 3), np.uint8))
    with pytest.raises(DatasetError, match=r"data/demo_0: the cameras' frames differ in size \(agentview_rgb \(16, 16\), "
                                           r"eye_in_hand_rgb \(8, 8\)\)"):
        load_suite(root, SUITE)


def test_a_suite_written_halfway_is_not_left_to_load(tmp_path, monkeypatch):
    import prismatic.vla.datasets.synthetic as synthetic

    real, written = synthetic._write_task_file, []

    def dies_on_the_second(path, task, upright):
        if written:
            raise KeyboardInterrupt
        real(path, task, upright)
        written.append(path)

    monkeypatch.setattr(synthetic, "_write_task_file", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        write_hdf5_suite(tmp_path, SUITE, small_tasks())
    assert len(written) == 1 and not any(tmp_path.iterdir())
    monkeypatch.undo()
    write_hdf5_suite(tmp_path, SUITE, small_tasks())  # a rerun is not blocked by the dead one
    assert len(set(load_suite(tmp_path, SUITE).instructions)) == len(small_tasks())


def test_the_synthetic_data_cli_refuses_before_it_writes(tmp_path):
    from prismatic.vla.datasets.synthetic import SyntheticConfig, main

    with pytest.raises(ValueError, match="--steps is 0, expected >= 1"):
        main(SyntheticConfig(out_dir=tmp_path, steps=0))
    assert not any(tmp_path.iterdir())
    main(SyntheticConfig(out_dir=tmp_path, suite=SUITE, image_size=16))
    with pytest.raises(FileExistsError, match=f"{SUITE} already exists; refusing to overwrite it"):
        main(SyntheticConfig(out_dir=tmp_path, suite=SUITE, rlds=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == [SUITE]


# ------------------------------------------------------------------------------- reader edge cases, chunking


def _replace(f: h5py.File, key: str, data: np.ndarray) -> None:
    del f[key]
    f.create_dataset(key, data=data)


def test_a_demo_left_without_steps_is_skipped_and_the_files_other_demos_stay(tmp_path):
    """A demo that is all no-ops drops out; it must neither break the read nor end the file's demos early."""
    root = hdf5_root(tmp_path)
    f0 = sorted((root / SUITE).glob("*.hdf5"))[0]
    with h5py.File(f0, "a") as f:
        idle = np.zeros((20, 7))
        idle[:, -1] = -1.0  # never moves, gripper always open: every step a no-op
        _replace(f, "data/demo_0/actions", idle)
    ds = load_suite(root, SUITE)
    assert ds.info["num_episodes"] == 3 and len(ds) == 3 * (20 - 3)
    assert load_suite(root, SUITE, filter_noops=False).info["num_episodes"] == 4  # unfiltered, it has its 20 steps


def test_arrays_of_different_lengths_are_named(tmp_path):
    root = hdf5_root(tmp_path)
    f0 = sorted((root / SUITE).glob("*.hdf5"))[0]
    with h5py.File(f0, "a") as f:
        _replace(f, "data/demo_0/obs/gripper_states", np.zeros((19, 2)))
    with pytest.raises(DatasetError, match=r"data/demo_0 arrays disagree on the number of steps \(\{19, 20\}\)"):
        load_suite(root, SUITE)


def test_camera_arrays_of_the_wrong_dtype_or_rank_are_named(tmp_path):
    root = hdf5_root(tmp_path)
    f0 = sorted((root / SUITE).glob("*.hdf5"))[0]
    with h5py.File(f0, "a") as f:
        _replace(f, "data/demo_0/obs/agentview_rgb", f["data/demo_0/obs/agentview_rgb"][:].astype(np.float32) / 255)
    with pytest.raises(DatasetError, match=r"demo_0/obs/agentview_rgb has dtype float32, expected uint8"):
        load_suite(root, SUITE)
    with h5py.File(f0, "a") as f:
        _replace(f, "data/demo_0/obs/agentview_rgb", np.zeros((20, 16, 16), np.uint8))  # grey frames
    with pytest.raises(DatasetError, match=r"data/demo_0/obs/agentview_rgb has shape \(20, 16, 16\), "
                                           r"expected \(T, H, W, 3\)"):
        load_suite(root, SUITE)


def test_preload_budget_is_in_gib(tmp_path):
    """The suite's frames are 4·20·2·16·16·3 = 122,880 bytes: within 1e-3 GiB (1.07 MB), not within 1e-5 GiB."""
    from prismatic.vla.datasets.episodes import ArrayImages
    from prismatic.vla.datasets.hdf5 import HDF5Images

    root = hdf5_root(tmp_path)
    assert all(isinstance(e.images, ArrayImages) for e in load_suite(root, SUITE, preload_images_gb=1e-3).episodes)
    assert all(isinstance(e.images, HDF5Images) for e in load_suite(root, SUITE, preload_images_gb=1e-5).episodes)


def test_chunk_len_sets_the_chunks_and_negative_indices_are_refused(tmp_path):
    ds = load_suite(hdf5_root(tmp_path), SUITE, chunk_len=3)
    end = int(ds.starts[1]) - 1  # the last step of the first episode
    np.testing.assert_array_equal(ds[0]["actions"], ds.actions[[0, 1, 2]])
    np.testing.assert_array_equal(ds[end]["actions"], ds.actions[[end] * 3])  # padded with the last step
    assert ds.get_batch([0, 1])["actions"].shape == (2, 3, 7)
    with pytest.raises(IndexError, match=r"indices must be a 1-D array within \[0, 68\)"):
        ds.get_batch([-1])  # numpy would wrap it around to the last step
    with pytest.raises(IndexError, match="within"):
        ds.get_batch([len(ds)])


def test_episode_order_does_not_depend_on_the_order_they_are_read():
    """Episodes are sorted by instruction, then by their actions: RLDS (shuffled) and HDF5 reads line up."""
    from prismatic.vla.datasets import VLADataset
    from prismatic.vla.datasets.episodes import ArrayImages, Episode

    def ep(instruction, value):
        acts = np.full((3, 7), value, np.float32)
        return Episode(instruction, acts, np.zeros((3, 8), np.float32),
                       ArrayImages(np.full((3, 2, 4, 4, 3), int(value * 10), np.uint8)), f"{instruction}:{value}")

    eps = [ep("b task", 0.1), ep("a task", 0.2), ep("a task", 0.3), ep("a task", 0.5)]
    one, other = VLADataset(eps), VLADataset(eps[::-1])
    for k in ("actions", "proprio", "images"):
        np.testing.assert_array_equal(one.get_batch(np.arange(12))[k], other.get_batch(np.arange(12))[k])
    assert one.instructions == other.instructions == ["a task"] * 3 + ["b task"]


def test_an_episode_whose_arrays_disagree_is_refused():
    from prismatic.vla.datasets.episodes import ArrayImages, Episode

    with pytest.raises(DatasetError, match=r"x:demo_0: inconsistent episode \(actions \(3, 7\), proprio \(2, 8\), "
                                           r"3 images\); expected \(T, 7\), \(T, 8\) and T images"):
        Episode("pick", np.zeros((3, 7), np.float32), np.zeros((2, 8), np.float32),
                ArrayImages(np.zeros((3, 2, 4, 4, 3), np.uint8)), "x:demo_0")
