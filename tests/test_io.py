"""Atomic writes: all or nothing, ordinary permissions, the temp suffix a writer asks for."""

import json
import os
import stat

import pytest

from prismatic.io import atomic_dir, atomic_path, write_json


def test_written_file_has_ordinary_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "r.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == 0o644
    assert (tmp_path / "r.json").read_text() == '{\n  "a": 1\n}\n'


def test_the_data_reach_the_disk_before_the_rename_and_the_rename_before_returning(tmp_path, monkeypatch):
    import prismatic.io as io

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(io.os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                     real_fsync(fd)))
    monkeypatch.setattr(io.os, "replace", lambda a, b: (events.append(("replace", str(a))), real_replace(a, b)))
    with atomic_path(tmp_path / "r.json") as tmp:
        tmp.write_text("{}")
    assert events == [("fsync", str(tmp)), ("replace", str(tmp)), ("fsync", str(tmp_path))]
    events.clear()
    with atomic_dir(tmp_path / "ckpt") as d:
        (d / "w").write_text("1")
    assert events == [("fsync", str(tmp_path))] and (tmp_path / "ckpt" / "w").read_text() == "1"


def test_failed_write_leaves_neither_file_nor_temp(tmp_path):
    (tmp_path / "keep.json").write_text("old")
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "keep.json", suffix=".mp4") as tmp:
        assert tmp.name.endswith(".mp4") and tmp.parent == tmp_path
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.json"]
    assert (tmp_path / "keep.json").read_text() == "old"


def test_a_directory_appears_whole_or_not_at_all(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "a" / "suite") as tmp:
            assert tmp.parent == tmp_path / "a" and not (tmp_path / "a" / "suite").exists()
            (tmp / "one").write_text("1")
    finally:
        os.umask(old)
    assert (tmp_path / "a" / "suite" / "one").read_text() == "1"
    assert stat.S_IMODE((tmp_path / "a" / "suite").stat().st_mode) == 0o755
    with pytest.raises(FileExistsError, match="suite already exists; refusing to overwrite it"):
        with atomic_dir(tmp_path / "a" / "suite"):
            pass
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "a" / "suite", replace=True) as tmp:
        (tmp / "two").write_text("half")
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in (tmp_path / "a").rglob("*")) == ["one", "suite"]  # the old one, no leftovers
    with atomic_dir(tmp_path / "a" / "suite", replace=True) as tmp:
        (tmp / "two").write_text("2")
    assert sorted(p.name for p in (tmp_path / "a").rglob("*")) == ["suite", "two"]
    with pytest.raises(FileExistsError, match="appeared while it was being written"):
        with atomic_dir(tmp_path / "b") as tmp:
            (tmp_path / "b").mkdir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_a_killed_writers_temps_go_at_the_next_write_to_the_same_name(tmp_path):
    import socket
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid now names no process (barring reuse within milliseconds)
    host, me = socket.gethostname(), os.getpid()
    stale_file = tmp_path / f".r.json.tmp-{host}-{dead.pid}-ab12"
    stale_dir = tmp_path / f".ckpt.partial-{host}-{dead.pid}-cd34"
    kept = [tmp_path / f".r.json.tmp-{host}-{me}-ef56",  # a live writer's (here: this process)
            tmp_path / f".r.json.tmp-otherhost-{dead.pid}-gh78",  # another host's, on a shared filesystem
            tmp_path / f".q.json.tmp-{host}-{dead.pid}-ij90",  # another file's: left to its own next write
            tmp_path / f".ckpt.old-{host}-{dead.pid}-kl12"]  # may hold the only whole copy
    for p in [stale_file, *kept]:
        p.write_text("half")
    stale_dir.mkdir()
    (stale_dir / "model.safetensors").write_text("half")
    write_json(tmp_path / "r.json", {"a": 1})
    assert not stale_file.exists() and stale_dir.exists()
    with atomic_dir(tmp_path / "ckpt") as d:
        assert d.name.startswith(f".ckpt.partial-{host}-{me}-")
    assert not stale_dir.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["r.json", "ckpt", *(p.name for p in kept)])


def test_checkpoint_never_replaces_a_users_weights_file_and_an_overwrite_drops_the_old_manifest_first(tmp_path):
    import torch

    from prismatic.checkpoint import MANIFEST_FILE, WEIGHTS_FILE, save_checkpoint

    hf = tmp_path / "hf"  # e.g. a Hugging Face model directory given as --out by mistake
    hf.mkdir()
    (hf / WEIGHTS_FILE).write_bytes(b"user weights")
    with pytest.raises(FileExistsError, match=r"already holds model.safetensors; refusing to overwrite it"):
        save_checkpoint(hf, {"w": torch.zeros(2)}, {}, "kind")
    assert (hf / WEIGHTS_FILE).read_bytes() == b"user weights"
    d = save_checkpoint(tmp_path / "ck", {"w": torch.zeros(2)}, {"step": 1}, "kind")
    seen = []
    import prismatic.checkpoint as ck

    real_save = ck.save_file

    def spy(*a, **k):  # while the new weights are written, the old manifest must be gone
        seen.append((d / MANIFEST_FILE).exists())
        return real_save(*a, **k)

    ck.save_file = spy
    try:
        save_checkpoint(d, {"w": torch.ones(2)}, {"step": 2}, "kind", overwrite=True)
    finally:
        ck.save_file = real_save
    assert seen == [False] and json.loads((d / MANIFEST_FILE).read_text())["step"] == 2


def test_state_dict_hash_takes_zero_dim_tensors():
    import torch

    from prismatic.io import state_dict_sha256

    a = state_dict_sha256({"s": torch.tensor(1.5), "v": torch.arange(3.0)})
    assert a != state_dict_sha256({"s": torch.tensor(2.5), "v": torch.arange(3.0)})


def test_an_output_dir_is_claimed_by_a_marker_and_a_users_own_is_refused(tmp_path):
    from prismatic.io import claim_output_dir

    ours = {"table.md", "data"}.__contains__
    new = claim_output_dir(tmp_path / "new" / "run", "--out", ".tool", ours)  # created and marked
    assert sorted(p.name for p in new.iterdir()) == [".tool"]
    (new / "notes.txt").write_text("written into a claimed directory later")
    assert claim_output_dir(new, "--out", ".tool", ours) == new  # marked: taken as it is
    old = tmp_path / "old"  # a run from before markers: only entries the tool writes
    (old / "data").mkdir(parents=True)
    (old / "table.md").write_text("|")
    claim_output_dir(old, "--out", ".tool", ours)
    assert (old / ".tool").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    for name in ("table.md", "a.txt", "b.txt", "c.txt", "d.txt"):
        (mine / name).write_text("mine")
    with pytest.raises(FileExistsError, match=r"^--out .*mine holds files this tool did not write \(a\.txt, b\.txt, "
                                              r"c\.txt, …\); refusing to write into it: choose another --out$"):
        claim_output_dir(mine, "--out", ".tool", ours)
    assert sorted(p.name for p in mine.iterdir()) == ["a.txt", "b.txt", "c.txt", "d.txt", "table.md"]
    with pytest.raises(NotADirectoryError, match="--out .*a.txt is a file"):
        claim_output_dir(mine / "a.txt", "--out", ".tool", ours)


def test_an_output_dir_that_is_or_lies_under_a_file_is_named(tmp_path):
    from prismatic.io import check_output_dir

    (tmp_path / "f").write_text("mine")
    check_output_dir(tmp_path / "new" / "deeper", "--out_dir")  # may be created: fine
    with pytest.raises(NotADirectoryError, match=r"--out_dir .*f is a file, not a directory"):
        check_output_dir(tmp_path / "f", "--out_dir")
    with pytest.raises(NotADirectoryError, match=r"--out .*f/x cannot be created: .*f is a file"):
        check_output_dir(tmp_path / "f" / "x", "--out")
    assert not (tmp_path / "new").exists()


def test_state_dict_hash_ignores_insertion_order_but_not_names_dtypes_or_shapes():
    import torch

    from prismatic.io import state_dict_sha256

    a, b = torch.arange(6.0), torch.ones(2)
    h = state_dict_sha256({"a": a, "b": b})
    assert state_dict_sha256({"b": b, "a": a}) == h
    assert state_dict_sha256({"a": a.reshape(2, 3), "b": b}) != h  # same bytes, another shape
    assert state_dict_sha256({"a": a.view(torch.int32), "b": b}) != h  # same bytes, another dtype
    assert state_dict_sha256({"c": a, "b": b}) != h


def test_file_hash_reads_the_whole_file_in_chunks(tmp_path):
    import hashlib

    from prismatic.io import sha256_file

    data = bytes(range(256)) * 3
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f", chunk=100) == sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def test_json_is_written_with_sorted_keys_and_non_json_is_named(tmp_path):
    from prismatic.io import read_json_object

    write_json(tmp_path / "r.json", {"b": 1, "a": {"d": 2, "c": 3}})  # identical runs write identical files
    assert (tmp_path / "r.json").read_text() == json.dumps({"a": {"c": 3, "d": 2}, "b": 1}, indent=2) + "\n"
    assert read_json_object(tmp_path / "r.json") == {"a": {"c": 3, "d": 2}, "b": 1}
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(KeyError, match=r"bin\.json is not valid JSON"):
        read_json_object(tmp_path / "bin.json", KeyError)


def test_written_as_accepts_the_names_and_their_temps_only():
    from prismatic.io import written_as

    ours = written_as(["table.md", "data"])
    assert all(map(ours, ["table.md", "data", ".table.md.tmp-host-12-ab", ".data.partial-host-3-x"]))
    assert not any(map(ours, ["notes.txt", ".table.mdx", "table.md.bak", ".database", "data2"]))


def test_an_output_dir_deep_under_a_file_is_named(tmp_path):
    from prismatic.io import check_output_dir

    (tmp_path / "f").write_text("mine")
    with pytest.raises(NotADirectoryError, match=r"--out .*f/x/y/z cannot be created: .*/f is a file"):
        check_output_dir(tmp_path / "f" / "x" / "y" / "z", "--out")


def test_a_manifest_of_another_format_version_or_a_bool_step_is_not_taken(tmp_path):
    import torch

    from prismatic.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, training_steps

    d = save_checkpoint(tmp_path / "ck", {"w": torch.zeros(2)}, {"step": 1}, "kind")
    m = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps({**m, "format_version": 2}))
    with pytest.raises(CheckpointError, match="field 'format_version' is 2, expected 1"):
        load_checkpoint(d, "kind")
    assert training_steps({"step": True, "train_config": {"max_steps": 5}}) == (None, 5)
    assert training_steps({"step": 3, "train_config": {"max_steps": 5.0}}) == (3, None)
