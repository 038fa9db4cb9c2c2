"""The RLDS release layout and the raw HDF5 layout of the same demos read to identical samples.

TensorFlow runs in a child process only: once imported, it makes MuJoCo's EGL rendering segfault in later
tests of the same pytest process (measured: tests/test_libero.py after an in-process TF import).
"""

from __future__ import annotations

import builtins
import json
import subprocess
import sys

import numpy as np
import pytest
from data_fixtures import SUITE, hdf5_root, needs_tfds, small_tasks

from prismatic.vla.datasets import DatasetError, load_suite

CHILD = """
import json, sys
import numpy as np
from pathlib import Path
from prismatic.vla.datasets import load_suite
from prismatic.vla.datasets.synthetic import make_tasks, write_rlds_suite
root, suite, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
write_rlds_suite(root, suite, make_tasks(num_tasks=2, demos_per_task=2, steps=20, image_size=16, seed=0))
ds = load_suite(root, suite, "rlds")
b = ds.get_batch(np.arange(len(ds)))
np.savez(out / "batch.npz", images=b["images"], proprio=b["proprio"], actions=b["actions"])
(out / "meta.json").write_text(json.dumps({"instructions": b["instructions"], "norm_stats": ds.norm_stats}))
"""


@needs_tfds
def test_rlds_and_hdf5_give_identical_samples(tmp_path):
    h = load_suite(hdf5_root(tmp_path / "h", small_tasks(seed=0, steps=20, image_size=16)), SUITE, "hdf5")
    r = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "r"), SUITE, str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rb, meta = np.load(tmp_path / "batch.npz"), json.loads((tmp_path / "meta.json").read_text())
    bh = h.get_batch(np.arange(len(h)))
    assert len(h) == len(rb["actions"]) == 68
    assert bh["instructions"] == meta["instructions"]
    for k in ("images", "proprio", "actions"):
        np.testing.assert_array_equal(bh[k], rb[k], err_msg=k)
    assert h.norm_stats == meta["norm_stats"]
    assert (tmp_path / "r" / f"{SUITE}_no_noops" / "1.0.0" / "mergevla_dataset_stats.json").is_file()


def _fake_rlds_suite(root, name):
    (root / name / "1.0.0").mkdir(parents=True)
    (root / name / "1.0.0" / "dataset_info.json").write_text("{}")


def test_rlds_unknown_suite_lists_available(tmp_path):
    _fake_rlds_suite(tmp_path, f"{SUITE}_no_noops")
    with pytest.raises(DatasetError, match=r"unknown suite 'libero_10'.*available rlds suites: \['libero_spatial'\]"):
        load_suite(tmp_path, "libero_10", "rlds")


def test_an_hdf5_suite_read_as_rlds_is_named_as_such(tmp_path):
    root = hdf5_root(tmp_path)
    with pytest.raises(DatasetError, match=(
            rf"no {SUITE}_no_noops under {root}, and {root / SUITE} holds no RLDS dataset \(no "
            r"<version>/dataset_info.json\) \(it holds HDF5 files: --dataset_format hdf5 reads them\)")):
        load_suite(root, SUITE, "rlds")


def test_missing_rlds_extra_gives_an_install_hint(tmp_path, monkeypatch):
    _fake_rlds_suite(tmp_path, f"{SUITE}_no_noops")
    real_import = builtins.__import__

    def no_tf(name, *args, **kwargs):
        if name.startswith(("tensorflow", "tensorflow_datasets")):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tf)
    with pytest.raises(DatasetError, match=r"needs tensorflow and tensorflow-datasets.*\.\[rlds\]"):
        load_suite(tmp_path, SUITE, "rlds")


def test_the_highest_version_directory_is_read_by_number_not_by_text(tmp_path):
    from prismatic.vla.datasets.dataset import resolve_suite

    for v in ("1.0.0", "1.10.0", "1.2.0"):  # three versions side by side
        (tmp_path / f"{SUITE}_no_noops" / v).mkdir(parents=True)
        (tmp_path / f"{SUITE}_no_noops" / v / "dataset_info.json").write_text("{}")
    (tmp_path / f"{SUITE}_no_noops" / "2.0.0").mkdir()  # no dataset_info.json: not a version
    builder, files = resolve_suite(tmp_path, SUITE, "rlds")
    assert builder == tmp_path / f"{SUITE}_no_noops" / "1.10.0" and [f.name for f in files] == ["dataset_info.json"]
