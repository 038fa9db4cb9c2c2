"""TableTop-4 VLM pretraining: answer scoring, and a short run whose held-out figures the evaluate-only mode
reproduces from the written base."""

import dataclasses
import math
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from experiments.robot.tabletop_pipeline import vlm_pretrain as vp
from experiments.robot.tabletop_pipeline.vlm_pretrain import (
    Conversation,
    ConversationBuilder,
    PoolData,
    PretrainConfig,
    PretrainError,
    answer_hits,
    answer_logits,
    answer_step,
    init_vlm,
    pretrain,
)
from prismatic.models.configuration import get_config
from prismatic.models.loading import load_base_dir
from prismatic.models.processing import VLAProcessor, build_tiny_tokenizer


@pytest.fixture
def one_thread():
    """Torch on one thread for the test, as pretraining runs the tiny VLM (cpu_threads=1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_answer_hits_count_whole_answers():
    # two answers in the first sequence (tokens 2-3 and 5), one in the second (its last two tokens)
    convs = [Conversation([0] * 6, [False, False, True, True, False, True]),
             Conversation([0] * 4, [False, False, True, True])]
    assert answer_hits(convs, [True, True, True, True, True]) == (3, 3)
    assert answer_hits(convs, [True, False, True, True, True]) == (2, 3)  # one wrong token fails its answer
    assert answer_hits(convs, [False, True, False, True, False]) == (0, 3)
    with pytest.raises(ValueError, match="4 token flags for 5 target tokens"):
        answer_hits(convs, [True] * 4)


def test_short_pretraining_then_evaluate_only_reproduces_its_heldout_figures(tmp_path, one_thread):
    cfg = PretrainConfig(out_dir=tmp_path / "base", pool=tmp_path / "pool.hdf5", pool_scenes=40, steps=6,
                         batch_size=4, warmup_steps=2, eval_every=6, log_every=3, heldout_fraction=0.2)
    summary = pretrain(cfg, log_fn=lambda _: None)
    final = summary["history"][-1]
    assert 0 <= final["heldout_answer_acc_other_images"] <= 1 and final["heldout_scenes"] == 8
    assert summary["square_curriculum"] == []  # no warm-up by default
    cfg.evaluate_only = True
    cfg.heldout_fraction, cfg.seed = 0.5, 3  # evaluation splits as the base recorded, not as these flags say
    again = pretrain(cfg, log_fn=lambda _: None)
    # the loss and token accuracy are what these 6 steps moved (the answer accuracies are still 0): the figures of
    # the base written, not of a freshly built model
    for key in ("heldout_loss", "heldout_token_acc", "heldout_answer_acc", "heldout_answer_acc_other_images",
                "heldout_answers"):
        assert again[key] == pytest.approx(final[key], abs=1e-4), key
    fresh = pretrain(dataclasses.replace(cfg, out_dir=tmp_path / "fresh", evaluate_only=False, steps=1, lr=1e-9,
                                         warmup_steps=0, eval_every=1, log_every=1), log_fn=lambda _: None)["history"][-1]
    assert abs(fresh["heldout_loss"] - final["heldout_loss"]) > 0.1
    import shutil

    copy = tmp_path / "copy.hdf5"
    shutil.copy(cfg.pool, copy)
    with open(copy, "ab") as f:
        f.write(b"\0")  # same scenes, other bytes
    cfg.pool, logged = copy, []
    pretrain(cfg, log_fn=logged.append)
    assert any("is not byte for byte the pool" in m for m in logged)
    # a missing pool is rendered as base.json records it (40 scenes of seed 0), not as these flags say
    cfg.pool, cfg.pool_scenes, cfg.pool_seed = tmp_path / "missing.hdf5", 41, 1
    again = pretrain(cfg, log_fn=lambda _: None)
    assert again["heldout_loss"] == pytest.approx(final["heldout_loss"], abs=1e-4)
    with h5py.File(cfg.pool, "r") as f:
        assert (f.attrs["num_scenes"], f.attrs["seed"]) == (40, 0)


def test_evaluate_only_without_a_base_is_a_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, "vla-scripts/pretrain_tabletop.py", "--evaluate_only", "true",
                           "--out_dir", str(tmp_path / "none"), "--pool", str(tmp_path / "pool.hdf5")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "base.json not found" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "pool.hdf5").exists()  # nothing rendered for a base that is not there


def test_fan_in_init_scales_weights_for_the_tiny_widths():
    cfg = get_config("tiny")
    hf, fan = init_vlm(cfg, 0), init_vlm(cfg, 0, "fan_in", 0.08)
    q = "llm.model.layers.0.self_attn.q_proj.weight"
    conv = "vision.dino.embeddings.patch_embeddings.projection.weight"
    sd_hf, sd_fan = hf.state_dict(), fan.state_dict()
    assert abs(sd_hf[q].std().item() - 0.02) < 0.002 and abs(sd_fan[q].std().item() - 0.08) < 0.004
    fan_in = 3 * cfg.dino.patch_size ** 2
    assert abs(sd_fan[conv].std().item() * fan_in ** 0.5 - 1.0) < 0.05
    scales = [v for k, v in sd_fan.items() if k.endswith("lambda1")]
    assert scales and all(torch.all(v == 1.0) for v in scales)
    assert fan.llm.lm_head.weight is fan.llm.model.embed_tokens.weight  # still tied
    assert torch.equal(sd_fan[q], init_vlm(cfg, 0, "fan_in", 0.08).state_dict()[q])  # seeded
    assert abs(sd_fan["llm.model.embed_tokens.weight"].std().item() - 0.08) < 0.004  # the embeddings too
    for k in ("llm.model.layers.0.self_attn.q_proj.bias", "projector.0.weight"):  # biases and projector: as hf
        assert torch.equal(sd_hf[k], sd_fan[k])
    with pytest.raises(PretrainError, match="init is 'xavier'"):
        init_vlm(cfg, 0, "xavier")
    with pytest.raises(PretrainError, match="init is 'xavier'"):
        PretrainConfig(init="xavier").validate()
    with pytest.raises(PretrainError, match="llm_init_std is nan, expected a finite number"):
        PretrainConfig(llm_init_std=float("nan")).validate()
    with pytest.raises(PretrainError, match="max_grad_norm is inf, expected a finite number"):
        PretrainConfig(max_grad_norm=float("inf")).validate()


def test_frozen_embeddings_stay_at_their_init(tmp_path, monkeypatch):
    augmented = []
    monkeypatch.setattr(vp, "augment_images", lambda pixels, aug, gen: augmented.append(aug) or pixels)
    cfg = PretrainConfig(out_dir=tmp_path / "base", pool=tmp_path / "pool.hdf5", pool_scenes=20, steps=3,
                         batch_size=4, warmup_steps=1, eval_every=100, log_every=2, train_embeddings=False)
    threads = torch.get_num_threads()
    summary = pretrain(cfg, log_fn=lambda _: None)
    assert torch.get_num_threads() == threads  # cpu_threads (1) held for the run only
    assert augmented == [cfg.aug] * 3  # image_aug: every step's images
    assert "token embeddings" in summary["trained"]
    # logged every 2 steps and at the last, which is also evaluated; the cosine lr after 1 warm-up step:
    # 1e-3 at step 2, then halfway down to min_lr_ratio × 1e-3 at step 3
    history = summary["history"]
    assert [r["step"] for r in history] == [2, 3] and [r["lr"] for r in history] == [1e-3, pytest.approx(5.5e-4)]
    assert "heldout_loss" not in history[0] and set(summary["final"]) == {
        "loss", "heldout_loss", "heldout_token_acc", "heldout_answer_acc", "heldout_answer_acc_other_images",
        "heldout_scenes", "heldout_answers"}
    sd, _ = load_base_dir(tmp_path / "base", get_config("tiny"))
    init = init_vlm(get_config("tiny"), cfg.seed, cfg.init, cfg.llm_init_std).state_dict()
    emb = "llm.model.embed_tokens.weight"
    assert torch.equal(sd[emb], init[emb])
    assert not torch.equal(sd["llm.model.layers.0.self_attn.q_proj.weight"], init["llm.model.layers.0.self_attn.q_proj.weight"])


def test_square_curriculum_teaches_the_colour_of_a_whole_image_square(one_thread):
    from experiments.robot.tabletop_pipeline.vlm_pretrain import ConversationBuilder, square_warmup
    from prismatic.models.processing import VLAProcessor, build_tiny_tokenizer

    model_cfg = get_config("tiny")
    tok = build_tiny_tokenizer()
    proc, builder = VLAProcessor(tok, model_cfg.image_size, model_cfg.llm.vocab_size), ConversationBuilder(tok)
    vlm = init_vlm(model_cfg, 0).train()
    before = {k: v.clone() for k, v in vlm.state_dict().items()}
    params = list(vlm.parameters())
    assert square_warmup(vlm, params, PretrainConfig(), model_cfg, proc, builder, lambda _: None) == []
    assert all(torch.equal(before[k], v) for k, v in vlm.state_dict().items())  # no curriculum: nothing trained
    logs = []
    out = square_warmup(vlm, params, PretrainConfig(square_curriculum=[64, 64], square_steps=25), model_cfg, proc,
                        builder, logs.append)
    assert [r["square_size"] for r in out] == [64, 64] and all(r["steps"] == 25 for r in out)
    assert out[-1]["accuracy"] >= 0.9  # measured 1.0 after 40-50 steps (vision_probe); chance is 0.1
    assert "64-px squares, 25 steps" in logs[0]


@pytest.mark.parametrize("curriculum", [[0], [48, 65]])
def test_square_curriculum_sizes_must_fit_the_image(curriculum):
    with pytest.raises(PretrainError, match=r"square_curriculum is .*expected square sides in 1\.\.64"):
        PretrainConfig(square_curriculum=curriculum).validate()


def test_a_pool_made_with_other_settings_or_rules_is_refused_and_left_as_it_is(tmp_path):
    import h5py

    from experiments.robot.tabletop.pretrain import POOL_VERSION, pool_identity, pool_mismatches, write_pretrain_pool
    from experiments.robot.tabletop_pipeline.vlm_pretrain import ensure_pool

    pool = tmp_path / "pool.hdf5"
    write_pretrain_pool(pool, 4, seed=0, texts_per_scene=2)
    cfg = PretrainConfig(pool=pool, pool_scenes=4, texts_per_scene=2)
    assert ensure_pool(cfg) == pool  # made as this run would make it: reused
    with pytest.raises(PretrainError, match=r"num_scenes: file has 4, expected 5.*delete it"):
        ensure_pool(PretrainConfig(pool=pool, pool_scenes=5, texts_per_scene=2))
    with pytest.raises(PretrainError, match="texts_per_scene: file has 2, expected 8"):
        ensure_pool(PretrainConfig(pool=pool, pool_scenes=4))
    with pytest.raises(PretrainError, match="seed: file has 0, expected 1"):
        ensure_pool(PretrainConfig(pool=pool, pool_scenes=4, texts_per_scene=2, pool_seed=1))
    assert pool_mismatches(pool, pool_identity(4, 0, image_size=32, supersample=1, texts_per_scene=2)) == [
        "image_size: file has 64, expected 32", "supersample: file has 2, expected 1"]
    with h5py.File(pool, "a") as f:  # as written before pools recorded their version and the physics rules
        del f.attrs["pool_version"], f.attrs["physics_version"]
    before = pool.read_bytes()
    with pytest.raises(PretrainError, match=f"pool_version: file has 'nothing', expected {POOL_VERSION}; physics_version"):
        ensure_pool(cfg)
    assert pool.read_bytes() == before
    pool.write_bytes(b"not hdf5")
    with pytest.raises(PretrainError, match="not a readable HDF5 pretraining pool"):
        ensure_pool(cfg)


@pytest.mark.parametrize("field, value, message", [
    ("steps", 0, "steps is 0, expected a positive integer"),
    ("turns_per_sequence", 0, "turns_per_sequence is 0, expected a positive integer"),
    ("warmup_steps", -1, "warmup_steps is -1, expected >= 0"),
    ("square_steps", -1, "square_steps is -1, expected >= 0"),
    ("llm_init_std", 0.0, "llm_init_std is 0.0, expected > 0"),
    ("warmup_steps", 2500, r"warmup_steps \(2500\) must be below steps \(2500\)"),
    ("lr", 0.0, "need lr > 0"),
    ("min_lr_ratio", 1.5, "min_lr_ratio in"),
    ("heldout_fraction", 0.0, r"heldout_fraction is 0.0, expected a value in \(0, 1\)"),
    ("aug", vp.ImageAugConfig(crop_area=0.0), r"aug.crop_area is 0.0, expected a fraction in \(0, 1\]"),
])
def test_bad_settings_name_the_field(field, value, message):
    with pytest.raises(PretrainError, match=message):
        PretrainConfig(**{field: value}).validate()


def test_boundary_settings_are_valid():
    PretrainConfig(square_curriculum=[1, 64], min_lr_ratio=1.0, warmup_steps=0, square_steps=0).validate()


def test_a_conversation_is_the_system_prompt_then_turns_whose_answers_alone_are_targets():
    tok = build_tiny_tokenizer()
    builder = ConversationBuilder(tok)
    conv = builder.build([("how many objects are there ?", "two"), ("is the gripper open ?", "yes")])
    tokens = [tok.id_to_token(i) for i in conv.ids]
    n = len(builder.prefix)
    assert tokens[:2] == ["<|im_start|>", "system"] and tokens[n - 1] == "<|im_end|>" and not any(conv.target[:n])
    assert tokens[n:] == ["<|im_start|>", "user", "how", "many", "objects", "are", "there", "?", "<|im_end|>",
                          "<|im_start|>", "assistant", "two", "<|im_end|>",
                          "<|im_start|>", "user", "is", "the", "gripper", "open", "?", "<|im_end|>",
                          "<|im_start|>", "assistant", "yes", "<|im_end|>"]
    assert [t for t, m in zip(tokens, conv.target) if m] == ["two", "<|im_end|>", "yes", "<|im_end|>"]
    with pytest.raises(PretrainError, match="answer 'a shiny cube' has words outside the tokenizer's vocabulary"):
        builder.build([("what is in the gripper ?", "a shiny cube")])


def _pool(n: int, texts: list[tuple[str, str]]) -> dict:
    """A pool of n scenes, each with `texts`; scene s's images are filled with grey level 10 s (mod 256)."""
    return {"images": np.stack([np.full((2, 8, 8, 3), 10 * s % 256, np.uint8) for s in range(n)]),
            "prompts": [p for p, _ in texts] * n, "targets": [a for _, a in texts] * n,
            "scene": np.repeat(np.arange(n), len(texts))}


def test_pool_data_holds_scenes_out_and_packs_each_scenes_texts():
    texts = [("how many objects are there ?", a) for a in ("one", "two", "three")]
    data = PoolData(_pool(30, texts), 0.05, seed=0)
    assert len(data.heldout) == 2 and len(data.train) == 28  # round(1.5)
    assert list(data.heldout) == sorted(data.heldout) and sorted([*data.heldout, *data.train]) == list(range(30))
    builder = ConversationBuilder(build_tiny_tokenizer())
    assert data.conversations(builder, [3], 2, None) == [builder.build(texts[:2])]  # in order, at most `turns`
    order = np.random.default_rng(0).permutation(3)
    assert list(order) != [0, 1, 2]
    assert data.conversations(builder, [3], 3, np.random.default_rng(0)) == [builder.build([texts[i] for i in order])]
    with pytest.raises(PretrainError, match="the pool has 2 scenes: too few to hold 2 out"):
        PoolData(_pool(2, texts), 0.9, seed=0)


def test_answer_logits_read_the_sequence_mergevla_fine_tunes_and_predict_each_target_from_before_it(one_thread):
    from prismatic.models.modeling import MergeVLA

    cfg = get_config("tiny")
    model = MergeVLA(cfg).eval()
    tok = build_tiny_tokenizer()
    conv = ConversationBuilder(tok).build([("how many objects are there ?", "two")])
    ids, mask = torch.tensor([conv.ids]), torch.tensor([conv.target])
    pixels = torch.rand(1, cfg.num_images, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, labels = answer_logits(model.vlm, ids, pixels, mask)
        x, _, v = model.build_sequence(ids, torch.tensor([ids.shape[1]]), pixels)  # [tok0, vision, tok1 …, queries]
        hidden = model.vlm.llm.model(inputs_embeds=x, use_cache=False).last_hidden_state
    j = mask[0].nonzero()[:, 0]
    assert labels.tolist() == [tok.token_to_id("two"), tok.token_to_id("<|im_end|>")]
    assert torch.allclose(logits, model.vlm.llm.lm_head(hidden[0, v + j - 1]), atol=1e-5)
    with pytest.raises(PretrainError, match="the first token of a sequence cannot be a target"):
        answer_logits(model.vlm, ids, pixels, torch.ones_like(mask))


def test_an_answer_step_uses_its_own_batchs_gradients_and_max_grad_norm_0_clips_nothing(one_thread):
    from experiments.robot.tabletop_pipeline.vision_probe import square_batch, square_images

    cfg = get_config("tiny")
    tok = build_tiny_tokenizer()
    batch = square_batch(ConversationBuilder(tok), VLAProcessor(tok, cfg.image_size, cfg.llm.vocab_size),
                         *square_images(np.random.default_rng(0), 2, 8, cfg.image_size, 200))
    plain, stale = init_vlm(cfg, 0), init_vlm(cfg, 0)
    for p in stale.parameters():
        p.grad = torch.ones_like(p)  # left over from an earlier step: zeroed, not added to
    for vlm, clip in ((plain, 0.0), (stale, 1e9)):
        params = list(vlm.parameters())
        answer_step(vlm, torch.optim.AdamW(params, lr=1e-3), params, *batch, clip)
    init = init_vlm(cfg, 0).state_dict()
    assert all(torch.equal(v, stale.state_dict()[k]) for k, v in plain.state_dict().items())
    assert not torch.equal(plain.state_dict()["projector.0.weight"], init["projector.0.weight"])


def test_evaluate_scores_answers_on_their_own_and_on_the_next_scenes_images(monkeypatch):
    from experiments.robot.tabletop.language import NUMBERS

    cfg = get_config("tiny")
    tok = build_tiny_tokenizer()
    vocab = cfg.llm.vocab_size
    counts = torch.tensor([tok.token_to_id(NUMBERS[s + 1]) for s in range(4)])  # scene s holds s + 1 objects
    texts = [("how many objects are there ?", "COUNT"), ("is the gripper open ?", "yes")]
    pool = _pool(4, texts)
    pool["targets"] = [NUMBERS[s + 1] if t == "COUNT" else t for s, t in zip(pool["scene"], pool["targets"])]
    data = PoolData(pool, 0.75, seed=0)  # 3 held-out scenes

    def reads_the_count(vlm, ids, pixels, target):
        # knows every answer token but the count, which it reads off the image's grey level; its logits give the
        # token it predicts log(vocab - 1), so that its loss on a right token is log 2
        b, j = target.nonzero(as_tuple=True)
        labels = ids[b, j]
        scene = (pixels[:, 0, 0, 0, 0] * 25.5).round().long()
        pred = torch.where(torch.isin(labels, counts), counts[scene[b]], labels)
        logits = torch.zeros(len(labels), vocab)
        logits[torch.arange(len(labels)), pred] = math.log(vocab - 1)
        return logits, labels

    monkeypatch.setattr(vp, "answer_logits", reads_the_count)
    model = torch.nn.Linear(1, 1).eval()
    processor = VLAProcessor(tok, cfg.image_size, vocab)
    out = vp.evaluate(model, data, ConversationBuilder(tok), processor, turns=2, batch_size=2)
    assert out == {"heldout_loss": pytest.approx(math.log(2)), "heldout_token_acc": 1.0, "heldout_answer_acc": 1.0,
                   "heldout_answer_acc_other_images": 0.5,  # the next scene's count is wrong, "yes" still right
                   "heldout_scenes": 3, "heldout_answers": 6}
    assert not model.training  # its mode is restored
    first = vp.evaluate(model, data, ConversationBuilder(tok), processor, turns=1)  # each scene's first text only
    assert (first["heldout_answers"], first["heldout_answer_acc_other_images"]) == (3, 0.0)


def test_square_warmup_trains_each_size_its_steps_then_measures_it_on_images_of_its_own(monkeypatch):
    from experiments.robot.tabletop_pipeline import vision_probe

    cfg = get_config("tiny")
    tok = build_tiny_tokenizer()
    processor = VLAProcessor(tok, cfg.image_size, cfg.llm.vocab_size)
    trained, measured, logs = [], [], []
    monkeypatch.setattr(vp, "answer_step", lambda vlm, opt, params, ids, pixels, mask, clip: trained.append(pixels))
    monkeypatch.setattr(vision_probe, "square_accuracy", lambda vlm, builder, proc, images, colour:
                        measured.append(images) or 0.5)
    model = torch.nn.Linear(1, 1)
    out = vp.square_warmup(model, list(model.parameters()), PretrainConfig(square_curriculum=[48, 6], square_steps=3,
                           batch_size=4), cfg, processor, ConversationBuilder(tok), logs.append)
    assert out == [{"square_size": s, "steps": 3, "accuracy": 0.5} for s in (48, 6)] and len(logs) == 2
    assert len(trained) == 6 and all(p.shape[0] == 4 for p in trained)
    squares = [int((p[:, 0] != 200 / 255).any(1).sum(dim=(1, 2))[0]) for p in trained]  # square pixels, image 0
    assert squares == [48 ** 2] * 3 + [6 ** 2] * 3
    assert [m.shape[0] for m in measured] == [100, 100]


def test_pretraining_refuses_an_existing_base_another_tokenizer_and_a_pool_of_other_cameras(tmp_path):
    (tmp_path / "base").mkdir()
    small = dict(pool=tmp_path / "pool.hdf5", pool_scenes=2, texts_per_scene=2, steps=1, warmup_steps=0)
    with pytest.raises(FileExistsError, match="already exists; pass --overwrite true to replace it"):
        pretrain(PretrainConfig(out_dir=tmp_path / "base", **small))
    with pytest.raises(PretrainError, match="uses the 'qwen' tokenizer"):
        pretrain(PretrainConfig(out_dir=tmp_path / "b", config_name="qwen25-dinosiglip-224px", **small))
    assert not (tmp_path / "pool.hdf5").exists()  # refused before anything was rendered
    from experiments.robot.tabletop.pretrain import write_pretrain_pool

    write_pretrain_pool(tmp_path / "pool.hdf5", 2, seed=0, texts_per_scene=2)
    with h5py.File(tmp_path / "pool.hdf5", "a") as f:  # the third-person camera alone
        images = f["images"][:, :1]
        del f["images"]
        f["images"] = images
    with pytest.raises(PretrainError, match="1 cameras per scene, the model takes 2"):
        pretrain(PretrainConfig(out_dir=tmp_path / "b", **small), log_fn=lambda _: None)


def test_a_loss_that_is_not_finite_stops_pretraining(tmp_path):
    cfg = PretrainConfig(out_dir=tmp_path / "base", pool=tmp_path / "pool.hdf5", pool_scenes=8, texts_per_scene=2,
                         steps=3, batch_size=2, warmup_steps=0, lr=1e12, max_grad_norm=0.0, heldout_fraction=0.25)
    with pytest.raises(FloatingPointError, match="pretraining loss became nan at step 2; lower --lr"):
        pretrain(cfg, log_fn=lambda _: None)
    assert not (tmp_path / "base").exists()


def test_evaluate_only_runs_on_cpu_threads_and_restores_them(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(vp, "evaluate_base", lambda cfg, log_fn: seen.append(torch.get_num_threads()) or {})
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for cpu_threads in (1, 0):  # 0: torch's setting as it was
            pretrain(PretrainConfig(out_dir=tmp_path, evaluate_only=True, cpu_threads=cpu_threads))
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert seen == [1, 2]
