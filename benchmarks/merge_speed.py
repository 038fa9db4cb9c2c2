"""Merge speed and memory: M synthetic experts of real size (Qwen2.5-0.5B + DINOv2/SigLIP, LoRA r=64).

    python benchmarks/merge_speed.py                      # every algorithm, real shapes, 4 experts
    python benchmarks/merge_speed.py --config_name tiny   # a quick run on the tiny config

Prints, per algorithm, the wall time of a full `merge_experts` run (hash checks, read, merge, TALL masks,
write), its peak RSS, and both relative to the floor: one pass that merely reads every expert tensor and
forms each fp32 task vector scale·B·A. Each measurement runs in a fresh process, so peak RSS is its own.
Targets (issue 4): TA/TIES within 2× of the floor's time; peak RSS ≤ 2× one model (θ0 in fp32).
Algorithms listed in `estimate` (WUDI by default: 300 Adam steps per matrix is GPU work) are timed on a
strided subset of the weights and extrapolated by element count; their rows say "est.".
"""

from __future__ import annotations

import concurrent.futures as cf
import math
import multiprocessing as mp
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from prismatic.cli import check_counts, run_cli

ALL = ["task_arithmetic", "ties", "dare", "weighted_average", "tsv", "knots", "emr", "retain", "wudi"]


@dataclass
class BenchConfig:
    # Model config whose shapes the synthetic experts take (qwen25-dinosiglip-224px = real size, or tiny)
    config_name: str = "qwen25-dinosiglip-224px"
    num_experts: int = 4  # M
    algorithms: list[str] = field(default_factory=lambda: list(ALL))  # which algorithms to time
    masks: bool = True  # compute and write TALL (EMR: its own) masks, as the default merge does
    estimate: list[str] = field(default_factory=lambda: ["wudi"])  # timed on a subset and extrapolated
    estimate_modules: int = 12  # weights in that subset
    wudi_steps: int = 300  # WUDI's Adam steps per matrix (the release's value)
    torch_threads: int = 0  # 0 = torch's default
    seed: int = 0  # seeds the synthetic experts and DARE
    # Where experts and outputs go (default: a temporary directory, removed at the end). Experts found
    # there from an earlier run with the same config, M and seed are reused.
    work_dir: Optional[Path] = None


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def _setup(threads: int):
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    torch.set_grad_enabled(False)
    return _peak_rss_gb()


def _floor_child(experts, threads: int) -> dict:
    """Read every tensor of every expert once and form each fp32 task vector; keep nothing."""
    base = _setup(threads)
    from model_merging.experts import ExpertSet

    t0 = time.perf_counter()
    es = ExpertSet.open(experts, verify_hashes=False)
    for module in es.layout.lora_modules:
        es.task_vectors(module)
    for n in es.layout.scratch:
        es.tensors(n)
    return {"wall": time.perf_counter() - t0, "rss": _peak_rss_gb(), "rss_base": base}


def _merge_child(experts, out: str, algorithm: str, masks: bool, wudi_steps: int, seed: int, threads: int) -> dict:
    base = _setup(threads)
    from model_merging.algorithms import WudiParams
    from model_merging.merge import MergeOptions, merge_experts

    params = WudiParams(steps=wudi_steps) if algorithm == "wudi" else None
    t0 = time.perf_counter()
    merge_experts(experts, out, MergeOptions(algorithm=algorithm, params=params, masks=masks, seed=seed), log=None)
    wall = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in Path(out).iterdir())
    shutil.rmtree(out)
    return {"wall": wall, "rss": _peak_rss_gb(), "rss_base": base, "bytes": size}


def _estimate_child(experts, algorithm: str, n_modules: int, wudi_steps: int, seed: int, threads: int) -> dict:
    """Time the algorithm alone on a strided subset of weights; report seconds per dense element."""
    base = _setup(threads)
    from model_merging.algorithms import MergeContext, WudiParams, get_method
    from model_merging.experts import ExpertSet
    from model_merging.rules import group_of

    es = ExpertSet.open(experts, verify_hashes=False)
    method = get_method(algorithm)
    params = WudiParams(steps=wudi_steps) if algorithm == "wudi" else method.params()
    mods = list(es.layout.lora_modules.items())
    stride = max(1, len(mods) // n_modules)
    spent, elems = 0.0, 0
    for module, (o, i) in mods[::stride][:n_modules]:
        factors = es.lora_factors(module)
        taus = es.task_vectors(module, factors)
        p = f"{module}.weight"
        t0 = time.perf_counter()
        method.fn(taus, params, MergeContext(name=p, group=group_of(p), factors=tuple(factors), seed=seed))
        spent += time.perf_counter() - t0
        elems += o * i
    total = sum(o * i for o, i in es.layout.lora_modules.values())
    return {"alg_s_per_elem": spent / elems, "total_elems": total, "subset": len(mods[::stride][:n_modules]),
            "modules": len(mods), "rss": _peak_rss_gb(), "rss_base": base}


def _in_child(fn, *args) -> dict:
    with cf.ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def _make_experts(cfg_name: str, m: int, seed: int, root: Path) -> list[tuple[str, Path]]:
    from model_merging.synthetic import write_synthetic_expert
    from prismatic.models import get_config

    cfg = get_config(cfg_name)
    base_ref = {"kind": "synthetic", "sha256": f"synthetic-{cfg_name}-benchmark"}
    out = []
    for i in range(m):
        d = root / f"expert{i}-{cfg_name}-s{seed}"
        if not (d / "manifest.json").exists():
            t0 = time.perf_counter()
            write_synthetic_expert(d, cfg, seed=seed * 100 + i, base_ref=base_ref)
            print(f"  wrote {d.name} in {time.perf_counter() - t0:.1f}s")
        out.append((f"task{i}", d))
    return out


def main(cfg: BenchConfig) -> list[dict]:
    from model_merging.algorithms import METHODS
    from model_merging.layout import model_layout
    from prismatic.models import get_config

    unknown = sorted(set(cfg.algorithms) - set(METHODS))
    if unknown:
        raise ValueError(f"--algorithms: unknown {unknown}; expected some of {sorted(METHODS)}")
    check_counts(cfg, positive=("num_experts", "estimate_modules", "wudi_steps"), non_negative=("torch_threads",))
    model_cfg = get_config(cfg.config_name)
    lay = model_layout(model_cfg)
    tmp = None
    root = cfg.work_dir
    if root is None:
        tmp = tempfile.mkdtemp(prefix="merge_speed-")
        root = Path(tmp)
    root.mkdir(parents=True, exist_ok=True)
    try:
        print(f"{cfg.num_experts} synthetic experts, config {cfg.config_name}: {len(lay.lora_modules)} LoRA-touched "
              f"weights ({sum(o * i for o, i in lay.lora_modules.values()) / 1e9:.2f}B entries), LoRA r="
              f"{model_cfg.lora.r}, {sum(math.prod(s) for s in lay.scratch.values()) / 1e6:.0f}M from-scratch params")
        experts = _make_experts(cfg.config_name, cfg.num_experts, cfg.seed, root)
        expert_gb = sum(f.stat().st_size for _, d in experts for f in d.iterdir()) / cfg.num_experts / 2**30
        theta0_gb = _theta0_params(model_cfg) * 4 / 2**30
        floor = _in_child(_floor_child, experts, cfg.torch_threads)
        rows = [{"algorithm": "floor (read + form τ)", "wall": floor["wall"], "rss": floor["rss"], "note": ""}]
        for alg in cfg.algorithms:
            if alg in cfg.estimate:
                r = _in_child(_estimate_child, experts, alg, cfg.estimate_modules, cfg.wudi_steps, cfg.seed,
                              cfg.torch_threads)
                wall = floor["wall"] + r["alg_s_per_elem"] * r["total_elems"]
                rows.append({"algorithm": alg, "wall": wall, "rss": r["rss"],
                             "note": f"est. from {r['subset']}/{r['modules']} weights"
                                     + (f", {cfg.wudi_steps} steps" if alg == "wudi" else "")})
            else:
                r = _in_child(_merge_child, experts, str(root / f"out-{alg}"), alg, cfg.masks, cfg.wudi_steps,
                              cfg.seed, cfg.torch_threads)
                rows.append({"algorithm": alg, "wall": r["wall"], "rss": r["rss"],
                             "note": f"artifact {r['bytes'] / 2**30:.2f} GiB"})
            print(f"  {alg}: {rows[-1]['wall']:.1f}s", flush=True)
        _print_table(rows, floor, theta0_gb, expert_gb)
        return rows
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _theta0_params(model_cfg) -> int:
    import torch

    from prismatic.models.modeling import PrismaticVLM

    with torch.device("meta"):
        vlm = PrismaticVLM(model_cfg)
    return sum(p.numel() for p in vlm.parameters())


def _print_table(rows, floor, theta0_gb, expert_gb) -> None:
    print()
    print(f"one model (θ0, fp32) = {theta0_gb:.3f} GiB; one expert checkpoint = {expert_gb:.3f} GiB; "
          f"process baseline after imports ≈ {floor['rss_base']:.2f} GiB")
    print(f"{'algorithm':<24}{'wall s':>9}{'× floor':>9}{'peak RSS GiB':>14}{'× model':>9}  note")
    for r in rows:
        print(f"{r['algorithm']:<24}{r['wall']:>9.1f}{r['wall'] / floor['wall']:>9.2f}{r['rss']:>14.2f}"
              f"{r['rss'] / theta0_gb:>9.2f}  {r['note']}")


if __name__ == "__main__":
    sys.exit(run_cli("merge_speed", BenchConfig, main, (ValueError,)))
