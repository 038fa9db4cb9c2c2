"""Stage 4: merge the experts with every algorithm.

Each merge is one `model_merging.merge_experts` call writing its own artifact directory, with a sidecar
`<dir>.spec.json` recording the experts' weight hashes and the options; an artifact whose sidecar matches is
reused, any other is replaced. Merges run in `workers` spawned processes.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

# The demo's merge algorithms, in table order, with the paper's names.
ALGORITHM_LABELS = {
    "task_arithmetic": "TA", "ties": "TIES", "tsv": "TSV", "knots": "KnOTS", "wudi": "WUDI", "emr": "EMR",
    "dare": "DARE", "weighted_average": "Avg", "retain": "RETAIN",
}


@dataclass(frozen=True)
class MergeJob:
    name: str  # artifact directory name, e.g. "mergevla-ties-masks"
    family: str  # "mergevla" | "baseline": whose experts
    algorithm: str
    masks: bool
    expert_head_layers: int
    experts: tuple[tuple[str, str], ...]  # (task name, checkpoint dir), in task order
    expert_hashes: tuple[str, ...]
    out_dir: str
    mask_lambda: float = 0.6
    k_gate: int = 8
    seed: int = 0
    routed: bool = True  # evaluated with the router (False: every episode uses its own suite's task)
    per_task_parts: tuple[str, ...] = ()  # from-scratch groups kept per task instead of averaged (MergeOptions)
    variant: str | None = None  # router variant of its rollouts (None: the pipeline's router_variant)
    # exemplar router: first frames per task (0: none), from <data_root>/<task>, shown with this centre crop
    exemplars: int = 0
    data_root: str | None = None
    data_fingerprint: str | None = None
    crop_area: float = 1.0
    params: dict = field(default_factory=dict, compare=False, hash=False)  # algorithm hyper-parameter overrides

    @property
    def label(self) -> str:
        return self.label_with(self.variant or "value")

    def label_with(self, variant: str) -> str:
        """The table's name of this merge, routed with `variant`."""
        alg = ALGORITHM_LABELS.get(self.algorithm, self.algorithm)
        if self.family == "baseline":
            return f"Baseline {alg}, no masks (self-attn)" if not self.masks else f"Baseline {alg} + masks (self-attn)"
        router = {"value": " + router", "exemplar": " + exemplar router"}.get(variant, f" + router ({variant} subspaces)")
        return (f"MergeVLA {alg}" + (" + masks" if self.masks else " (no masks)")
                + (", per-task action expert" if self.per_task_parts else "")
                + (router if self.routed else ", task given"))

    def resolved_params(self) -> dict:
        from model_merging import get_method

        return dataclasses.asdict(get_method(self.algorithm).params(**self.params))

    def spec(self) -> dict:
        return {"family": self.family, "algorithm": self.algorithm, "masks": self.masks,
                "expert_head_layers": self.expert_head_layers, "experts": [list(e) for e in self.experts],
                "expert_hashes": list(self.expert_hashes), "mask_lambda": self.mask_lambda, "k_gate": self.k_gate,
                # every hyper-parameter, defaults included: a changed default (EMR's rescale) redoes the merge
                "seed": self.seed, "params": self.resolved_params(), "per_task_parts": list(self.per_task_parts),
                "exemplars": self.exemplars, "data_fingerprint": self.data_fingerprint, "crop_area": self.crop_area}


def _spec_file(out: Path) -> Path:
    return out.parent / f"{out.name}.spec.json"


def run_merge(job: MergeJob) -> dict:
    import torch

    from model_merging import MergeOptions, get_method, merge_experts
    from prismatic.io import write_json

    torch.set_num_threads(1)
    out = Path(job.out_dir)
    spec_file = _spec_file(out)
    t0 = time.perf_counter()
    ex_id = _exemplar_id(out)
    # (exemplars recomputed by hand since then would not match their recorded identity)
    cached = out.exists() and spec_file.is_file() and json.loads(spec_file.read_text()) == job.spec() | ex_id
    if not cached:
        shutil.rmtree(out, ignore_errors=True)
        spec_file.unlink(missing_ok=True)
        params = get_method(job.algorithm).params(**job.params) if job.params else None
        opts = MergeOptions(algorithm=job.algorithm, params=params, masks=job.masks, mask_lambda=job.mask_lambda,
                            k_gate=job.k_gate, expert_head_layers=job.expert_head_layers,
                            per_task_parts=tuple(job.per_task_parts), seed=job.seed)
        merge_experts([(n, Path(d)) for n, d in job.experts], out, opts, log=None)
        if job.exemplars:
            calibrate_exemplars(job, out)
        ex_id = _exemplar_id(out)
        write_json(spec_file, job.spec() | ex_id)
    manifest = json.loads((out / "manifest.json").read_text())
    stats = manifest["masks"].get("stats") or {}
    return {"name": job.name, "label": job.label, "dir": str(out), "weights_sha256": manifest["weights_sha256"],
            "exemplars_sha256": ex_id.get("exemplars_sha256"),
            "selfish_ratio": stats.get("selfish_ratio"), "cached": cached,
            "wall_s": round(time.perf_counter() - t0, 1)}


def _exemplar_id(out: Path) -> dict:
    """{"exemplars_sha256": …} of the artifact's exemplar tensors, {} when it has none."""
    from model_merging.exemplars import exemplar_record

    record = exemplar_record(out)
    return {"exemplars_sha256": record.get("weights_sha256")} if record else {}


def calibrate_exemplars(job: MergeJob, out: Path) -> None:
    """The exemplar router's exemplars of each task from its suite's demos (tasks are named like their suites)."""
    from model_merging.exemplar_router import DataSource, calibrate
    from model_merging.exemplars import FrameView, write_exemplars
    from model_merging.merged_model import load_merged

    merged = load_merged(out, exemplars=False)
    sources = {t: DataSource(Path(job.data_root), t) for t in merged.task_names}
    view = FrameView("crop", job.crop_area)  # as the TableTop-4 harness shows frames
    exemplars, provenance = calibrate(merged, sources, job.exemplars, view)
    write_exemplars(merged, exemplars, provenance, view)


def run_merges(jobs: list[MergeJob], workers: int, log=print) -> dict[str, dict]:
    out: dict[str, dict] = {}

    def report(r: dict) -> None:
        out[r["name"]] = r
        sr = f", selfish ratio {r['selfish_ratio']:.3f}" if r.get("selfish_ratio") is not None else ""
        log(f"[merge] {r['label']}: {'reused' if r['cached'] else 'merged'} in {r['wall_s']:.1f}s{sr}")

    if workers <= 1:
        for j in jobs:
            report(run_merge(j))
    else:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as ex:
            for f in as_completed([ex.submit(run_merge, j) for j in jobs]):
                report(f.result())
    return {j.name: out[j.name] for j in jobs}
