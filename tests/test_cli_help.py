"""Every command-line flag's `--help` shows the field's own comment and its default.

draccus takes a field's help from the comment on its line, else from the comment lines right above it. It
loses the help of a field annotated with a `Literal[...]` written inline and hands that comment to the next
field, so CLI configs name their literals through an alias.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import inspect
import io
import re
import sys
import tokenize
import typing
from contextlib import redirect_stdout
from pathlib import Path

import draccus
import pytest

REPO = Path(__file__).resolve().parents[1]

SOURCE_ROOTS = ("prismatic", "model_merging", "experiments", "vla-scripts", "benchmarks")
SCRIPT_ROOTS = ("vla-scripts", "benchmarks")  # not packages: their files are loaded by path


def cli_configs() -> list[tuple[str, str]]:
    """(module, or file outside the packages; config class name) of every config a script hands to run_cli."""
    found = []
    for root in SOURCE_ROOTS:
        for path in sorted((REPO / root).rglob("*.py")):
            rel = path.relative_to(REPO)
            for name in re.findall(r"run_cli\(\s*\"[^\"]+\",\s*(\w+)", path.read_text()):
                found.append((str(rel) if root in SCRIPT_ROOTS else ".".join(rel.with_suffix("").parts), name))
    return found


CLI_CONFIGS = cli_configs()


@functools.cache
def load_config_class(where: str, name: str) -> type:
    if where.endswith(".py"):
        spec = importlib.util.spec_from_file_location(Path(where).stem, REPO / where)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    return getattr(module, name)


def field_comments(cls: type) -> dict[str, str]:
    """Field name → the comment on its line in the class body, else the comment lines right above it."""
    fields = {f.name for f in dataclasses.fields(cls)}
    tokens = list(tokenize.generate_tokens(io.StringIO(inspect.getsource(cls)).readline))
    out: dict[str, str] = {}
    above: list[str] = []
    line: list[tokenize.TokenInfo] = []
    for tok in tokens:
        if tok.type == tokenize.COMMENT and not line:
            above.append(tok.string)
        elif tok.type == tokenize.NL and not line:
            if not tok.line.strip():  # a blank line ends a block of comments above
                above = []
        elif tok.type == tokenize.NEWLINE:
            code = [t for t in line if t.type not in (tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT)]
            name = code[0].string if len(code) > 1 and code[1].string == ":" else None
            inline = [t.string for t in line if t.type == tokenize.COMMENT]
            if name in fields and (inline or above):
                out[name] = " ".join(c.lstrip("#").strip() for c in (inline or above))
            line, above = [], []
        elif tok.type not in (tokenize.NL, tokenize.INDENT, tokenize.DEDENT):
            line.append(tok)
    return out


def leaf_fields(cls: type, prefix: str = ""):
    """(flag, comment) for every field the CLI exposes, nested dataclasses' fields under their prefix."""
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            yield from leaf_fields(kind, f"{prefix}{f.name}.")
        else:
            yield f"--{prefix}{f.name}", comments.get(f.name)


def help_blocks(cls: type) -> dict[str, str]:
    out = io.StringIO()
    with redirect_stdout(out), pytest.raises(SystemExit):
        draccus.parse(config_class=cls, args=["--help"])
    blocks: dict[str, str] = {}
    flag = None
    for line in out.getvalue().splitlines():
        m = re.match(r"  (--[\w.]+)(.*)", line)
        if m:
            flag = m.group(1)
            blocks[flag] = m.group(2)
        elif flag and line.startswith("   "):
            blocks[flag] += " " + line
        else:
            flag = None
    return blocks


@pytest.mark.parametrize("where, name", CLI_CONFIGS, ids=[f"{w}:{n}" for w, n in CLI_CONFIGS])
def test_every_flag_shows_its_own_comment_and_default(where, name):
    cls = load_config_class(where, name)
    blocks = help_blocks(cls)
    problems = []
    for flag, comment in leaf_fields(cls):
        block = blocks.get(flag)
        if block is None:
            problems.append(f"{flag}: not in --help")
        elif comment is None:
            problems.append(f"{flag}: no comment in the source, so no help")
        elif re.sub(r"\s", "", comment) not in re.sub(r"\s", "", block) or "(default:" not in block:
            problems.append(f"{flag}: help {' '.join(block.split())!r}, expected its comment {comment!r} and the default")
    assert not problems, "\n".join(problems)


def test_every_cli_config_is_found():
    names = {name for _, name in CLI_CONFIGS}
    assert len(CLI_CONFIGS) >= 20 and {"FinetuneConfig", "MergyConfig", "GenerateConfig", "DemoConfig"} <= names


def test_field_comments_reads_inline_and_above_comments():
    @dataclasses.dataclass
    class Example:
        # a section heading

        a: int = 1  # inline
        # above, line one
        # line two
        b: str = "x # not a comment"
        c: float = 0.5

    assert field_comments(Example) == {"a": "inline", "b": "above, line one line two"}
