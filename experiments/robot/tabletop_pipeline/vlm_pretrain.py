"""Vision-language pretraining of the tiny VLM on the TableTop-4 pretraining pool.

The experts of one experiment share a pretrained base θ0, as they share Prismatic's VLM in the real setting.
For the tiny config that base is made here: every part of the VLM (both vision towers, the projector and the
Qwen2 LM) is trained in full, from a seeded random initialisation, with a next-token loss on the answers of
captions and questions about the rendered scenes of `experiments.robot.tabletop.pretrain`.

One training sequence is one scene: its two camera images and several of its (question, answer) texts packed
as a multi-turn Qwen chat, in the layout MergeVLA later fine-tunes (vision tokens right after the first
token, the same system prompt):

    <|im_start|> [vision tokens] system … <|im_end|>
    <|im_start|> user {question} <|im_end|> <|im_start|> assistant {answer} <|im_end|>   (× turns)

Only answer tokens and their closing <|im_end|> are predicted (the LM head is tied to the input embeddings,
as in Qwen2.5). A held-out share of the scenes measures teacher-forced token accuracy and exact answers.
The result is a mergevla base directory (`prismatic.models.loading.save_base_dir`) whose `base.json` records
how it was made.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from prismatic.cli import check_finite
from prismatic.io import atomic_dir
from prismatic.models.configuration import CONFIGS, VLAConfig, get_config
from prismatic.models.loading import BaseModelError, load_base_dir, load_vlm_weights, save_base_dir
from prismatic.models.modeling import PrismaticVLM
from prismatic.models.processing import SYSTEM_PROMPT, VLAProcessor, build_tiny_tokenizer
from prismatic.training.schedule import lr_at
from prismatic.vla.augmentation import ImageAugConfig, augment_images

log = logging.getLogger(__name__)

PRETRAIN_FORMAT = "tabletop4-vlm-pretraining"


class PretrainError(ValueError):
    """A pretraining input or setting is invalid."""


@dataclass
class PretrainConfig:
    out_dir: Path = Path("pretrained_models/tabletop4-tiny-base")  # the base directory written
    pool: Path = Path("data/tabletop4_pretrain/tabletop4_pretrain.hdf5")  # generated here when missing
    pool_scenes: int = 6000  # scenes rendered when the pool is generated
    pool_seed: int = 0  # seed of the pool's scenes (its own seed stream, disjoint from every suite's)
    texts_per_scene: int = 8  # captions / questions written per scene when the pool is generated
    config_name: str = "tiny"  # model config whose VLM is pretrained
    seed: int = 0  # initialisation, data order and augmentation
    # "fan_in": weights scaled for the tiny widths (see init_vlm); "hf": transformers' defaults, made for wide
    # models, which the tiny VLM learns from more slowly (docs/TABLETOP4_FINDINGS.md)
    init: str = "hf"
    llm_init_std: float = 0.08  # std of the LLM's weights with init "fan_in"
    # False: the token embeddings (and the tied LM head) keep their initial values. Trained, the embeddings of
    # words the LM cannot tell apart without reading the image ("left"/"right", "red"/"blue") converge, and
    # fine-tuning (LoRA on linear layers) does not train them (docs/TABLETOP4_FINDINGS.md)
    train_embeddings: bool = True
    # Before the pool: `square_steps` steps per entry of "what color is the object ?" on grey images with one
    # square of that side (pixels), largest first (vision_probe). Trained on the pool alone, the LM's attention
    # starts as a mean over the vision tokens and stays one, so small objects go unread; squares shrinking from
    # 48 to 6 px teach it to pick one token out (docs/TABLETOP4_FINDINGS.md). Empty: no warm-up.
    square_curriculum: list[int] = field(default_factory=list)
    square_steps: int = 75  # optimizer steps per entry of square_curriculum
    steps: int = 2500  # optimizer steps
    batch_size: int = 16  # scenes (sequences) per step
    turns_per_sequence: int = 8  # texts of one scene packed into its conversation (at most those it has)
    lr: float = 1e-3  # AdamW peak learning rate
    weight_decay: float = 0.01  # AdamW's decoupled weight decay
    warmup_steps: int = 100  # optimizer steps over which the lr rises linearly to lr
    min_lr_ratio: float = 0.1  # cosine decay ends at lr × this
    max_grad_norm: float = 1.0  # 0: no clipping
    image_aug: bool = True  # the fine-tuning augmentation, so features hold up under it
    aug: ImageAugConfig = field(default_factory=ImageAugConfig)
    heldout_fraction: float = 0.05  # scenes kept out of training to measure answer accuracy
    eval_every: int = 500  # steps between held-out evaluations (and at the end)
    log_every: int = 50  # optimizer steps between log lines
    cpu_threads: int = 1  # torch threads (0: torch's default); the tiny model runs best on 1
    overwrite: bool = False  # replace an existing base directory at out_dir
    evaluate_only: bool = False  # measure the base already at out_dir on the pool's held-out scenes; train nothing

    def validate(self) -> None:
        if self.config_name not in CONFIGS:
            raise PretrainError(f"config_name is {self.config_name!r}, expected one of {sorted(CONFIGS)}")
        for name in ("pool_scenes", "texts_per_scene", "steps", "batch_size", "turns_per_sequence", "eval_every",
                     "log_every"):
            if getattr(self, name) < 1:
                raise PretrainError(f"{name} is {getattr(self, name)}, expected a positive integer")
        size = get_config(self.config_name).image_size
        if any(not 1 <= q <= size for q in self.square_curriculum):
            raise PretrainError(f"square_curriculum is {self.square_curriculum}, expected square sides in 1..{size}")
        for name in ("warmup_steps", "cpu_threads", "pool_seed", "seed", "square_steps"):
            if getattr(self, name) < 0:
                raise PretrainError(f"{name} is {getattr(self, name)}, expected >= 0")
        if self.init not in INIT_SCHEMES:
            raise PretrainError(f"init is {self.init!r}, expected one of {list(INIT_SCHEMES)}")
        check_finite(self, ("lr", "weight_decay", "max_grad_norm", "min_lr_ratio", "llm_init_std"), PretrainError)
        if self.llm_init_std <= 0:
            raise PretrainError(f"llm_init_std is {self.llm_init_std}, expected > 0")
        if self.warmup_steps >= self.steps:
            raise PretrainError(f"warmup_steps ({self.warmup_steps}) must be below steps ({self.steps})")
        if self.lr <= 0 or self.weight_decay < 0 or self.max_grad_norm < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise PretrainError("need lr > 0, weight_decay >= 0, max_grad_norm >= 0 and min_lr_ratio in [0, 1]")
        if not 0 < self.heldout_fraction < 1:
            raise PretrainError(f"heldout_fraction is {self.heldout_fraction}, expected a value in (0, 1)")
        try:
            self.aug.validate()
        except ValueError as e:
            raise PretrainError(str(e)) from e

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


# ------------------------------------------------------------------------------------------------ pool


def ensure_pool(cfg: PretrainConfig, log_fn=print) -> Path:
    """The pool file: reused when it exists and was made with this run's settings and this code's rules, refused
    when it was not (it is never replaced unasked), else rendered atomically."""
    from experiments.robot.tabletop.pretrain import pool_identity, pool_mismatches, write_pretrain_pool
    from prismatic.io import atomic_path

    pool = Path(cfg.pool)
    # one set of settings for both: the identity checked is the one a rendered pool records
    settings = {"num_scenes": cfg.pool_scenes, "seed": cfg.pool_seed,
                "image_size": get_config(cfg.config_name).image_size, "texts_per_scene": cfg.texts_per_scene}
    if pool.exists():
        try:
            wrong = pool_mismatches(pool, pool_identity(**settings))
        except OSError as e:
            raise PretrainError(f"{pool}: not a readable HDF5 pretraining pool ({e})") from e
        if wrong:
            raise PretrainError(f"{pool} holds other scenes than this run would render ({'; '.join(wrong)}): "
                                "delete it to have it rendered again, or pass --pool another path")
        return pool
    t0 = time.perf_counter()
    with atomic_path(pool) as tmp:
        write_pretrain_pool(tmp, **settings, compression={"compression": "gzip"})
    log_fn(f"[pretrain] rendered {cfg.pool_scenes} pretraining scenes to {pool} in {time.perf_counter() - t0:.1f}s")
    return pool


@dataclass
class Conversation:
    ids: list[int]
    target: list[bool]  # token j is predicted (an answer token or its closing <|im_end|>)


class ConversationBuilder:
    """Packs a scene's (question, answer) pairs into token ids with the answer mask."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.prefix = self._enc(f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n")
        self.unk = tokenizer.token_to_id("<unk>")

    def _enc(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def build(self, turns: list[tuple[str, str]]) -> Conversation:
        ids, target = list(self.prefix), [False] * len(self.prefix)
        for question, answer in turns:
            q = self._enc(f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")
            a = self._enc(f"{answer}<|im_end|>\n")
            if self.unk is not None and self.unk in a:
                raise PretrainError(f"answer {answer!r} has words outside the tokenizer's vocabulary")
            ids += q + a
            target += [False] * len(q) + [True] * len(a)
        return Conversation(ids, target)


class PoolData:
    """The pool split by scene into training and held-out scenes; batches of packed conversations."""

    def __init__(self, pool: dict, heldout_fraction: float, seed: int):
        self.images = pool["images"]
        n = self.images.shape[0]
        self.texts: list[list[tuple[str, str]]] = [[] for _ in range(n)]
        for prompt, target, s in zip(pool["prompts"], pool["targets"], pool["scene"]):
            self.texts[int(s)].append((prompt, target))
        order = np.random.default_rng(np.random.SeedSequence([seed, 0xBA5E])).permutation(n)
        n_held = max(1, int(round(heldout_fraction * n)))
        if n_held >= n:
            raise PretrainError(f"the pool has {n} scenes: too few to hold {n_held} out")
        self.heldout, self.train = np.sort(order[:n_held]), order[n_held:]

    def conversations(self, builder: ConversationBuilder, scenes, turns: int, rng: np.random.Generator | None):
        out = []
        for s in scenes:
            texts = self.texts[int(s)]
            if rng is not None:
                texts = [texts[i] for i in rng.permutation(len(texts))]
            out.append(builder.build(texts[:turns]))
        return out


def collate(convs: list[Conversation], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids (B, T) right-padded, text_lens (B,), target mask (B, T))."""
    t = max(len(c.ids) for c in convs)
    ids = torch.full((len(convs), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(convs), t), dtype=torch.bool)
    for i, c in enumerate(convs):
        ids[i, : len(c.ids)] = torch.tensor(c.ids)
        mask[i, : len(c.ids)] = torch.tensor(c.target)
    return ids, torch.tensor([len(c.ids) for c in convs]), mask


# ------------------------------------------------------------------------------------------------ model


def answer_logits(vlm: PrismaticVLM, input_ids: torch.Tensor, pixel_values: torch.Tensor,
                  target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the positions that predict each target token, and those tokens: (N, vocab), (N,).

    Sequence = [tok0, vision tokens, tok1 … tokT-1] (MergeVLA's layout); token j ≥ 1 sits at V + j, so it is
    predicted from position V + j - 1 (the last vision token predicts tok1).
    """
    tok = vlm.llm.get_input_embeddings()(input_ids)
    vis = vlm.projector(vlm.vision(pixel_values))
    v = vis.shape[1]
    x = torch.cat([tok[:, :1], vis, tok[:, 1:]], dim=1)
    hidden = vlm.llm.model(inputs_embeds=x, use_cache=False).last_hidden_state
    if target[:, 0].any():
        raise PretrainError("the first token of a sequence cannot be a target")
    b, j = target.nonzero(as_tuple=True)
    h = hidden[b, v + j - 1]
    return vlm.llm.lm_head(h), input_ids[b, j]


def answer_step(vlm: PrismaticVLM, opt: torch.optim.Optimizer, params, input_ids: torch.Tensor,
                pixel_values: torch.Tensor, target: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """One optimizer step of the next-token loss on the answers (gradients clipped at max_grad_norm; 0: not
    clipped); returns the loss."""
    logits, labels = answer_logits(vlm, input_ids, pixel_values, target)
    loss = F.cross_entropy(logits.float(), labels)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    opt.step()
    return loss


@torch.no_grad()
def evaluate(vlm: PrismaticVLM, data: PoolData, builder: ConversationBuilder, processor: VLAProcessor,
             turns: int, batch_size: int = 32) -> dict:
    """Teacher-forced accuracy on held-out scenes: per token, and per whole answer (every token right).

    `heldout_answer_acc_other_images` asks the same questions with each scene's images replaced by the next
    held-out scene's: a model that reads the image loses accuracy there, one that answers from language priors
    alone scores the same.
    """
    was = vlm.training
    vlm.eval()
    tok_hits = tok_n = ans_hits = ans_n = other_hits = 0
    loss_sum = 0.0
    n_held = len(data.heldout)
    try:
        for i in range(0, n_held, batch_size):
            scenes = data.heldout[i: i + batch_size]
            others = data.heldout[(np.arange(i, i + len(scenes)) + 1) % n_held]
            convs = data.conversations(builder, scenes, turns, None)
            ids, _, mask = collate(convs, processor.pad_id)
            logits, labels = answer_logits(vlm, ids, processor.images(data.images[scenes]), mask)
            loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").item()
            right = (logits.argmax(-1) == labels).tolist()
            tok_hits += sum(right)
            tok_n += len(right)
            hits, n = answer_hits(convs, right)
            ans_hits, ans_n = ans_hits + hits, ans_n + n
            other_logits, _ = answer_logits(vlm, ids, processor.images(data.images[others]), mask)
            other_hits += answer_hits(convs, (other_logits.argmax(-1) == labels).tolist())[0]
    finally:
        vlm.train(was)
    return {"heldout_loss": loss_sum / max(tok_n, 1), "heldout_token_acc": tok_hits / max(tok_n, 1),
            "heldout_answer_acc": ans_hits / max(ans_n, 1),
            "heldout_answer_acc_other_images": other_hits / max(ans_n, 1), "heldout_scenes": int(n_held),
            "heldout_answers": ans_n}


def answer_hits(convs: list[Conversation], right: list[bool]) -> tuple[int, int]:
    """(answers with every token right, answers): an answer is a run of consecutive target tokens; `right`
    holds one flag per target token, in the order of the batch's sequences."""
    n_targets = sum(sum(c.target) for c in convs)
    if n_targets != len(right):
        raise ValueError(f"{len(right)} token flags for {n_targets} target tokens")
    hits = n = k = 0
    for c in convs:
        run_ok, in_run = True, False
        for is_t in c.target:
            if is_t:
                run_ok, in_run = run_ok and right[k], True
                k += 1
            elif in_run:
                hits, n, run_ok, in_run = hits + run_ok, n + 1, True, False
        if in_run:
            hits, n = hits + run_ok, n + 1
    return hits, n


def evaluate_base(cfg: PretrainConfig, log_fn=print) -> dict:
    """`evaluate` for the base directory at cfg.out_dir, on the held-out scenes of the pool it was pretrained on.

    The split (heldout_fraction, seed) is the one base.json records, not this run's flags, so the scenes scored
    are the base's held-out ones; a missing cfg.pool is rendered with the recorded pool settings. A pool file
    whose sha256 differs from the recorded one is only warned about: an HDF5 file rendered again can differ in
    its bytes but not its scenes.
    """
    from experiments.robot.tabletop.pretrain import read_pretrain_pool
    from prismatic.io import sha256_file

    model_cfg = get_config(cfg.config_name)
    sd, meta = load_base_dir(cfg.out_dir, model_cfg)
    record = meta.get("pretraining") or {}
    recorded = record.get("config") or {}
    split = {k: recorded.get(k, getattr(cfg, k)) for k in ("heldout_fraction", "seed")}
    pool_file, want = Path(cfg.pool), (record.get("pool") or {}).get("sha256")
    if pool_file.exists() and want and sha256_file(pool_file) != want:
        log_fn(f"[pretrain] warning: {pool_file} is not byte for byte the pool {cfg.out_dir} was pretrained on "
               f"(base.json: sha256 {want[:12]}…); if its scenes differ, these are not the base's held-out figures")
    pool_cfg = replace(cfg, **{k: recorded[k] for k in ("pool_scenes", "pool_seed", "texts_per_scene")
                                           if k in recorded})
    vlm = PrismaticVLM(model_cfg)
    try:
        load_vlm_weights(vlm, sd, str(cfg.out_dir), cfg.config_name)
    except BaseModelError as e:
        raise PretrainError(str(e)) from e
    pool = read_pretrain_pool(ensure_pool(pool_cfg, log_fn))
    tokenizer = build_tiny_tokenizer()
    processor = VLAProcessor(tokenizer, model_cfg.image_size, model_cfg.llm.vocab_size)
    data = PoolData(pool, split["heldout_fraction"], split["seed"])
    with torch.no_grad():
        result = evaluate(vlm, data, ConversationBuilder(tokenizer), processor, cfg.turns_per_sequence)
    log_fn(f"[pretrain] {cfg.out_dir} on {cfg.pool}: " + " ".join(f"{k}={v}" for k, v in result.items()))
    return result


INIT_SCHEMES = ("hf", "fan_in")


def init_vlm(cfg: VLAConfig, seed: int, scheme: str = "hf", llm_std: float = 0.08) -> PrismaticVLM:
    """The from-scratch VLM. "hf": transformers' initialisation (N(0, 0.02²) weights, DINOv2 layer scale 1e-5,
    sized for wide models); "fan_in" then redraws every LLM linear / embedding weight from N(0, llm_std²), every
    vision-tower linear / conv weight from N(0, 1/fan_in), and sets the DINOv2 layer scales to 1."""
    if scheme not in INIT_SCHEMES:
        raise PretrainError(f"init is {scheme!r}, expected one of {list(INIT_SCHEMES)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vlm = PrismaticVLM(cfg)
    if scheme == "hf":
        return vlm
    with torch.no_grad():
        for name, p in vlm.named_parameters():
            if "lambda1" in name:  # DINOv2 layer scale
                p.fill_(1.0)
        g = torch.Generator().manual_seed(seed)
        for mod in vlm.llm.modules():  # the tied LM head is drawn again last; it is the embedding's tensor
            if isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * llm_std)
        g = torch.Generator().manual_seed(seed + 7)
        for mod in vlm.vision.modules():
            if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) / mod.weight[0].numel() ** 0.5)
    return vlm


def square_warmup(vlm: PrismaticVLM, params, cfg: PretrainConfig, model_cfg: VLAConfig, processor: VLAProcessor,
                  builder: ConversationBuilder, log_fn=print) -> list[dict]:
    """The square-colour curriculum (cfg.square_curriculum), constant lr, its own optimizer; per square size the
    held-out accuracy after its steps."""
    from experiments.robot.tabletop_pipeline.vision_probe import square_accuracy, square_batch, square_images

    out = []
    if not cfg.square_curriculum:
        return out
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0x5A]))
    held_rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0xE7]))
    for size in cfg.square_curriculum:
        for _ in range(cfg.square_steps):
            images, colour = square_images(rng, cfg.batch_size, size, model_cfg.image_size, 200, model_cfg.num_images)
            answer_step(vlm, opt, params, *square_batch(builder, processor, images, colour), cfg.max_grad_norm)
        held = square_images(held_rng, 100, size, model_cfg.image_size, 200, model_cfg.num_images)
        acc = square_accuracy(vlm, builder, processor, *held)
        out.append({"square_size": size, "steps": cfg.square_steps, "accuracy": acc})
        log_fn(f"[pretrain] square curriculum: {size}-px squares, {cfg.square_steps} steps, held-out colour "
               f"accuracy {acc:.2f}")
    return out


def _write_base(cfg: PretrainConfig, model_cfg: VLAConfig, vlm: PrismaticVLM, tokenizer_json: str,
                extra: dict) -> str:
    """Write the base directory next to out_dir, then move it into place (replacing it only with overwrite)."""
    with atomic_dir(cfg.out_dir, replace=cfg.overwrite) as tmp:
        return save_base_dir(tmp, model_cfg, vlm.state_dict(), tokenizer_json, extra)


def pretrain(cfg: PretrainConfig, log_fn=print) -> dict:
    """Pretrain per `cfg`, write the base directory, return its summary (also stored in base.json)."""
    from experiments.robot.tabletop.pretrain import read_pretrain_pool
    from prismatic.io import sha256_file

    cfg.validate()
    out = Path(cfg.out_dir)
    if not cfg.evaluate_only and out.exists() and not cfg.overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite true to replace it, or choose another --out_dir")
    threads = torch.get_num_threads()
    if cfg.cpu_threads:  # for the evaluation too: its figures depend on the float summation order
        torch.set_num_threads(cfg.cpu_threads)
    try:
        if cfg.evaluate_only:
            return evaluate_base(cfg, log_fn)
        return _pretrain(cfg, log_fn, read_pretrain_pool, sha256_file)
    finally:
        torch.set_num_threads(threads)


def _pretrain(cfg: PretrainConfig, log_fn, read_pretrain_pool, sha256_file) -> dict:
    t_start = time.perf_counter()
    model_cfg = get_config(cfg.config_name)
    if model_cfg.tokenizer != "tiny":
        raise PretrainError(f"config {cfg.config_name!r} uses the {model_cfg.tokenizer!r} tokenizer; TableTop "
                            "pretraining is for configs with the tiny word-level tokenizer")
    pool_path = ensure_pool(cfg, log_fn)
    pool = read_pretrain_pool(pool_path)
    if pool["images"].shape[1] != model_cfg.num_images:
        raise PretrainError(f"{pool_path}: {pool['images'].shape[1]} cameras per scene, the model takes "
                            f"{model_cfg.num_images}")
    tokenizer = build_tiny_tokenizer()
    processor = VLAProcessor(tokenizer, model_cfg.image_size, model_cfg.llm.vocab_size)
    builder = ConversationBuilder(tokenizer)
    data = PoolData(pool, cfg.heldout_fraction, cfg.seed)

    vlm = init_vlm(model_cfg, cfg.seed, cfg.init, cfg.llm_init_std).train()
    vlm.llm.set_attn_implementation("sdpa")
    if not cfg.train_embeddings:
        vlm.llm.get_input_embeddings().weight.requires_grad_(False)
    params = [p for p in vlm.parameters() if p.requires_grad]
    curriculum = square_warmup(vlm, params, cfg, model_cfg, processor, builder, log_fn)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0xDA7A]))
    order, pos = rng.permutation(data.train), 0
    history, t_last = [], time.perf_counter()
    log_fn(f"[pretrain] {cfg.config_name} VLM ({sum(p.numel() for p in params) / 1e6:.2f}M parameters "
           f"trained): {len(data.train)} training / {len(data.heldout)} held-out scenes, {cfg.steps} steps × "
           f"{cfg.batch_size} scenes")
    for step in range(cfg.steps):
        if pos + cfg.batch_size > len(order):
            order, pos = rng.permutation(data.train), 0
        scenes = np.sort(order[pos: pos + cfg.batch_size])
        pos += cfg.batch_size
        ids, _, mask = collate(data.conversations(builder, scenes, cfg.turns_per_sequence, rng), processor.pad_id)
        pixels = processor.images(data.images[scenes])
        if cfg.image_aug:
            gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
            pixels = augment_images(pixels, cfg.aug, gen)
        lr = lr_at(step, cfg.lr, cfg.steps, "cosine", cfg.warmup_steps, cfg.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        loss = answer_step(vlm, opt, params, ids, pixels, mask, cfg.max_grad_norm)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"pretraining loss became {loss.item()} at step {step + 1}; lower --lr")
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            now = time.perf_counter()
            rec = {"step": done, "loss": round(loss.item(), 4), "lr": lr,
                   "steps_per_s": round(cfg.log_every / max(now - t_last, 1e-9), 2)}
            t_last = now
            if done % cfg.eval_every == 0 or done == cfg.steps:
                rec.update({k: (round(v, 4) if isinstance(v, float) else v)
                            for k, v in evaluate(vlm, data, builder, processor, cfg.turns_per_sequence).items()})
            history.append(rec)
            log_fn("[pretrain] " + " ".join(f"{k}={v}" for k, v in rec.items()))
    final = history[-1]
    summary = {
        "format": PRETRAIN_FORMAT,
        "objective": "next-token cross-entropy on answers to captions/questions about rendered TableTop scenes",
        "trained": "vision towers, projector and LLM, all parameters"
                   + ("" if cfg.train_embeddings else " but the token embeddings (tied LM head), kept at their init"),
        "config": cfg.to_dict(),
        "pool": {"path": str(pool_path), "sha256": sha256_file(pool_path), "attrs": pool["attrs"],
                 "train_scenes": int(len(data.train)), "heldout_scenes": int(len(data.heldout))},
        "final": {k: final[k] for k in final if k.startswith("heldout") or k == "loss"},
        "square_curriculum": curriculum,
        "history": history,
        "wall_time_s": round(time.perf_counter() - t_start, 1),
        "torch_threads": torch.get_num_threads(),
    }
    digest = _write_base(cfg, model_cfg, vlm, tokenizer.to_str(), {"pretraining": summary})
    log_fn(f"[pretrain] wrote base {cfg.out_dir} (sha256 {digest[:12]}…) in {summary['wall_time_s']:.0f}s")
    return {**summary, "sha256": digest}
