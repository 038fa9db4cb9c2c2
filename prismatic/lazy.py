"""Package names imported on first use (PEP 562), so that a tool needing one light module of a package (a config,
the list of merge algorithms) does not pay for importing the model and transformers, seconds per process."""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module


def lazy_exports(package: str, where: dict[str, str], namespace: dict) -> tuple[Callable, Callable]:
    """The `__getattr__` and `__dir__` of `package`, whose public name N lives in its submodule `where[N]`;
    `namespace` (the package's globals()) keeps each name once imported."""

    def __getattr__(name: str):
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(f"{package}.{where[name]}"), name)
        namespace[name] = value
        return value

    def __dir__():
        return sorted(set(namespace) | set(where))

    return __getattr__, __dir__
