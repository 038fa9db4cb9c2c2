"""Load a merged artifact: per-task plain models, the multi-expert model, and the router.

Loading is strict: the manifest must be a finished `mergevla-merged` one, the weights file must match its
sha256 and hold exactly the tensors the manifest implies (names, dtypes, shapes), and θ0 (from the
recorded base reference, or one given explicitly) must hash to the recorded base sha256. Tensors are read
with plain safetensors parsing; nothing is ever unpickled. Exemplars for the exemplar router
(exemplar_router.py), when the directory holds them, must belong to the same weights.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from model_merging.artifact import (
    MERGED_KIND,
    ROUTER_SIDES,
    delta_key,
    head_key,
    mask_key,
    plan_specs,
    rescale_key,
    router_key,
    shared_key,
)
from model_merging.errors import MergeError
from model_merging.exemplars import Exemplars, read_exemplars
from model_merging.layout import ModelLayout
from model_merging.masks import apply_mask, unpack_mask
from model_merging.multi_expert import (
    ExpertSelector,
    MaskedDeltaLinear,
    MultiExpertVLA,
    PerTaskModule,
    PerTaskQueries,
)
from model_merging.router import EXEMPLAR, RouteResult, check_variant, exemplar_scores, subspace_scores
from model_merging.tensor_files import SafetensorsReader
from prismatic.checkpoint import MANIFEST_FILE, WEIGHTS_FILE, CheckpointError, read_manifest
from prismatic.io import sha256_file
from prismatic.models.configuration import VLAConfig
from prismatic.models.loading import BaseModelConfig, base_config_from_ref, resolve_base
from prismatic.models.modeling import MergeVLA
from prismatic.models.processing import VLAProcessor, load_tokenizer


def _strip(prefix: str, name: str) -> str:
    return name[len(prefix):]


class MergedModel:
    """A merged artifact with its base model: `for_task(e)`, `multi_expert()`, `route(batch)`."""

    def __init__(self, directory: Path, manifest: dict, reader: SafetensorsReader, base_sd: dict, base_ref: dict,
                 tokenizer_dir: Path | None, exemplars: Exemplars | None = None):
        self.directory, self.manifest, self.reader = directory, manifest, reader
        self.exemplars = exemplars
        self.config = VLAConfig.from_dict(manifest["config"])
        self.task_names: list[str] = list(manifest["task_names"])
        self.norm_stats: dict[str, dict | None] = dict(manifest["norm_stats"])
        self.base_ref = base_ref
        self._base_sd = base_sd
        self._tokenizer_dir = tokenizer_dir
        self._multi: MultiExpertVLA | None = None

    # ------------------------------------------------------------------------------------------ tensors

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    @property
    def has_masks(self) -> bool:
        return bool(self.manifest["masks"]["enabled"])

    @property
    def lora_params(self) -> list[str]:
        return list(self.manifest["lora_params"])

    def task_index(self, task: str | int) -> int:
        if isinstance(task, int):
            if not 0 <= task < self.num_tasks:
                raise MergeError(f"task index {task} outside 0..{self.num_tasks - 1}")
            return task
        if task not in self.task_names:
            raise MergeError(f"unknown task {task!r}; this merged model has {self.task_names}")
        return self.task_names.index(task)

    def delta(self, p: str) -> torch.Tensor:
        return self.reader.get(delta_key(p))

    def mask(self, task: str | int, p: str) -> torch.Tensor | None:
        if not self.has_masks:
            return None
        t = self.task_names[self.task_index(task)]
        return unpack_mask(self.reader.get(mask_key(t, p)), self.manifest["lora_params"][p])

    def rescaler(self, task: str | int, p: str) -> torch.Tensor | float:
        if not self.manifest["masks"].get("rescaled"):
            return 1.0
        return self.reader.get(rescale_key(self.task_names[self.task_index(task)], p))

    def shared_state(self) -> dict[str, torch.Tensor]:
        return {n: self.reader.get(shared_key(n)) for n in self.manifest["shared_params"]}

    def head_state(self, task: str | int) -> dict[str, torch.Tensor]:
        t = self.task_names[self.task_index(task)]
        return {n: self.reader.get(head_key(t, n)) for n in self.manifest["head_params"]}

    @property
    def router_variants(self) -> list[str]:
        """The router variants this artifact can route with: those it stores subspaces for, and `exemplar` when
        exemplars were calibrated for it."""
        return list(self.manifest["router"]["variants"]) + ([EXEMPLAR] if self.exemplars is not None else [])

    def subspaces(self, variant: str = "value") -> tuple[torch.Tensor, torch.Tensor]:
        """(M, k, D) action-side and vision-side router subspaces, tasks in manifest order."""
        check_variant(variant, self.manifest["router"]["variants"], str(self.directory))
        return tuple(torch.stack([self.reader.get(router_key(t, variant, s)) for t in self.task_names])
                     for s in ROUTER_SIDES)

    # ------------------------------------------------------------------------------------------- models

    def _plain_model(self) -> MergeVLA:
        """θ0 in the VLM (no LoRA), the shared from-scratch parts loaded; heads still to be filled."""
        model = MergeVLA(self.config)
        model.vlm.load_state_dict(self._base_sd)
        missing = set(model.state_dict()) - {f"vlm.{k}" for k in self._base_sd}
        expected = set(self.manifest["shared_params"]) | set(self.manifest["head_params"])
        if missing != expected:
            raise MergeError(
                f"{self.directory}: from-scratch parameters in the manifest do not match config "
                f"{self.config.name!r} (missing {sorted(missing - expected)[:3]}, extra {sorted(expected - missing)[:3]})"
            )
        model.load_state_dict(self.shared_state(), strict=False)
        model.processor = VLAProcessor(load_tokenizer(self.config.tokenizer, self._tokenizer_dir, MergeError),
                                       self.config.image_size, self.config.llm.vocab_size)
        model.base_ref = self.base_ref
        model.eval()
        return model

    @torch.no_grad()
    def for_task(self, task: str | int) -> MergeVLA:
        """Task e's deployable model: plain weights θ0 + S_e ⊙ τ_merge, shared parts, e's head and stats.

        Usable wherever a fine-tuned MergeVLA is (e.g. `VLAPolicy`): `.norm_stats` are task e's own.
        """
        e = self.task_index(task)
        model = self._plain_model()
        for p in self.lora_params:
            w = model.get_parameter(p)
            w.copy_(apply_mask(w, self.delta(p), self.mask(e, p), self.rescaler(e, p)))
        model.load_state_dict(self.head_state(e), strict=False)
        model.norm_stats = self.norm_stats[self.task_names[e]]
        model.task_name = self.task_names[e]
        model.init_seed = None
        return model

    @torch.no_grad()
    def multi_expert(self) -> MultiExpertVLA:
        """Every task in one module (built once, then cached): see multi_expert.py."""
        if self._multi is not None:
            return self._multi
        model = self._plain_model()
        selector = ExpertSelector()
        rescaled = bool(self.manifest["masks"].get("rescaled"))
        for p in self.lora_params:
            module_path = p[: -len(".weight")]
            parent_path, _, child = module_path.rpartition(".")
            linear = model.get_submodule(module_path)
            if not self.has_masks:  # every task shares the VLM: fold τ in once
                linear.weight.copy_(apply_mask(linear.weight, self.delta(p), None))
                continue
            packed = [self.reader.get(mask_key(t, p)) for t in self.task_names]
            rescalers = [self.reader.get(rescale_key(t, p)) for t in self.task_names] if rescaled else None
            setattr(model.get_submodule(parent_path), child,
                    MaskedDeltaLinear(linear, self.delta(p), packed, rescalers, selector))
        heads = [self.head_state(e) for e in range(self.num_tasks)]
        modules = {ModelLayout.head_module(n) for n in self.manifest["head_params"]}
        if "action_queries" in modules:  # a parameter, not a module: the model asks PerTaskQueries per sample
            modules.remove("action_queries")
            model.per_task_queries = PerTaskQueries([hs["action_queries"] for hs in heads], selector)
        for module_path in sorted(modules):
            template = model.get_submodule(module_path)
            copies = []
            for hs in heads:
                m = copy.deepcopy(template)
                m.load_state_dict({_strip(module_path + ".", n): v for n, v in hs.items()
                                   if n.startswith(module_path + ".")})
                copies.append(m)
            parent_path, _, child = module_path.rpartition(".")
            setattr(model.get_submodule(parent_path), child, PerTaskModule(copies, selector))
        self._multi = MultiExpertVLA(model, selector, self.task_names).eval()
        self._multi.norm_stats = self.norm_stats
        return self._multi

    @property
    def candidates_share_llm_input(self) -> bool:
        """Whether every task's LLM sees the same input and weights, so that one forward serves all candidates.

        Masks give each task its own weights; per-task action queries give each its own query embeddings.
        The other per-task parts (proprio projector, action-expert blocks) never reach the LLM's states.
        """
        return not self.has_masks and "action_queries" not in self.manifest.get("per_task_parts", [])

    @torch.no_grad()
    def candidate_states(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The router layer's action-query and vision states of every candidate task on `batch`, in one forward.

        Returns (h_act, h_vis, task) with task[i] the candidate row i ran: unless the candidates share the
        LLM's input, each sample is repeated M times, copy e running task e's model (row b*M + e). Otherwise
        one row per sample serves every candidate, and task is None.
        """
        b, m = batch["input_ids"].shape[0], self.num_tasks
        if self.candidates_share_llm_input:
            return (*self.task_states(batch, torch.zeros(b, dtype=torch.long)), None)
        task = torch.arange(m).repeat(b)
        return (*self.task_states({k: v.repeat_interleave(m, dim=0) for k, v in batch.items()}, task), task)

    @torch.no_grad()
    def task_states(self, batch: dict[str, torch.Tensor], task: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The router layer's action-query and vision states of sample i under task task[i]'s model."""
        model = self.multi_expert()
        device = next(model.parameters()).device
        out = model(task, **{k: v.to(device) for k, v in batch.items()}, keep_states=True)
        layer = self.manifest["router"]["layer"]
        return out.act_states[layer], out.vis_states[layer]

    def candidate_scores(self, states: tuple, variant: str) -> torch.Tensor:
        """(B, M) router scores of `candidate_states` under `variant` (subspaces, or the exemplars)."""
        h_act, h_vis, task = states
        if variant == EXEMPLAR:
            return self._exemplar_scores(h_act, h_vis, task)
        r_act, r_vis = (r.to(h_act.device) for r in self.subspaces(variant))
        if task is None:  # shared: score each sample's one row against every task's subspaces
            return torch.stack([subspace_scores(h_act, h_vis, r_act[e], r_vis[e]) for e in range(self.num_tasks)], 1)
        return subspace_scores(h_act, h_vis, r_act[task], r_vis[task]).view(-1, self.num_tasks)

    def _exemplar_scores(self, h_act: torch.Tensor, h_vis: torch.Tensor, task: torch.Tensor | None) -> torch.Tensor:
        check_variant(EXEMPLAR, self.router_variants, str(self.directory))
        ex = self.exemplars

        def score(e: int, a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            t = self.task_names[e]
            st, sc = ex.states[t], ex.scales[t]
            return exemplar_scores(a, v, st["act"].to(a.device), st["vis"].to(a.device), sc["act"], sc["vis"])

        m = self.num_tasks
        if task is None:
            return torch.stack([score(e, h_act, h_vis) for e in range(m)], 1)
        a, v = h_act.view(-1, m, *h_act.shape[1:]), h_vis.view(-1, m, *h_vis.shape[1:])  # row b*M + e
        return torch.stack([score(e, a[:, e], v[:, e]) for e in range(m)], 1)

    @torch.no_grad()
    def route(self, batch: dict[str, torch.Tensor], variant: str | None = None) -> RouteResult:
        """Score every candidate task on each sample of `batch` (first observations) and pick the best."""
        variant = check_variant(variant or self.manifest["router"]["default_variant"], self.router_variants,
                                str(self.directory))
        scores = self.candidate_scores(self.candidate_states(batch), variant)
        return RouteResult(scores.argmax(1).cpu(), scores.cpu(), self.task_names)


def load_merged(directory: Path | str, base: BaseModelConfig | None = None, verify: bool = True,
                exemplars: bool = True) -> MergedModel:
    """Open a merged artifact; θ0 comes from `base` or, by default, from the base recorded in the manifest.

    `exemplars`: also load the exemplar router's exemplars when the directory holds them.
    """
    d = Path(directory)
    try:
        manifest = read_manifest(d, MERGED_KIND)
    except CheckpointError as e:
        raise MergeError(str(e)) from e
    wf = d / WEIGHTS_FILE
    if not wf.is_file():
        raise MergeError(f"{wf} is missing")
    if verify and sha256_file(wf) != manifest.get("weights_sha256"):
        raise MergeError(f"{wf} does not match weights_sha256 in {d / MANIFEST_FILE}: the file is truncated or corrupt")
    reader = SafetensorsReader(wf)
    try:
        expected = {s.name: s for s in plan_specs(manifest)}
    except (KeyError, TypeError) as e:
        raise MergeError(f"{d / MANIFEST_FILE}: a field describing the tensors is missing or malformed ({e})") from e
    have = reader.specs
    if set(have) != set(expected):
        raise MergeError(f"{wf}: tensors differ from the manifest (missing {sorted(set(expected) - set(have))[:3]}, "
                         f"unexpected {sorted(set(have) - set(expected))[:3]})")
    for n, s in expected.items():
        if (have[n].dtype, have[n].shape) != (s.dtype, s.shape):
            raise MergeError(f"{wf}: tensor {n!r} is {have[n].dtype} {list(have[n].shape)}, "
                             f"the manifest implies {s.dtype} {list(s.shape)}")
    cfg = VLAConfig.from_dict(manifest["config"])
    base = base or base_config_from_ref(manifest["base"])
    base_sd, base_ref, tok_dir = resolve_base(cfg, base, verify)
    if base_ref["sha256"] != manifest["base"]["sha256"]:
        raise MergeError(f"{d} was merged on base {manifest['base']['sha256'][:12]}…, but {base.describe()} hashes "
                         f"to {base_ref['sha256'][:12]}…")
    return MergedModel(d, manifest, reader, base_sd, base_ref, tok_dir,
                       read_exemplars(d, manifest) if exemplars else None)
