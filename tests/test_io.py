"""Atomic writes: all or nothing, ordinary permissions, the temp suffix a writer asks for."""

import os
import stat

import pytest

from prismatic.io import atomic_path, write_json


def test_written_file_has_ordinary_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "r.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == 0o644
    assert (tmp_path / "r.json").read_text() == '{\n  "a": 1\n}\n'


def test_failed_write_leaves_neither_file_nor_temp(tmp_path):
    (tmp_path / "keep.json").write_text("old")
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "keep.json", suffix=".mp4") as tmp:
        assert tmp.name.endswith(".mp4") and tmp.parent == tmp_path
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.json"]
    assert (tmp_path / "keep.json").read_text() == "old"
