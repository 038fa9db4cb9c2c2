"""Prompt, tokenizer and batch collation.

The real config uses the Qwen2.5 tokenizer from the local model directory. The tiny config uses a small
word-level tokenizer built with the `tokenizers` library from `tiny_vocab.txt` (the Qwen tokenizer cannot
be downloaded here); a base model directory ships its own `tokenizer.json`, which wins when present.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS = ("<|endoftext|>", UNK_TOKEN, "<|im_start|>", "<|im_end|>")
PAD_TOKEN = "<|endoftext|>"  # Qwen2.5's pad token
TINY_VOCAB_FILE = Path(__file__).with_name("tiny_vocab.txt")


def format_instruction(instruction: str) -> str:
    return instruction.strip().rstrip(".").lower()


def build_prompt(instruction: str) -> str:
    """Qwen chat template with MergeVLA's question; the assistant turn is left open for the queries."""
    return (
        f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"
        f"<|im_start|>user\nWhat action should the robot take to {format_instruction(instruction)}?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def build_tiny_tokenizer(vocab_file: Path = TINY_VOCAB_FILE) -> Tokenizer:
    words = [w.strip() for w in vocab_file.read_text().splitlines() if w.strip() and not w.startswith("#")]
    vocab: dict[str, int] = {}
    for w in (*SPECIAL_TOKENS, *words):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def load_tokenizer(kind: str, path: Path | None = None, error: type[Exception] = ValueError) -> Tokenizer:
    """`path`: a directory or file holding tokenizer.json (Qwen's or a base model's own).

    A file the tokenizers library cannot read raises `error` naming it.
    """
    if path is not None:
        p = Path(path)
        f = p / "tokenizer.json" if p.is_dir() else p
        if f.is_file():
            try:
                return Tokenizer.from_file(str(f))
            except Exception as e:  # tokenizers raises a bare Exception
                raise error(f"{f} is not a tokenizer file the tokenizers library can read ({e})") from e
        if kind != "tiny":
            raise FileNotFoundError(
                f"no tokenizer.json at {f}: put the Qwen2.5-0.5B Hugging Face directory there "
                "(see pretrained_models/README.md)"
            )
    if kind == "tiny":
        return build_tiny_tokenizer()
    raise FileNotFoundError("the qwen tokenizer needs a local directory with tokenizer.json: set the base's llm_path "
                            "(finetune.py: --base.llm_path) or base_dir")


class VLAProcessor:
    """Turns (instructions, images, proprio[, actions]) into model inputs."""

    def __init__(self, tokenizer: Tokenizer, image_size: int, vocab_size: int):
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.pad_id = tokenizer.token_to_id(PAD_TOKEN)
        if self.pad_id is None:
            raise ValueError(f"tokenizer has no pad token {PAD_TOKEN!r}")
        if tokenizer.get_vocab_size() > vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.get_vocab_size()} tokens but the LLM only {vocab_size}")
        self._cache: dict[str, list[int]] = {}

    def encode(self, instruction: str) -> list[int]:
        if instruction not in self._cache:
            prompt = build_prompt(instruction)
            enc = self.tokenizer.encode(prompt)
            lost = sorted({prompt[a:b] for t, (a, b) in zip(enc.tokens, enc.offsets) if t == UNK_TOKEN})
            if lost:  # the tiny word-level vocabulary: instructions that differ only in these words look the same
                warnings.warn(f"instruction {instruction!r}: {lost} are not in the tokenizer's vocabulary and all "
                              f"read as {UNK_TOKEN}", stacklevel=2)
            self._cache[instruction] = enc.ids
        return self._cache[instruction]

    def tokenize(self, instructions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = [self.encode(s) for s in instructions]
        n = max(len(i) for i in ids)
        out = torch.full((len(ids), n), self.pad_id, dtype=torch.long)
        for row, i in enumerate(ids):
            out[row, : len(i)] = torch.tensor(i)
        return out, torch.tensor([len(i) for i in ids])

    def images(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(B, N, H, W, 3) uint8 → (B, N, 3, S, S) float in [0, 1], resized to the model's image size."""
        x = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images)
        if x.ndim != 5 or x.shape[-1] != 3:
            raise ValueError(f"images must be (batch, cameras, H, W, 3), got {tuple(x.shape)}")
        b, n, h, w, _ = x.shape
        x = x.permute(0, 1, 4, 2, 3).reshape(b * n, 3, h, w)
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        if (h, w) != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                              align_corners=False).clamp(0, 1)
        return x.reshape(b, n, 3, self.image_size, self.image_size)

    def __call__(self, instructions, images, proprio, actions=None) -> dict[str, torch.Tensor]:
        input_ids, text_lens = self.tokenize(instructions)
        batch = {
            "input_ids": input_ids,
            "text_lens": text_lens,
            "pixel_values": self.images(images),
            "proprio": torch.as_tensor(np.asarray(proprio), dtype=torch.float32),
        }
        if actions is not None:
            batch["actions"] = torch.as_tensor(np.asarray(actions), dtype=torch.float32)
        return batch
