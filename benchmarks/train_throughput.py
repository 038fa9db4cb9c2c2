"""Training throughput: samples/s and peak memory of one forward+backward pass per step.

    python benchmarks/train_throughput.py                          # tiny and real size, on the GPU if any
    python benchmarks/train_throughput.py --configs '[tiny]' --cpu_threads 1

Random base weights and random inputs of the right shapes (no data, no pretrained files). Each config runs in
a fresh process so its peak memory is its own: on CUDA `max_memory_allocated`, on CPU the process's peak
resident set (which includes the Python runtime and libraries). bf16 autocast on CUDA, fp32 on CPU, as in
training. A real-size step on a 2-core CPU takes minutes and ~15 GB.
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import sys
import time
import traceback
from dataclasses import dataclass, field

import numpy as np
import torch

from prismatic.cli import check_counts, run_cli
from prismatic.models import BaseModelConfig, MergeVLA, build_vla, get_config
from prismatic.models.loading import resolve_base
from prismatic.models.lora import apply_lora, init_trainable
from prismatic.models.pretrained import count_parameters
from prismatic.models.processing import VLAProcessor, build_tiny_tokenizer
from prismatic.vla.augmentation import ImageAugConfig, augment_images

INSTRUCTIONS = ["pick up the black bowl and place it on the plate", "put the red cube in the basket"]


@dataclass
class ThroughputConfig:
    configs: list[str] = field(default_factory=lambda: ["tiny", "qwen25-dinosiglip-224px"])  # model configs timed
    batch_size: int = 8  # samples per step
    warmup_steps: int = 1  # untimed (first-call allocations, kernel selection)
    steps: int = 3  # timed
    device: str = "auto"  # auto | cpu | cuda
    cpu_threads: int = 0  # 0: torch's default
    image_aug: bool = True  # include the augmentation, as in training
    seed: int = 0  # the random model's weights and the synthetic batch


def build_random(name: str, seed: int) -> MergeVLA:
    """`build_vla` on a random base. The real config's Qwen tokenizer ships only with pretrained files; here the
    tiny word-level tokenizer stands in (prompt lengths within a few tokens of Qwen's; nothing else changes)."""
    try:
        return build_vla(get_config(name), BaseModelConfig(random_seed=seed), seed=seed)
    except FileNotFoundError:
        cfg = get_config(name)
        sd, ref, _ = resolve_base(cfg, BaseModelConfig(random_seed=seed))
        model = MergeVLA(cfg)
        model.vlm.load_state_dict(sd)
        del sd
        apply_lora(model, cfg.lora)
        init_trainable(model, seed)
        model.base_ref, model.norm_stats, model.init_seed = ref, None, seed
        model.processor = VLAProcessor(build_tiny_tokenizer(), cfg.image_size, cfg.llm.vocab_size)
        return model


def _measure(name: str, cfg: ThroughputConfig) -> dict:
    torch.manual_seed(cfg.seed)
    if cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    cuda = torch.cuda.is_available() if cfg.device == "auto" else cfg.device == "cuda"
    dev = torch.device("cuda" if cuda else "cpu")
    t0 = time.perf_counter()
    model = build_random(name, cfg.seed).to(dev).train()
    build_s = time.perf_counter() - t0
    mc = model.config
    rng = np.random.default_rng(cfg.seed)
    b = cfg.batch_size
    raw = model.processor([INSTRUCTIONS[i % 2] for i in range(b)],
                          rng.integers(0, 256, (b, mc.num_images, mc.image_size, mc.image_size, 3), dtype=np.uint8),
                          rng.uniform(-1, 1, (b, mc.proprio_dim)), rng.uniform(-1, 1, (b, mc.chunk_len, mc.action_dim)))
    gen = torch.Generator().manual_seed(cfg.seed)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(cfg.warmup_steps + cfg.steps):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        batch = {k: v.to(dev) for k, v in raw.items()}
        if cfg.image_aug:
            batch["pixel_values"] = augment_images(batch["pixel_values"], ImageAugConfig(), gen)
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if i >= cfg.warmup_steps:
            times.append(time.perf_counter() - t)
    step = float(np.median(times))
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"config": name, "device": torch.cuda.get_device_name() if cuda else f"cpu × {torch.get_num_threads()} threads",
            "params_total": count_parameters(model), "params_trainable": count_parameters(model, trainable_only=True),
            "build_s": build_s, "step_s": step, "samples_per_s": b / step, "peak_gib": peak / 2**30,
            "peak_kind": "cuda max_memory_allocated" if cuda else "process peak RSS"}


def _child(name: str, cfg: ThroughputConfig, q) -> None:
    try:
        q.put(_measure(name, cfg))
    except Exception:  # report any failure (e.g. out of memory) and let the next config run
        q.put({"config": name, "error": traceback.format_exc(limit=3)})


def main(cfg: ThroughputConfig) -> None:
    check_counts(cfg, positive=("batch_size", "steps"), non_negative=("warmup_steps", "cpu_threads"))
    if cfg.device not in ("auto", "cpu", "cuda"):  # anything else would silently time the CPU
        raise ValueError(f"--device is {cfg.device!r}, expected auto, cpu or cuda")
    for name in cfg.configs:  # before any child runs: get_config names the known ones
        get_config(name)
    ctx = mp.get_context("spawn")
    print(f"forward+backward, batch {cfg.batch_size}, random weights, median of {cfg.steps} timed steps")
    for name in cfg.configs:
        q = ctx.Queue()
        p = ctx.Process(target=_child, args=(name, cfg, q))
        p.start()
        p.join()
        r = q.get() if not q.empty() else {"config": name, "error": f"process died with exit code {p.exitcode} "
                                                                     "(killed: out of memory?)"}
        if "error" in r:
            print(f"{name}: FAILED\n{r['error']}")
            continue
        print(f"{r['config']:<26} {r['device']}: {r['samples_per_s']:8.2f} samples/s ({r['step_s']:.3f} s/step), "
              f"peak {r['peak_gib']:.2f} GiB ({r['peak_kind']}), build {r['build_s']:.1f} s, "
              f"{r['params_trainable'] / 1e6:.1f}M trainable of {r['params_total'] / 1e6:.1f}M parameters")


if __name__ == "__main__":
    sys.exit(run_cli("train_throughput", ThroughputConfig, main, (ValueError,)))
