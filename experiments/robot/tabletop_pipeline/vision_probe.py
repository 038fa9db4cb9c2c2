"""Can the VLM learn to pick a small object out of an image? A two-minute probe of the tiny VLM.

    python -m experiments.robot.tabletop_pipeline.vision_probe --square_size 6 --steps 300

Every image is a uniform grey background with one square of one of the ten TableTop object colours at a random
place (the same image for both cameras); the question is always "what color is the object ?" and the answer
the colour's word. The whole VLM is trained on it with the pretraining's next-token loss on the answer
(`vlm_pretrain.answer_logits`), from a seeded random initialisation or from a base directory, and answer
accuracy on a fixed set of held-out images is printed as it goes (chance: 1 in 10).

This is the smallest vision-language skill the TableTop-4 experts rely on (the object suite names the object to
pick by its colour; an object is 4-6 pixels wide at 64 × 64) with nothing else in the way: no binding of several
objects, no language to parse. A square covering the whole image (`--square_size 64`) is learned in a few dozen
steps; what a change to the VLM's configuration, initialisation or pretraining does to the small square is what
this probe is for (docs/TABLETOP4_FINDINGS.md).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from experiments.robot.tabletop.bodies import OBJECT_COLORS, PALETTE
from prismatic.cli import check_finite, run_cli

QUESTION = "what color is the object ?"


class VisionProbeError(ValueError):
    """A probe setting is invalid."""


@dataclass
class VisionProbeConfig:
    config_name: str = "tiny"  # model config whose VLM is probed (it must use the tiny tokenizer)
    base_dir: Optional[Path] = None  # start from this base's weights (None: init_vlm's seeded random init)
    init: str = "hf"  # initialisation scheme when base_dir is None (vlm_pretrain.INIT_SCHEMES)
    square_size: int = 6  # side of the coloured square, in pixels of the model's image size
    background: int = 200  # grey level of the background
    steps: int = 300  # optimizer steps
    batch_size: int = 16  # images per step
    lr: float = 1e-3  # constant, AdamW (as in pretraining)
    weight_decay: float = 0.01  # AdamW's decoupled weight decay
    max_grad_norm: float = 1.0  # gradient-norm clip (as in pretraining)
    eval_every: int = 50  # steps between held-out accuracy measurements (and at the end)
    eval_images: int = 200  # held-out images (their own seed stream)
    seed: int = 0  # the init (without base_dir), training images and held-out images
    cpu_threads: int = 1  # torch threads (≥ 1)

    def validate(self, image_size: int) -> None:
        from experiments.robot.tabletop_pipeline.vlm_pretrain import INIT_SCHEMES

        if not 1 <= self.square_size <= image_size:
            raise VisionProbeError(f"square_size is {self.square_size}, expected 1..{image_size} (the image size)")
        if not 0 <= self.background <= 255:
            raise VisionProbeError(f"background is {self.background}, expected a grey level in 0..255")
        for name in ("steps", "batch_size", "eval_every", "eval_images", "cpu_threads"):
            if getattr(self, name) < 1:
                raise VisionProbeError(f"{name} is {getattr(self, name)}, expected a positive integer")
        check_finite(self, ("lr", "weight_decay", "max_grad_norm"), VisionProbeError)
        if self.seed < 0:
            raise VisionProbeError(f"seed is {self.seed}, expected >= 0")
        if self.lr <= 0 or self.weight_decay < 0 or self.max_grad_norm <= 0:
            raise VisionProbeError(f"need lr > 0, weight_decay >= 0 and max_grad_norm > 0, got {self.lr}, "
                                   f"{self.weight_decay} and {self.max_grad_norm}")
        if self.init not in INIT_SCHEMES:
            raise VisionProbeError(f"init is {self.init!r}, expected one of {list(INIT_SCHEMES)}")


def square_images(rng: np.random.Generator, n: int, size: int, image_size: int, background: int,
                  cameras: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(n, cameras, S, S, 3) uint8 images with one square each, and the index of its colour in OBJECT_COLORS."""
    colour = rng.integers(0, len(OBJECT_COLORS), n)
    corner = rng.integers(0, image_size - size + 1, (n, 2))
    images = np.full((n, cameras, image_size, image_size, 3), background, np.uint8)
    for i in range(n):
        y, x = corner[i]
        images[i, :, y: y + size, x: x + size] = PALETTE[OBJECT_COLORS[colour[i]]]
    return images, colour


def square_batch(builder, processor, images: np.ndarray, colour: np.ndarray):
    """(input_ids, pixel_values, target mask) of the probe's question and answer for `square_images` output."""
    from experiments.robot.tabletop_pipeline.vlm_pretrain import collate

    convs = [builder.build([(QUESTION, OBJECT_COLORS[int(c)])]) for c in colour]
    ids, _, mask = collate(convs, processor.pad_id)
    return ids, processor.images(images), mask


@torch.no_grad()
def square_accuracy(vlm, builder, processor, images: np.ndarray, colour: np.ndarray, chunk: int = 50) -> float:
    """Share of the images whose colour word the VLM predicts (in eval mode; its mode is restored)."""
    from experiments.robot.tabletop_pipeline.vlm_pretrain import answer_logits

    was, hits = vlm.training, 0
    vlm.eval()
    try:
        for i in range(0, len(colour), chunk):
            logits, labels = answer_logits(vlm, *square_batch(builder, processor, images[i: i + chunk],
                                                               colour[i: i + chunk]))
            # every answer is one colour word and <|im_end|>: the word is each sequence's first target
            hits += int((logits.argmax(-1) == labels).view(-1, 2)[:, 0].sum())
    finally:
        vlm.train(was)
    return hits / len(colour)


def main(cfg: VisionProbeConfig, log=print) -> dict:
    from experiments.robot.tabletop_pipeline import vlm_pretrain as vp
    from prismatic.models.configuration import CONFIGS, get_config
    from prismatic.models.loading import BaseModelError, load_base_dir, load_vlm_weights
    from prismatic.models.processing import VLAProcessor, build_tiny_tokenizer

    if cfg.config_name not in CONFIGS:
        raise VisionProbeError(f"config_name is {cfg.config_name!r}, expected one of {sorted(CONFIGS)}")
    model_cfg = get_config(cfg.config_name)
    if model_cfg.tokenizer != "tiny":
        raise VisionProbeError(f"config {cfg.config_name!r} uses the {model_cfg.tokenizer!r} tokenizer; the probe "
                               "is for configs with the tiny word-level tokenizer")
    cfg.validate(model_cfg.image_size)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.cpu_threads)
    try:
        vlm = vp.init_vlm(model_cfg, cfg.seed, cfg.init)
        if cfg.base_dir is not None:
            try:
                state, _ = load_base_dir(cfg.base_dir, model_cfg)
                load_vlm_weights(vlm, state, str(cfg.base_dir), cfg.config_name)
            except BaseModelError as e:
                raise VisionProbeError(str(e)) from e
        vlm.train().llm.set_attn_implementation("sdpa")
        tokenizer = build_tiny_tokenizer()
        processor = VLAProcessor(tokenizer, model_cfg.image_size, model_cfg.llm.vocab_size)
        builder = vp.ConversationBuilder(tokenizer)
        opt = torch.optim.AdamW(vlm.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0x5A]))
        held_imgs, held_colour = square_images(np.random.default_rng(np.random.SeedSequence([cfg.seed, 0xE7])),
                                               cfg.eval_images, cfg.square_size, model_cfg.image_size,
                                               cfg.background, model_cfg.num_images)

        def accuracy() -> float:
            return square_accuracy(vlm, builder, processor, held_imgs, held_colour)

        history, t0 = [{"step": 0, "accuracy": accuracy()}], time.perf_counter()
        log(f"[vision-probe] {cfg.square_size}-px square, step 0: accuracy {history[0]['accuracy']:.3f} (chance 0.1)")
        for step in range(1, cfg.steps + 1):
            images, colour = square_images(rng, cfg.batch_size, cfg.square_size, model_cfg.image_size,
                                           cfg.background, model_cfg.num_images)
            loss = vp.answer_step(vlm, opt, list(vlm.parameters()), *square_batch(builder, processor, images, colour),
                                  max_grad_norm=cfg.max_grad_norm)
            if step % cfg.eval_every == 0 or step == cfg.steps:
                history.append({"step": step, "loss": round(loss.item(), 4), "accuracy": accuracy()})
                log(f"[vision-probe] step {step}: loss {loss.item():.3f}, held-out accuracy "
                    f"{history[-1]['accuracy']:.3f} ({time.perf_counter() - t0:.0f}s)")
    finally:
        torch.set_num_threads(threads)
    return {"square_size": cfg.square_size, "final_accuracy": history[-1]["accuracy"], "history": history}


def cli() -> int:
    from prismatic.models.loading import BaseModelError

    return run_cli("vision_probe", VisionProbeConfig, main, (VisionProbeError, BaseModelError))


if __name__ == "__main__":
    sys.exit(cli())
