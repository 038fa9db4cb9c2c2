"""Norm statistics equal numpy's quantiles of the filtered steps; the cache is reused and invalidated."""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
from data_fixtures import SUITE, hdf5_root, kept_steps, small_tasks

from prismatic.vla.datasets import STATS_FILE, load_suite


def test_stats_are_numpy_quantiles_of_kept_steps(tmp_path):
    tasks = small_tasks()
    ds = load_suite(hdf5_root(tmp_path, tasks), SUITE)
    acts, prop = [], []
    for task in tasks:
        for d in task.demos:
            k = kept_steps(d.actions)
            a = d.actions[k].copy()
            a[:, -1] = (1 - a[:, -1]) / 2
            acts.append(a)
            prop.append(np.concatenate([d.ee_states, d.gripper_states], 1)[k])
    acts, prop = np.concatenate(acts), np.concatenate(prop)
    s = ds.norm_stats
    # float32 storage of the inputs, hence the tolerance
    np.testing.assert_allclose(s["action"]["q01"], np.quantile(acts, 0.01, axis=0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(s["action"]["q99"], np.quantile(acts, 0.99, axis=0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(s["proprio"]["q01"], np.quantile(prop, 0.01, axis=0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(s["proprio"]["q99"], np.quantile(prop, 0.99, axis=0), rtol=1e-6, atol=1e-7)
    assert s["action"]["mask"] == [True] * 6 + [False]
    assert s["proprio"]["mask"] == [True] * 8
    cached = json.loads((tmp_path / SUITE / STATS_FILE).read_text())
    assert cached["norm_stats"] == s and cached["fingerprint"] == ds.fingerprint and cached["num_steps"] == len(ds)


def test_cache_is_reused_until_a_file_changes(tmp_path):
    root = hdf5_root(tmp_path)
    first = load_suite(root, SUITE)
    cache_file = root / SUITE / STATS_FILE
    cache = json.loads(cache_file.read_text())
    cache["norm_stats"]["action"]["q01"][0] = -123.0  # a value only the cache can supply
    cache_file.write_text(json.dumps(cache))
    assert load_suite(root, SUITE).norm_stats["action"]["q01"][0] == -123.0
    assert load_suite(root, SUITE).fingerprint == first.fingerprint
    # a changed file (new mtime) invalidates the cache: stats and fingerprint are recomputed
    f = sorted((root / SUITE).glob("*.hdf5"))[0]
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    again = load_suite(root, SUITE)
    assert again.norm_stats == first.norm_stats and again.fingerprint == first.fingerprint


def test_fingerprint_follows_content_and_reader_options(tmp_path):
    a = load_suite(hdf5_root(tmp_path / "a", small_tasks(seed=0)), SUITE)
    b = load_suite(hdf5_root(tmp_path / "b", small_tasks(seed=0)), SUITE)
    c = load_suite(hdf5_root(tmp_path / "c", small_tasks(seed=1)), SUITE)
    d = load_suite(tmp_path / "a", SUITE, filter_noops=False)
    assert a.fingerprint == b.fingerprint  # same bytes elsewhere → same fingerprint
    assert len({a.fingerprint, c.fingerprint, d.fingerprint}) == 3


def test_foreign_file_with_the_cache_name_is_left_alone(tmp_path):
    root = hdf5_root(tmp_path)
    (root / SUITE / STATS_FILE).write_text("my notes\n")
    ds = load_suite(root, SUITE)
    assert (root / SUITE / STATS_FILE).read_text() == "my notes\n"
    assert ds.norm_stats is not None and ds.fingerprint


def test_without_cache_nothing_is_written_next_to_the_data(tmp_path):
    root = hdf5_root(tmp_path)
    ds = load_suite(root, SUITE, cache_stats=False)
    assert not (root / SUITE / STATS_FILE).exists()
    assert ds.fingerprint == load_suite(root, SUITE).fingerprint


def test_normalize_maps_a_constant_dimension_to_minus_one_even_a_float_step_off():
    from prismatic.vla.normalization import normalize, unnormalize

    stats = {"q01": [0.0, np.pi], "q99": [2.0, np.pi], "mask": [True, True]}  # dim 1 never varied in the data
    x = np.array([[1.0, np.pi], [3.0, np.nextafter(np.float32(np.pi), np.float32(4))]], np.float32)
    np.testing.assert_allclose(normalize(x, stats), [[0.0, -1.0], [1.0, -1.0]])  # hand-computed; clipped at 1
    np.testing.assert_allclose(unnormalize(normalize(x, stats), stats)[0], [1.0, np.pi], rtol=1e-6)


def test_normalize_leaves_unmasked_dimensions_and_unnormalize_caps_at_the_quantiles():
    from prismatic.vla.normalization import normalize, unnormalize

    stats = {"q01": [-2.0, 0.0], "q99": [2.0, 10.0], "mask": [True, False]}  # dim 1 (e.g. the gripper) as it is
    np.testing.assert_allclose(normalize(np.array([[1.0, 0.0], [-4.0, 1.0]]), stats), [[0.5, 0.0], [-1.0, 1.0]])
    np.testing.assert_allclose(unnormalize(np.array([[1.5, 0.0], [-1.5, 1.0], [0.5, 0.5]]), stats),
                               [[2.0, 0.0], [-2.0, 1.0], [1.0, 0.5]])  # a prediction past ±1: the training range


# ----------------------------------------------------------------------------------- cache invalidation


def _poison(cache_file, **changes):
    """Rewrite the cache with a q01 only it can supply, plus `changes`."""
    cache = json.loads(cache_file.read_text())
    cache["norm_stats"]["action"]["q01"][0] = -123.0
    cache.update(changes)
    cache_file.write_text(json.dumps(cache))


def test_a_cache_of_another_version_or_step_count_is_not_used(tmp_path):
    root = hdf5_root(tmp_path)
    first = load_suite(root, SUITE)
    cache_file = root / SUITE / STATS_FILE
    for changes in ({"version": 0}, {"num_steps": len(first) + 1}, {"num_episodes": 5}):
        _poison(cache_file, **changes)
        again = load_suite(root, SUITE)
        assert again.norm_stats == first.norm_stats, changes
        assert json.loads(cache_file.read_text())["norm_stats"] == first.norm_stats  # and rewritten


def test_a_cache_written_by_other_reader_options_is_not_used(tmp_path):
    from prismatic.vla.datasets.stats import cache_is_fresh

    root = hdf5_root(tmp_path)
    load_suite(root, SUITE)
    cache = json.loads((root / SUITE / STATS_FILE).read_text())
    files = sorted((root / SUITE).glob("*.hdf5"))
    reader = {"format": "hdf5", "filter_noops": True}
    assert cache_is_fresh(cache, root / SUITE, files, reader)
    assert not cache_is_fresh(cache, root / SUITE, files, {**reader, "filter_noops": False})
    assert not cache_is_fresh(cache, root / SUITE, files[:1], reader)  # a file gone: stale even if the rest match


def test_a_file_changed_in_place_gets_a_new_fingerprint_even_at_the_same_size(tmp_path):
    """Sizes and mtimes only decide whether to re-hash: a rewritten file of the same size must be hashed again."""
    root = hdf5_root(tmp_path)
    first = load_suite(root, SUITE)
    f = sorted((root / SUITE).glob("*.hdf5"))[0]
    size = f.stat().st_size
    with h5py.File(f, "a") as h:
        h["data/demo_0/actions"][5, 0] += 0.5  # in place: same bytes on disk, one value changed
    st = f.stat()
    assert st.st_size == size
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    again = load_suite(root, SUITE)
    assert again.fingerprint != first.fingerprint
    assert again.fingerprint == load_suite(root, SUITE, cache_stats=False).fingerprint


def test_a_foreign_json_file_with_the_cache_name_is_left_alone(tmp_path):
    root = hdf5_root(tmp_path)
    (root / SUITE / STATS_FILE).write_text('{"my": "notes"}')
    ds = load_suite(root, SUITE)
    assert (root / SUITE / STATS_FILE).read_text() == '{"my": "notes"}'
    assert ds.norm_stats is not None and ds.fingerprint == load_suite(root, SUITE, cache_stats=False).fingerprint


def test_an_unwritable_cache_only_warns(tmp_path, monkeypatch, caplog):
    import prismatic.vla.datasets.stats as stats

    def refuse(path, obj):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(stats, "write_json", refuse)
    root = hdf5_root(tmp_path)
    with caplog.at_level("WARNING"):
        ds = load_suite(root, SUITE)
    assert "cannot cache dataset statistics" in caplog.text and not (root / SUITE / STATS_FILE).exists()
    monkeypatch.undo()
    assert ds.norm_stats == load_suite(root, SUITE).norm_stats and ds.fingerprint == load_suite(root, SUITE).fingerprint
