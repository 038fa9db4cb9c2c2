"""The merged model as an evaluation `Policy`: route each episode from its first observation, then act.

`start_episodes` runs the router once for the new episodes (every candidate task in one batched forward)
and remembers each episode's expert; `act` serves episodes of different experts in one batch, with each
expert's masked VLM, its own head, and its own normalisation statistics. Episodes are keyed by the
harness's episode ids (several run at once and start at different times); without ids, the episodes of
the latest `start_episodes` call are numbered 0..B-1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from experiments.robot.policy import ImageTransform, camera_images, raw_proprio, to_env_actions
from model_merging.errors import MergeError
from model_merging.exemplars import exemplars_sha256
from model_merging.merged_model import MergedModel, load_merged
from model_merging.router import EXEMPLAR, check_variant
from prismatic.models.loading import BaseModelConfig
from prismatic.vla.normalization import normalize


@dataclass
class RoutedPolicy:
    merged: MergedModel
    image_transform: ImageTransform | None = None
    variant: str | None = None  # router subspaces: value (default), key, key_value or value_update
    force_task: str | None = None  # skip the router: every episode runs this task's expert (oracle routing)
    device: str = "cpu"
    cache_weights: bool = False  # keep each task's built weights (faster; memory: MultiExpertVLA.cache_weights)
    routed: dict[int, int] = field(default_factory=dict)  # episode id → task index

    def __post_init__(self):
        if self.variant == EXEMPLAR and EXEMPLAR not in self.merged.router_variants:
            exemplars_sha256(self.merged.directory)  # raises, saying how to compute them
        if self.variant is not None:
            check_variant(self.variant, self.merged.router_variants, str(self.merged.directory))
        if self.force_task is not None:
            self.merged.task_index(self.force_task)
        missing = [t for t, s in self.merged.norm_stats.items() if s is None]
        if missing:
            raise MergeError(f"{self.merged.directory}: experts {missing} have no norm_stats; the policy cannot "
                             "normalise proprio or un-normalise actions for them")
        self.model = self.merged.multi_expert().to(self.device).cache_weights(self.cache_weights)

    def _batch(self, obs: Sequence[dict], instructions: Sequence[str], proprio: np.ndarray) -> dict:
        images = np.stack([camera_images(o, self.image_transform) for o in obs])
        batch = self.model.processor(list(instructions), images, proprio)
        return {k: v.to(self.device) for k, v in batch.items()}

    @torch.no_grad()
    def start_episodes(self, first_obs, instructions, episode_ids: Sequence[int] | None = None) -> list[dict]:
        if episode_ids is None:
            self.routed.clear()
            episode_ids = range(len(first_obs))
        if self.force_task is not None:
            e = self.merged.task_index(self.force_task)
            infos = [{"routed_expert": self.merged.task_names[e], "routed_index": e, "route_forced": True}
                     for _ in first_obs]
        else:
            # The router reads LLM hidden states, which proprio never reaches: zeros stand in for it.
            proprio = np.zeros((len(first_obs), self.merged.config.proprio_dim), np.float32)
            result = self.merged.route(self._batch(first_obs, instructions, proprio), self.variant)
            infos = []
            for i in range(len(first_obs)):
                info = result.info(i)
                infos.append({"routed_expert": info["routed_task"], "routed_index": info["routed_index"],
                              "route_scores": info["router_scores"]})
        for eid, info in zip(episode_ids, infos):
            self.routed[int(eid)] = info["routed_index"]
        return infos

    def end_episodes(self, episode_ids: Sequence[int]) -> None:
        for eid in episode_ids:
            self.routed.pop(int(eid), None)

    @torch.no_grad()
    def act(self, obs, instructions, episode_ids) -> np.ndarray:
        try:
            experts = [self.routed[int(i)] for i in episode_ids]
        except KeyError as e:
            raise ValueError(f"episode {e.args[0]} was never started with start_episodes") from None
        stats = [self.merged.norm_stats[self.merged.task_names[e]] for e in experts]
        proprio = np.stack([normalize(raw_proprio(o), s["proprio"]) for o, s in zip(obs, stats)])
        pred = self.model.predict_action(experts, **self._batch(obs, instructions, proprio))
        pred = pred.float().cpu().numpy()
        return np.stack([to_env_actions(p, s["action"]) for p, s in zip(pred, stats)])


def load_routed_policy(path: Path | str, image_transform: ImageTransform | None = None, device: str = "cpu",
                       variant: str | None = None, force_task: str | None = None,
                       base: BaseModelConfig | None = None, cache_weights: bool = False) -> RoutedPolicy:
    """A merged artifact directory → its routed policy (what the LIBERO and TableTop evaluations call)."""
    return RoutedPolicy(load_merged(path, base=base), image_transform, variant, force_task, device, cache_weights)
