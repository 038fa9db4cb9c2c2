"""The VLA: configs, the model, loading and saving.

The names below are imported on first use (PEP 562), so a tool that only needs the configs does not pay for
importing transformers (seconds per process).
"""

from importlib import import_module

_WHERE = {
    "CONFIGS": "configuration", "VLAConfig": "configuration", "get_config": "configuration",
    "BaseModelConfig": "loading",
    "MergeVLA": "modeling", "VLAOutput": "modeling",
    "build_vla": "pretrained", "from_pretrained": "pretrained", "save_pretrained": "pretrained",
}
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_WHERE))
