"""The VLA: configs, the model, loading and saving.

The names below are imported on first use (PEP 562), so a tool that only needs the configs does not pay for
importing transformers (seconds per process).
"""

from prismatic.lazy import lazy_exports

_WHERE = {
    "CONFIGS": "configuration", "VLAConfig": "configuration", "get_config": "configuration",
    "BaseModelConfig": "loading",
    "MergeVLA": "modeling", "VLAOutput": "modeling",
    "build_vla": "pretrained", "from_pretrained": "pretrained", "save_pretrained": "pretrained",
}
__all__ = list(_WHERE)

__getattr__, __dir__ = lazy_exports(__name__, _WHERE, globals())
