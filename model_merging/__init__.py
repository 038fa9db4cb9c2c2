"""Merging MergeVLA experts: algorithms, masks, the merged artifact, and the test-time router.

Public API (see docs in each module):
- `merge_experts(experts, out_dir, MergeOptions(...))`: expert checkpoints → merged artifact directory.
- `load_merged(dir) -> MergedModel`: `.for_task(e)` (plain MergeVLA for task e), `.multi_expert()`,
  `.route(batch)`.
- `RoutedPolicy(merged)`: the evaluation `Policy` that routes each episode from its first observation.
- `merge_tensors(name, taus, params)` and `METHODS`: the merge methods on plain tensors.
"""

from model_merging.algorithms import METHODS, MergeContext, Merged, get_method, merge_task_vectors, merge_tensors
from model_merging.errors import MergeError
from model_merging.masks import MaskStats, pack_mask, selfish_ratio, tall_masks, unpack_mask
from model_merging.merge import MergeOptions, merge_experts
from model_merging.merged_model import MergedModel, load_merged
from model_merging.routed_policy import RoutedPolicy, load_routed_policy
from model_merging.router import RouteResult, routing_accuracy, subspace_scores

__all__ = [
    "METHODS", "MergeContext", "Merged", "get_method", "merge_task_vectors", "merge_tensors", "MergeError",
    "MaskStats", "pack_mask", "selfish_ratio", "tall_masks", "unpack_mask", "MergeOptions", "merge_experts",
    "MergedModel", "load_merged", "RoutedPolicy", "load_routed_policy", "RouteResult", "routing_accuracy", "subspace_scores",
]
