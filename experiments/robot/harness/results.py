"""Per-episode results as JSON lines, appended as each episode finishes.

Each line is one finished episode. A crash can only leave a partial *last* line (appends are flushed and
fsync'ed one row at a time); `ResultsLog` drops such a line (rewriting the file atomically) before appending,
so a resumed run continues from the last finished episode. Every row carries the run's identity
(`run_info`: method, checkpoint, protocol knobs); resuming into a file written by a different run is refused
instead of silently mixing two runs in one table.
"""

from __future__ import annotations

import fcntl
import json
import os
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path


class ResultsError(ValueError):
    """A results file is unreadable or belongs to another run."""


def read_rows(path: Path | str, repair: bool = False) -> list[dict]:
    """All finished episodes in `path` ([] if it does not exist).

    A truncated last line (a crash mid-write) is skipped with a warning, and removed from the file when
    `repair` is set, which also restores a finished last row's lost newline (so the next append starts a line
    of its own); a malformed line anywhere else is an error.
    """
    p = Path(path)
    if not p.exists():
        return []
    try:
        text = p.read_text()
    except UnicodeDecodeError as e:
        raise ResultsError(f"{p} is not a results file (not UTF-8 text: {e})") from e
    lines = text.split("\n")
    rows: list[dict] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            is_tail = i == len(lines) - 1 and not text.endswith("\n")
            if not is_tail:
                raise ResultsError(f"{p}, line {i + 1}: not a JSON object ({e}); fix or remove that line") from e
            warnings.warn(f"{p}: dropping an unfinished last line (an interrupted write)", stacklevel=2)
            break
        rows.append(row)
    if repair and text and not text.endswith("\n"):
        from prismatic.io import write_text  # imports torch: keep it out of worker start-up

        write_text(p, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    return rows


def read_many(paths: Iterable[Path | str]) -> list[dict]:
    """The rows of several results files, each checked to be an episode a table can count."""
    rows: list[dict] = []
    for p in paths:
        if not Path(p).is_file():
            raise ResultsError(f"results file {p} does not exist")
        for n, r in enumerate(read_rows(p), 1):
            for k in ("key", "suite", "success"):
                if k not in r:
                    raise ResultsError(f"results file {p}, row {n}: field {k!r} is missing")
            if not isinstance(r["success"], bool):  # bool("false") would count as a success
                raise ResultsError(f"results file {p}, row {n} ({r['key']}): field 'success' must be true or "
                                   f"false, got {r['success']!r}")
            rows.append(r)
    return rows


def check_same_run(rows: list[dict], run_info: dict, path: Path | str) -> None:
    """Refuse to resume into rows written by another run (checkpoint, method, protocol or seed differ)."""
    for n, row in enumerate(rows, 1):
        if "key" not in row:
            raise ResultsError(f"{path}, row {n}: field 'key' is missing; this is not a results file")
        for k, v in run_info.items():
            if row.get(k) != _jsonable(v):
                raise ResultsError(
                    f"{path} holds episodes of a different run (row {n}: {_difference(k, row.get(k), _jsonable(v))}); "
                    "choose another results file or remove this one to start over"
                )


def _difference(name: str, old, new) -> str:
    """`name: old → new`, or for two dicts only the fields that differ (a protocol has ten)."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return f"{name}: {old!r} → {new!r}"
    from prismatic.cli import changed_fields  # draccus: only on this error's path, not in worker start-up

    return f"{name} differs in {changed_fields(old, new)}"


def check_label_unshared(paths: Iterable[Path | str], path: Path | str, method: str, keys: set[str]) -> None:
    """Refuse, before any episode runs, a run whose episodes another results file (`paths`, beside `path`) already
    holds under the same method label: the summary of their directory would count those episodes twice."""
    for other in paths:
        if Path(other).resolve() == Path(path).resolve():
            continue
        for r in read_rows(other):
            if r.get("method") == method and r.get("key") in keys:
                raise ResultsError(
                    f"{other} already holds episode {r['key']} of method {method!r} (checkpoint "
                    f"{r.get('checkpoint')}); this run would count it twice in the summary: give this run a label of "
                    "its own (--method; METHOD= for eval_merged.sh), another --results_dir, or remove that file")


def check_same_episodes(done: dict[str, dict], episodes: Iterable, path: Path | str) -> None:
    """Refuse to count a stored episode as done when this plan starts it differently (init state, step limit...).

    Episodes are matched by key (suite/task/trial); the fields of each planned `EpisodeSpec` must match too.
    """
    for e in episodes:
        row = done.get(e.key)
        if row is None:
            continue
        planned = _jsonable(e.to_row())
        for k, v in planned.items():
            if row.get(k) != v:
                raise ResultsError(
                    f"{path}: episode {e.key} was run with {k}={row.get(k)!r}, this run plans {k}={v!r}; "
                    "choose another results file or remove this one to start over"
                )


@contextmanager
def exclusive(path: Path | str) -> Iterator[None]:
    """Hold `path` for one run: a second run writing the same results file at once would do every episode twice
    and leave duplicate rows. The lock (a hidden file beside it) is released when the process ends, however."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise ResultsError(f"results file {path} is being written by another run (pid {other}); wait for it "
                               "to finish or choose another results file") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)


class ResultsLog:
    """Append-only JSONL of one run; knows which episodes are already done."""

    def __init__(self, path: Path | str, run_info: dict | None = None):
        self.path = Path(path)
        self.run_info = dict(run_info or {})
        self.rows = read_rows(self.path, repair=True)
        check_same_run(self.rows, self.run_info, self.path)
        self.done = {row["key"]: row for row in self.rows}

    def append(self, row: dict) -> dict:
        clash = sorted(set(row) & set(self.run_info))
        if clash:
            raise ValueError(f"run_info fields {clash} would overwrite the episode's own fields")
        row = _jsonable({**row, **self.run_info})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.rows.append(row)
        self.done[row["key"]] = row
        return row


def _jsonable(x):
    """Round-trip through JSON so comparisons see what the file will hold (tuples → lists, numpy → python)."""
    return json.loads(json.dumps(x, default=_default))


def _default(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot store {type(o).__name__} in a results row")
