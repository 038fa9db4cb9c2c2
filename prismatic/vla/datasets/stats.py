"""Normalisation statistics and the data fingerprint, computed once and cached next to the data.

The cache (`mergevla_dataset_stats.json` in the suite directory) records each file's size, mtime and sha256;
it is reused while every file still has the recorded size and mtime, so a suite is hashed only once. If the
directory is read-only the stats are simply recomputed next time.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np

from prismatic.io import sha256_file, write_json
from prismatic.vla.normalization import compute_stats

STATS_FILE = "mergevla_dataset_stats.json"
STATS_FORMAT = "mergevla-dataset-stats"
STATS_VERSION = 1
ACTION_MASK = [True] * 6 + [False]  # the gripper action is a label, not normalised

log = logging.getLogger(__name__)


def compute_norm_stats(actions: np.ndarray, proprio: np.ndarray) -> dict:
    return {"action": compute_stats(actions, ACTION_MASK), "proprio": compute_stats(proprio)}


def _stat(p: Path) -> dict:
    st = p.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def file_table(root: Path, files: list[Path], previous: dict | None = None) -> dict[str, dict]:
    """{relative path: {size, mtime_ns, sha256}}, reusing hashes of files that did not change."""
    previous = previous or {}
    table = {}
    for p in sorted(files):
        rel = p.relative_to(root).as_posix()
        entry = _stat(p)
        old = previous.get(rel)
        same = old and old.get("size") == entry["size"] and old.get("mtime_ns") == entry["mtime_ns"]
        entry["sha256"] = old["sha256"] if same else sha256_file(p)
        table[rel] = entry
    return table


def fingerprint(table: dict[str, dict], reader: dict) -> str:
    """Content identity of a dataset as read: file hashes + the reader options that change the samples."""
    h = hashlib.sha256(json.dumps(reader, sort_keys=True).encode())
    for rel in sorted(table):
        h.update(f"{rel}\0{table[rel]['sha256']}\0".encode())
    return h.hexdigest()


def _read_cache(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        cache = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return cache if isinstance(cache, dict) and cache.get("format") == STATS_FORMAT else None


def cache_is_fresh(cache: dict | None, root: Path, files: list[Path], reader: dict) -> bool:
    if not cache or cache.get("version") != STATS_VERSION or cache.get("reader") != reader:
        return False
    table = cache.get("files", {})
    if set(table) != {p.relative_to(root).as_posix() for p in files}:
        return False
    return all(
        {k: table[p.relative_to(root).as_posix()].get(k) for k in ("size", "mtime_ns")} == _stat(p) for p in files
    )


def load_cached_stats(root: Path, files: list[Path], reader: dict) -> dict | None:
    """The cache's content when it is still valid for these files and reader options, else None."""
    cache = _read_cache(root / STATS_FILE)
    return cache if cache_is_fresh(cache, root, files, reader) else None


def write_stats_cache(root: Path, files: list[Path], reader: dict, norm_stats: dict, counts: dict) -> dict:
    """Hash the files, write the cache (atomically) and return it. Never replaces a file that is not ours."""
    path = root / STATS_FILE
    old = _read_cache(path)
    table = file_table(root, files, (old or {}).get("files"))
    cache = {"format": STATS_FORMAT, "version": STATS_VERSION, "reader": reader, "files": table,
             "fingerprint": fingerprint(table, reader), "norm_stats": norm_stats, **counts}
    if path.exists() and old is None:
        log.warning("%s exists but is not a mergevla stats cache; leaving it alone", path)
        return cache
    try:
        write_json(path, cache)
    except OSError as e:
        log.warning("cannot cache dataset statistics at %s (%s); they will be recomputed next time", path, e)
    return cache
