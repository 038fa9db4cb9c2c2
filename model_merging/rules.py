"""Per-module hyper-parameters: regex rules over parameter names, first match wins (mergekit-style).

The default split (docs/DESIGN.md §1) names six groups; a rule's pattern is either one of these names or a regular
expression searched in the parameter name. A rule is written `PATTERN field=value [field=value …]`, e.g.
`llm scale=0.8` or `^vlm\\.llm\\.model\\.layers\\.2[0-3]\\. k=50`; fields are those of the chosen
algorithm's hyper-parameters. Parameters no rule matches use the algorithm's own settings.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from model_merging.errors import MergeError

DEFAULT_GROUPS: tuple[tuple[str, str], ...] = (
    ("vision", r"^vlm\.vision\."),
    ("projector", r"^vlm\.projector\."),
    ("llm", r"^vlm\.llm\."),
    ("action_queries", r"^action_queries$"),
    ("proprio", r"^proprio_proj\."),
    ("action_expert", r"^action_expert\."),
)
_GROUP_RE = {g: re.compile(p) for g, p in DEFAULT_GROUPS}


def group_of_or_empty(name: str) -> str:
    for g, rx in _GROUP_RE.items():
        if rx.search(name):
            return g
    return ""


def group_of(name: str) -> str:
    g = group_of_or_empty(name)
    if not g:
        raise MergeError(f"parameter {name!r} belongs to none of the groups {[g for g, _ in DEFAULT_GROUPS]}")
    return g


@dataclass(frozen=True)
class ModuleRule:
    pattern: str  # a group name from DEFAULT_GROUPS or a regular expression
    overrides: tuple[tuple[str, Any], ...]

    def matches(self, name: str) -> bool:
        if self.pattern in _GROUP_RE:
            return bool(_GROUP_RE[self.pattern].search(name))
        return re.search(self.pattern, name) is not None

    def as_text(self) -> str:
        return " ".join([self.pattern, *(f"{k}={v}" for k, v in self.overrides)])


def _convert(value: str, default: Any, hint: Any, where: str) -> Any:
    if default is None:  # an optional field: its type hint says what it holds
        args = typing.get_args(hint) or (hint,)
        if any(typing.get_origin(a) in (tuple, list) or a in (tuple, list) for a in args):
            raise MergeError(f"{where}: takes a list, which a rule cannot set; give it as the algorithm's option")
        for typ in (bool, int, float):
            if typ in args:
                return _convert(value, typ(), typ, where)
        return value
    try:
        if isinstance(default, bool):
            if value.lower() not in ("true", "false"):
                raise ValueError("expected true or false")
            return value.lower() == "true"
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
        return value
    except ValueError as e:
        raise MergeError(f"{where}: cannot read {value!r} ({e})") from e


def parse_rule(text: str, params_cls: type, option: str | None = None) -> ModuleRule:
    """`PATTERN field=value …` checked against `params_cls`'s fields; errors quote the rule. Fields the class
    lists in `WHOLE_MERGE` hold one value for the whole merge, which `--<option>.<field>` sets, not a rule."""
    parts = text.split()
    if len(parts) < 2:
        raise MergeError(f"rule {text!r}: expected 'PATTERN field=value [field=value …]'")
    pattern, assigns = parts[0], parts[1:]
    if pattern not in _GROUP_RE:
        try:
            re.compile(pattern)
        except re.error as e:
            raise MergeError(f"rule {text!r}: {pattern!r} is neither a group name nor a valid regex ({e})") from e
    known = {f.name: f for f in dataclasses.fields(params_cls)}
    defaults = dataclasses.asdict(params_cls()) if known else {}
    hints = typing.get_type_hints(params_cls) if known else {}
    overrides = []
    for a in assigns:
        key, sep, value = a.partition("=")
        if not sep:
            raise MergeError(f"rule {text!r}: {a!r} is not field=value")
        if key not in known:
            raise MergeError(
                f"rule {text!r}: {params_cls.__name__} has no field {key!r}; fields are {sorted(known) or 'none'}"
            )
        if key in getattr(params_cls, "WHOLE_MERGE", ()):
            where = f"--{option}.{key}" if option else "the algorithm's option"
            raise MergeError(f"rule {text!r}: {key!r} applies to the whole merge: set it with {where}, not in a rule")
        overrides.append((key, _convert(value, defaults[key], hints.get(key), f"rule {text!r}, field {key!r}")))
    return ModuleRule(pattern, tuple(overrides))


def parse_rules(texts: Sequence[str], params_cls: type, option: str | None = None) -> list[ModuleRule]:
    return [parse_rule(t, params_cls, option) for t in texts]


def params_for(name: str, params: Any, rules: Sequence[ModuleRule]) -> Any:
    """The hyper-parameters for parameter `name`: the first matching rule's overrides on top of `params`."""
    for rule in rules:
        if rule.matches(name):
            return dataclasses.replace(params, **dict(rule.overrides))
    return params
