"""Norm statistics equal numpy's quantiles of the filtered steps; the cache is reused and invalidated."""

from __future__ import annotations

import json
import os

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
