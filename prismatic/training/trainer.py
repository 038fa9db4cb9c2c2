"""Fine-tune one expert on one suite: `train(cfg) -> final checkpoint directory`.

Determinism: the data order is a seeded stream (see sampler.py) and every micro-step reseeds the global RNG
(action-expert input noise) and the augmentation generator from (seed, step, micro-step, rank). Together with
the optimizer state in each checkpoint, a run killed and resumed ends with the same weights as one that ran
through.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from prismatic.checkpoint import CHECKPOINT_KIND, MANIFEST_FILE, CheckpointError, load_checkpoint
from prismatic.models import MergeVLA, build_vla, get_config, save_pretrained
from prismatic.training import run_dir as rd
from prismatic.training.config import ConfigError, FinetuneConfig, TrainingDiverged
from prismatic.training.distributed import DistEnv, setup, teardown
from prismatic.training.metrics import MetricsLogger, check_wandb, sort_metrics, truncate_metrics
from prismatic.training.sampler import ResumableBatchSampler
from prismatic.training.schedule import lr_at
from prismatic.vla.augmentation import augment_images
from prismatic.vla.datasets import VLADataset, load_suite
from prismatic.vla.images import resize_frames
from prismatic.vla.normalization import normalize

log = logging.getLogger(__name__)
StepCallback = Callable[[int, dict], None]


def micro_seed(seed: int, step: int, micro: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, step, micro, rank]).generate_state(1, np.uint64)[0] >> 1)


def load_dataset(cfg: FinetuneConfig, chunk_len: int) -> VLADataset:
    return load_suite(cfg.data_root, cfg.suite, cfg.dataset_format, chunk_len=chunk_len,
                      filter_noops=cfg.filter_noops, preload_images_gb=cfg.preload_images_gb,
                      cache_stats=cfg.cache_stats)


def make_batch(model: MergeVLA, raw: dict, stats: dict, device: torch.device, cfg: FinetuneConfig,
               generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Raw dataset batch → normalised model inputs on `device`, augmented when enabled."""
    images = torch.as_tensor(raw["images"]).to(device, non_blocking=True)
    batch = model.processor(raw["instructions"], images, normalize(raw["proprio"], stats["proprio"]),
                            normalize(raw["actions"], stats["action"]))
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    if cfg.image_aug:
        batch["pixel_values"] = augment_images(batch["pixel_values"], cfg.aug, generator)
    return batch


def set_attention(model: MergeVLA, choice: str, device: torch.device) -> str:
    """Use flash-attention in the LLM when asked, or on "auto" when it is installed and a GPU is used."""
    if choice == "auto":
        flash = device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None
        choice = "flash_attention_2" if flash else "sdpa"
    if choice == "flash_attention_2" and device.type != "cuda":
        raise ConfigError("attn_implementation flash_attention_2 needs a CUDA device")
    try:
        model.vlm.llm.set_attn_implementation(choice)
    except (ImportError, ValueError) as e:
        raise ConfigError(f"attn_implementation {choice!r} is not available: {e}") from e
    return choice


def fetch(ds: VLADataset, idx, image_size: int | None) -> dict:
    """A raw batch with its frames Lanczos-resized to `image_size`, as evaluation frames are (RLDS data: 256 px)."""
    raw = ds.get_batch(idx)
    raw["images"] = resize_frames(raw["images"], image_size)
    return raw


def batches(ds: VLADataset, sampler: ResumableBatchSampler, num_workers: int, image_size: int | None = None):
    """Endless raw batches in sampler order, fetched (and resized) in worker processes when num_workers > 0."""
    if num_workers == 0:
        for idx in sampler:
            yield fetch(ds, idx, image_size)
        return
    loader = torch.utils.data.DataLoader(_BatchFetcher(ds, image_size), sampler=sampler, batch_size=None,
                                         num_workers=num_workers, collate_fn=_identity, persistent_workers=True,
                                         generator=torch.Generator().manual_seed(0))  # keep off the global RNG
    it = iter(loader)
    try:
        yield from it
    finally:  # closing the generator drops the last reference: the workers shut down now, not at exit
        del it


class _BatchFetcher(torch.utils.data.Dataset):
    def __init__(self, ds: VLADataset, image_size: int | None):
        self.ds, self.image_size = ds, image_size

    def __getitem__(self, idx):
        return fetch(self.ds, idx, self.image_size)


def _identity(x):
    return x


def restore(model: MergeVLA, ckpt: Path, device: torch.device) -> dict:
    """Load a checkpoint's trainable weights into `model`; return its train state."""
    tensors, manifest = load_checkpoint(ckpt, CHECKPOINT_KIND)
    if manifest.get("base", {}).get("sha256") != model.base_ref["sha256"]:
        raise rd.RunDirError(f"{ckpt} was trained on another base model (sha256 {manifest['base']['sha256'][:12]}…, "
                             f"this run's: {model.base_ref['sha256'][:12]}…); choose another --out_dir")
    expected = set(model.trainable_state_dict())
    if set(tensors) != expected:
        raise CheckpointError(f"{ckpt}/model.safetensors does not hold this model's trainable tensors")
    model.load_state_dict(tensors, strict=False)
    return rd.load_train_state(ckpt, device)


def checksum(model: MergeVLA) -> float:
    return float(sum(v.double().sum().item() for v in model.trainable_state_dict().values()))


def train(cfg: FinetuneConfig, on_step: Optional[StepCallback] = None) -> Path:
    """Fine-tune per `cfg`; returns the final checkpoint directory. Run under `torchrun` for several processes.

    Every input is checked (config, out_dir, dataset, wandb) before anything is written or trained.
    `on_step(step, record)` is called after each optimizer step (and after that step's checkpoint).
    """
    cfg.validate()
    check_wandb(cfg)
    env = setup(cfg.device)
    threads = torch.get_num_threads()
    if env.device.type == "cpu" and cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    try:
        return _train(cfg, env, on_step)
    finally:
        torch.set_num_threads(threads)
        teardown(env)


def _train(cfg: FinetuneConfig, env: DistEnv, on_step: Optional[StepCallback]) -> Path:
    run = cfg.run_dir()
    recorded = rd.check_run_dir(cfg)
    env.barrier()  # every rank has seen the directory before rank 0 writes run.json into it
    model_cfg = get_config(cfg.config_name, expert_arch=cfg.expert_arch)
    ds = load_dataset(cfg, model_cfg.chunk_len)
    rd.check_data_fingerprint(recorded, ds.fingerprint, run)

    model = build_vla(model_cfg, cfg.base_model(), seed=cfg.seed)
    model.norm_stats = ds.norm_stats
    attn = set_attention(model, cfg.attn_implementation, env.device)  # may refuse: before run.json is written
    step, samples_seen, opt_state = 0, 0, None
    ckpts = rd.resumable_checkpoints(run, cfg.max_steps) if cfg.resume else []
    if ckpts:
        step, ckpt = ckpts[-1]
        state = restore(model, ckpt, torch.device("cpu"))
        samples_seen, opt_state = state["samples_seen"], state["optimizer"]
        if env.is_main:
            log.info("resuming %s from step %d", run, step)
            if state.get("world_size", env.world_size) != env.world_size:
                log.warning("%s was trained on %d process(es) and resumes on %d: the global batch changes, so "
                            "the weights will differ from an uninterrupted run", run, state["world_size"],
                            env.world_size)
    if step >= cfg.max_steps:
        log.info("%s is already at step %d >= max_steps %d; nothing to train", run, step, cfg.max_steps)
        return ckpts[-1][1]
    # names the wandb run across resumes; derived, not random, so two identical runs write identical files
    run_id = (recorded or {}).get("run_id") or hashlib.sha256(f"{run.resolve()}|{cfg.seed}".encode()).hexdigest()[:16]
    if env.is_main:
        rd.write_run_file(cfg, run_id, ds.fingerprint, ds.info)
        # a longer run's checkpoints past max_steps (constant lr) stay, and so do the lines that led to them
        last_ckpt = max((s for s, _ in rd.complete_checkpoints(run)), default=0)
        truncate_metrics(run / rd.METRICS_FILE, step, range(cfg.max_steps + 1, last_ckpt + 1))
    env.barrier()

    model.to(env.device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    # foreach: one fused kernel launch per step instead of one per tensor (CPU's default is the slow loop)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    if opt_state is not None:
        optimizer.load_state_dict(opt_state)
    ddp = DDP(model, device_ids=[env.local_rank] if env.device.type == "cuda" else None) if env.distributed else None
    net = ddp or model
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if env.device.type == "cuda" \
        else contextlib.nullcontext

    sampler = ResumableBatchSampler(len(ds), cfg.batch_size, cfg.seed, env.rank, env.world_size, samples_seen)
    stream = batches(ds, sampler, cfg.num_workers, model_cfg.image_size)
    per_step = cfg.batch_size * env.world_size * cfg.grad_accumulation_steps
    logger = MetricsLogger(cfg, run_id, enabled=env.is_main)
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not (env.is_main and cfg.progress_bar),
               desc=f"{cfg.suite} [{cfg.config_name}]", unit="step", dynamic_ncols=True)
    if env.is_main:
        log.info("training %s on %s: %d steps, %d samples/step, device %s × %d, attention %s", cfg.config_name,
                 cfg.suite, cfg.max_steps, per_step, env.device, env.world_size, attn)
    t_last, steps_since = time.perf_counter(), 0
    try:
        while step < cfg.max_steps:
            lr = lr_at(step, cfg.lr, cfg.max_steps, cfg.lr_schedule, cfg.warmup_steps, cfg.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = 0.0
            for micro in range(cfg.grad_accumulation_steps):
                raw = next(stream)
                s = micro_seed(cfg.seed, step, micro, env.rank)
                torch.manual_seed(s)
                gen = torch.Generator().manual_seed(s ^ 0x5EED)
                batch = make_batch(model, raw, ds.norm_stats, env.device, cfg, gen)
                last = micro == cfg.grad_accumulation_steps - 1
                sync = contextlib.nullcontext() if ddp is None or last else ddp.no_sync()
                with sync:
                    with autocast():
                        loss = net(**batch, action_loss=cfg.action_loss).loss
                    (loss / cfg.grad_accumulation_steps).backward()
                loss_sum += loss.item()
            if not math.isfinite(env.mean(loss_sum)):  # every process stops, before the weights turn NaN
                raise TrainingDiverged(
                    f"the training loss became {loss_sum / cfg.grad_accumulation_steps} at step {step + 1} (lr "
                    f"{lr:.3g}): lower --lr (or set --max_grad_norm); no checkpoint was written at this step")
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            samples_seen += per_step
            steps_since += 1
            record = {"step": step, "loss": loss_sum / cfg.grad_accumulation_steps, "lr": lr}
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}")
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                now = time.perf_counter()
                record["loss"] = env.mean(record["loss"])
                record.update(steps_per_s=steps_since / (now - t_last), epoch=samples_seen / len(ds),
                              samples_per_s=steps_since * per_step / (now - t_last), time=time.time())
                t_last, steps_since = now, 0
                logger.log(record)
                if env.is_main and not cfg.progress_bar:  # batch jobs' logs: what the bar would show
                    log.info("step %d/%d: loss %.4f, lr %.2e, %.2f steps/s", step, cfg.max_steps, record["loss"], lr,
                             record["steps_per_s"])
            if step % cfg.save_every == 0 or step == cfg.max_steps:
                save(cfg, env, model, optimizer, ds, step, samples_seen)
            if on_step is not None:
                on_step(step, record)
    except KeyboardInterrupt:  # say what a rerun continues from: up to save_every steps are trained again
        if env.is_main:
            done = rd.resumable_checkpoints(run, cfg.max_steps)
            log.warning("interrupted after step %d; %s", step,
                        f"rerun with --resume true to continue from step {done[-1][0]} ({done[-1][1]})" if done
                        else "no checkpoint was saved yet, so a rerun starts from step 0")
        raise
    finally:
        stream.close()
        bar.close()
        logger.close()
    if env.is_main:
        sort_metrics(run / rd.METRICS_FILE)
    if not env.all_equal(checksum(model)):
        raise RuntimeError("processes ended with different weights: distributed training went out of sync")
    return rd.step_dir(run, cfg.max_steps)


def save(cfg: FinetuneConfig, env: DistEnv, model: MergeVLA, optimizer, ds: VLADataset, step: int,
         samples_seen: int) -> None:
    if env.is_main:
        d = rd.step_dir(cfg.run_dir(), step)
        # an older checkpoint at this step stops counting as finished before any of its files is replaced
        (d / MANIFEST_FILE).unlink(missing_ok=True)
        rd.save_train_state(d, step, samples_seen, optimizer, env.world_size)
        save_pretrained(model, d, overwrite=True, step=step, data_fingerprint=ds.fingerprint, dataset=ds.info,
                        train_config=cfg.to_dict())
        rd.prune_train_states(cfg.run_dir(), cfg.keep_train_states, step)
    env.barrier()
