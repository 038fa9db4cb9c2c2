"""The one way every command-line entry point parses its config and reports bad input."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

import draccus
import yaml
from draccus.utils import DraccusException

C = TypeVar("C")

USAGE_ERROR = 2  # bad input the user can fix, as argparse exits on a bad flag
INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C


def run_cli(
    prog: str,
    config_class: type[C],
    run: Callable[[C], object],
    user_errors: tuple[type[BaseException], ...],
    args: Sequence[str] | None = None,
) -> int:
    """Parse `config_class` from `args` (default: the command line) with draccus and call `run(cfg)`.

    A value draccus cannot parse (a flag or a `--config_path` file) and an exception in `user_errors` (or a
    FileExistsError / NotADirectoryError, for every CLI) are bad input, not bugs: they print `prog: error: message`
    (no traceback) and return USAGE_ERROR; Ctrl-C returns INTERRUPTED; anything else propagates. Returns 0 when
    `run` finishes.
    """
    args = sys.argv[1:] if args is None else list(args)
    try:
        _check_config_file(args)
        cfg = draccus.parse(config_class=config_class, args=args)
    except (DraccusException, yaml.YAMLError, ValueError, TypeError, OSError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return USAGE_ERROR
    try:
        run(cfg)
    # an output path under a file, or a file where a directory is wanted: the message names the path
    except (*user_errors, FileExistsError, NotADirectoryError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:  # Ctrl-C: what was finished is on disk whole (atomic writes); no traceback
        print(f"{prog}: interrupted", file=sys.stderr)
        return INTERRUPTED
    return 0


def _check_config_file(args: list[str]) -> None:
    """A --config_path file must hold a mapping of fields (draccus fails on anything else with a riddle)."""
    for i, a in enumerate(args):
        if a.startswith("--config_path="):
            path = a.split("=", 1)[1]
        elif a == "--config_path" and i + 1 < len(args):
            path = args[i + 1]
        else:
            continue
        try:
            with open(path) as f:
                content = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ValueError(f"--config_path {path} is not valid YAML or JSON ({e})") from e
        if not isinstance(content, dict):
            raise ValueError(f"--config_path {path} must hold a mapping of config fields, found "
                             f"{'nothing' if content is None else type(content).__name__}")


def changed_fields(old: dict, new: dict) -> str:
    """The fields whose values differ between two configs, as "k: old → new, …" by key; "" when none do."""
    keys = sorted(set(old) | set(new), key=str)
    return ", ".join(f"{k}: {old.get(k)!r} → {new.get(k)!r}" for k in keys if old.get(k) != new.get(k))


def check_counts(cfg: object, positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = ()) -> None:
    """ValueError naming the first field of `cfg` that is not >= 1 (`positive`) or >= 0 (`non_negative`)."""
    for names, low in ((positive, 1), (non_negative, 0)):
        for name in names:
            if getattr(cfg, name) < low:
                raise ValueError(f"--{name} is {getattr(cfg, name)}, expected >= {low}")


def check_finite(cfg: object, names: tuple[str, ...], error: type[Exception] = ValueError) -> None:
    """`error` naming the first float field of `cfg` that is nan or infinite (nan passes every comparison)."""
    for name in names:
        if not math.isfinite(getattr(cfg, name)):
            raise error(f"{name} is {getattr(cfg, name)}, expected a finite number")
