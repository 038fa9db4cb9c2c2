"""Choose the policy by checkpoint kind: a fine-tuned expert checkpoint, or a merged artifact (routed)."""

from __future__ import annotations

from pathlib import Path

from experiments.robot.policy import ImageTransform, VLAPolicy
from prismatic.checkpoint import CHECKPOINT_KIND, MANIFEST_FILE, CheckpointError, read_manifest_json

FT_KIND = CHECKPOINT_KIND  # "mergevla-checkpoint": one expert, served by VLAPolicy


def read_checkpoint_manifest(path: Path | str) -> dict:
    manifest = read_manifest_json(path, "is neither a fine-tuned checkpoint nor a merged artifact")
    mf = Path(path) / MANIFEST_FILE
    if not isinstance(manifest.get("format"), str):
        raise CheckpointError(f"{mf}: field 'format' is missing; expected {FT_KIND!r} or a merged artifact's format")
    return manifest


def load_policy(path: Path | str, image_transform: ImageTransform | None, device: str = "cpu",
                router_variant: str | None = None, cache_weights: bool = False):
    """A `Policy` for `path`: VLAPolicy for a fine-tuned checkpoint, the routed policy for a merged artifact
    (`router_variant`: which router subspaces score the experts; None: the artifact's default; `cache_weights`:
    keep each expert's built weights, see MultiExpertVLA.cache_weights)."""
    manifest = read_checkpoint_manifest(path)
    if manifest["format"] == FT_KIND:
        from prismatic.models import from_pretrained

        model = from_pretrained(path).to(device).eval()
        if model.norm_stats is None:
            raise CheckpointError(f"{path}/{MANIFEST_FILE}: field 'norm_stats' is empty; the policy cannot "
                                  "un-normalise its actions (was the checkpoint saved by the training script?)")
        return VLAPolicy(model, image_transform)
    try:
        from model_merging import load_routed_policy
    except ImportError as e:
        raise CheckpointError(
            f"{path}: format {manifest['format']!r} is not a fine-tuned checkpoint ({FT_KIND!r}), and the merged "
            f"model's routed policy is unavailable (model_merging.load_routed_policy: {e})"
        ) from e
    return load_routed_policy(path, image_transform=image_transform, device=device, variant=router_variant,
                              cache_weights=cache_weights)


# merge algorithm names (as a merged artifact's manifest records them) → the paper's row labels
PAPER_LABELS = {"ta": "TA", "task_arithmetic": "TA", "ties": "TIES", "tsv": "TSV-M", "tsv_m": "TSV-M",
                "knots": "KnOTS", "wudi": "WUDI", "emr": "EMR", "dare_ta": "DARE-TA", "dare_ties": "DARE-TIES"}


def default_method(manifest: dict, router_variant: str | None = None) -> str:
    """Row label in the results table: the FT experts' row, or the merge algorithm of a merged artifact, as the
    paper labels its rows (MergeVLA with masks), qualified where the merge is another one (the self-attention
    baseline, no masks, per-task action-expert parts) and by the router variant unless it is the artifact's
    default, so that such merges and two routers of one merge are rows of their own."""
    arch = (manifest.get("config") or {}).get("expert_arch")
    if manifest["format"] == FT_KIND:
        from experiments.robot.harness import BASELINE_FT_METHOD, FT_METHOD

        return BASELINE_FT_METHOD if arch == "self_attn" else FT_METHOD
    alg = str(manifest.get("algorithm") or manifest.get("method") or "merged")
    label = PAPER_LABELS.get(alg.lower(), alg)
    notes = ["self-attn"] if arch == "self_attn" else []
    notes += ["no masks"] if (manifest.get("masks") or {}).get("enabled") is False else []
    notes += ["per-task action expert"] if manifest.get("per_task_parts") else []
    notes += [] if router_variant in (None, default_router(manifest)) else [f"{router_variant} router"]
    return ("Baseline " if arch == "self_attn" else "") + label + (f" ({', '.join(notes)})" if notes else "")


def default_router(manifest: dict) -> str | None:
    """The router variant a merged artifact uses when none is named (None for a fine-tuned checkpoint)."""
    if manifest["format"] == FT_KIND:
        return None
    return (manifest.get("router") or {}).get("default_variant", "value")
