"""Merging MergeVLA experts: algorithms, masks, the merged artifact, and the test-time router.

Public API (see docs in each module):
- `merge_experts(experts, out_dir, MergeOptions(...))`: expert checkpoints → merged artifact directory.
- `load_merged(dir) -> MergedModel`: `.for_task(e)` (plain MergeVLA for task e), `.multi_expert()`,
  `.route(batch)`.
- `RoutedPolicy(merged)`: the evaluation `Policy` that routes each episode from its first observation.
- `merge_tensors(name, taus, params)` and `METHODS`: the merge methods on plain tensors.
"""

from prismatic.lazy import lazy_exports

# imported on first use (PEP 562): a tool that needs one module (the algorithm list, say) does not pay for
# importing the model and transformers
_WHERE = {
    "METHODS": "algorithms", "MergeContext": "algorithms", "Merged": "algorithms", "get_method": "algorithms",
    "merge_task_vectors": "algorithms", "merge_tensors": "algorithms",
    "MergeError": "errors",
    "MaskStats": "masks", "pack_mask": "masks", "selfish_ratio": "masks", "tall_masks": "masks",
    "unpack_mask": "masks",
    "MergeOptions": "merge", "merge_experts": "merge",
    "MergedModel": "merged_model", "load_merged": "merged_model",
    "RoutedPolicy": "routed_policy", "load_routed_policy": "routed_policy",
    "RouteResult": "router", "routing_accuracy": "router", "subspace_scores": "router",
}
__all__ = list(_WHERE)

__getattr__, __dir__ = lazy_exports(__name__, _WHERE, globals())
