"""Atomic writes and content hashes. Every file the project writes goes through here."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch costs seconds to import; data tools only need atomic writes
    import torch


@contextmanager
def atomic_path(dest: Path | str, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temp path beside `dest`; on success rename it over `dest`, on error remove it.

    `suffix` is for writers that choose the format from the extension (ffmpeg). The file gets the usual
    permissions (0666 less the umask), not mkstemp's 0600: results and checkpoints are ordinary files. The data
    reach the disk before the rename, and the rename before this returns, so a power cut leaves the old file or
    the whole new one, never an empty one under `dest`'s name.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(dest)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(dest, "tmp"), suffix=suffix, dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        if tmp.exists():  # a writer may have replaced or removed it; os.replace then reports that
            os.chmod(tmp, 0o666 & ~_umask())
            _fsync(tmp)
        os.replace(tmp, dest)
        _fsync(dest.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def atomic_dir(dest: Path | str, replace: bool = False) -> Iterator[Path]:
    """Yield an empty directory beside `dest`; on success move it to `dest`, on error remove it.

    So a crash never leaves a `dest` that looks finished. An existing `dest` is refused unless `replace`, which
    swaps the old one out only once the new one is whole. The rename reaches the disk before this returns (files
    written inside through `atomic_path` are on it already).
    """
    dest = Path(dest)
    if dest.exists() and not replace:
        raise FileExistsError(f"{dest} already exists; refusing to overwrite it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(dest)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(dest, "partial"), dir=dest.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        if not dest.exists():
            os.rename(tmp, dest)
        elif not replace:
            raise FileExistsError(f"{dest} appeared while it was being written; it was left as it is")
        else:
            old = Path(tempfile.mkdtemp(prefix=_temp_prefix(dest, "old"), dir=dest.parent))
            os.rename(dest, old / dest.name)
            os.rename(tmp, dest)
            shutil.rmtree(old)
        _fsync(dest.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# Temps are named `.<dest name>.<kind>-<host>-<pid>-<random>`, so that the next write to the same `dest` can
# remove what a killed writer (SIGKILL, a pre-empted job) left: a real-size checkpoint's temp is gigabytes.
def _temp_prefix(dest: Path, kind: str) -> str:
    return f".{dest.name}.{kind}-{socket.gethostname()}-{os.getpid()}-"


def written_as(names: Sequence[str]) -> Callable[[str], bool]:
    """A test of directory entries: one of `names`, or the temp of an atomic write of one (`.<name>.…`)."""
    temps = tuple(f".{n}." for n in names)
    return lambda entry: entry in names or entry.startswith(temps)


def foreign_entries(path: Path | str, ours: Callable[[str], bool]) -> str:
    """The entries of directory `path` that `ours` rejects, named for a message ("a, b, c, …"); "" if none."""
    path = Path(path)
    others = sorted(n for p in path.iterdir() if not ours(n := p.name)) if path.is_dir() else []
    return ", ".join(others[:3]) + (", …" if len(others) > 3 else "")


def _remove_stale_temps(dest: Path) -> None:
    """Remove `dest`'s unfinished temps whose writer ran on this host and is gone. Another host's temps (a shared
    filesystem) and a live process's are left alone, and so is an `old` one: a writer killed between its two
    renames leaves the only whole copy there."""
    pattern = re.compile(rf"\.{re.escape(dest.name)}\.(?:tmp|partial)-{re.escape(socket.gethostname())}-(\d+)-")
    for p in dest.parent.iterdir():
        m = pattern.match(p.name)
        if not m or _alive(int(m.group(1))):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def file_on_path(path: Path | str) -> Path | None:
    """The first existing ancestor of `path` that is a file, not a directory (so `path` cannot be created)."""
    return next((p for p in Path(path).parents if p.exists() and not p.is_dir()), None)


def check_output_dir(path: Path | str, flag: str) -> None:
    """NotADirectoryError naming `flag` when `path` is a file or lies under one (checked before any work)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{flag} {path} is a file, not a directory")
    blocker = file_on_path(path)
    if blocker is not None:
        raise NotADirectoryError(f"{flag} {path} cannot be created: {blocker} is a file, not a directory")


def claim_output_dir(path: Path | str, flag: str, marker: str, ours: Callable[[str], bool]) -> Path:
    """Make `path` this tool's output directory, or confirm that it is one, before writing into it.

    A new or empty directory is claimed (`marker` is written into it); one holding `marker`, or only entries
    `ours` accepts (written before markers existed), is taken as it is; any other is someone's own and is
    refused with a FileExistsError naming `flag`, so no file of theirs is replaced or added to.
    """
    check_output_dir(path, flag)
    path = Path(path)
    if not (path / marker).exists() and (others := foreign_entries(path, ours)):
        raise FileExistsError(f"{flag} {path} holds files this tool did not write ({others}); refusing to write "
                              f"into it: choose another {flag}")
    path.mkdir(parents=True, exist_ok=True)
    (path / marker).touch()
    return path


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(dest: Path | str, obj) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_text(dest: Path | str, text: str) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(text)


def read_json_object(path: Path | str, error: type[Exception] = ValueError) -> dict:
    """A JSON file that must hold an object; anything else raises `error` naming the file and what is wrong."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path} is not valid JSON ({e})") from e
    if not isinstance(obj, dict):
        raise error(f"{path} does not hold a JSON object (found {type(obj).__name__})")
    return obj


def sha256_file(path: Path | str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def state_dict_sha256(sd: dict[str, torch.Tensor]) -> str:
    """Hash of names, dtypes, shapes and bytes, independent of insertion order and storage layout."""
    import torch

    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-d tensors too
    return h.hexdigest()
