"""TableTop-4 VLM pretraining: answer scoring, and a short run whose held-out figures the evaluate-only mode
reproduces from the written base."""

import dataclasses
import subprocess
import sys

import pytest
import torch

from experiments.robot.tabletop_pipeline.vlm_pretrain import (
    Conversation,
    PretrainConfig,
    PretrainError,
    answer_hits,
    init_vlm,
    pretrain,
)
from prismatic.models.configuration import get_config
from prismatic.models.loading import load_base_dir


def test_answer_hits_count_whole_answers():
    # two answers in the first sequence (tokens 2-3 and 5), one in the second (its last two tokens)
    convs = [Conversation([0] * 6, [False, False, True, True, False, True]),
             Conversation([0] * 4, [False, False, True, True])]
    assert answer_hits(convs, [True, True, True, True, True]) == (3, 3)
    assert answer_hits(convs, [True, False, True, True, True]) == (2, 3)  # one wrong token fails its answer
    assert answer_hits(convs, [False, True, False, True, False]) == (0, 3)
    with pytest.raises(ValueError, match="4 token flags for 5 target tokens"):
        answer_hits(convs, [True] * 4)


def test_short_pretraining_then_evaluate_only_reproduces_its_heldout_figures(tmp_path):
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


def test_frozen_embeddings_stay_at_their_init(tmp_path):
    cfg = PretrainConfig(out_dir=tmp_path / "base", pool=tmp_path / "pool.hdf5", pool_scenes=20, steps=3,
                         batch_size=4, warmup_steps=1, eval_every=3, log_every=3, train_embeddings=False)
    summary = pretrain(cfg, log_fn=lambda _: None)
    assert "token embeddings" in summary["trained"]
    sd, _ = load_base_dir(tmp_path / "base", get_config("tiny"))
    init = init_vlm(get_config("tiny"), cfg.seed, cfg.init, cfg.llm_init_std).state_dict()
    emb = "llm.model.embed_tokens.weight"
    assert torch.equal(sd[emb], init[emb])
    assert not torch.equal(sd["llm.model.layers.0.self_attn.q_proj.weight"], init["llm.model.layers.0.self_attn.q_proj.weight"])


def test_square_curriculum_teaches_the_colour_of_a_whole_image_square():
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

    from experiments.robot.tabletop.pretrain import POOL_VERSION, write_pretrain_pool
    from experiments.robot.tabletop_pipeline.vlm_pretrain import ensure_pool

    pool = tmp_path / "pool.hdf5"
    write_pretrain_pool(pool, 4, seed=0, texts_per_scene=2)
    cfg = PretrainConfig(pool=pool, pool_scenes=4, texts_per_scene=2)
    assert ensure_pool(cfg) == pool  # made as this run would make it: reused
    with pytest.raises(PretrainError, match=r"num_scenes: file has 4, expected 5.*delete it"):
        ensure_pool(PretrainConfig(pool=pool, pool_scenes=5, texts_per_scene=2))
    with pytest.raises(PretrainError, match="texts_per_scene: file has 2, expected 8"):
        ensure_pool(PretrainConfig(pool=pool, pool_scenes=4))
    with h5py.File(pool, "a") as f:  # as written before pools recorded their version and the physics rules
        del f.attrs["pool_version"], f.attrs["physics_version"]
    before = pool.read_bytes()
    with pytest.raises(PretrainError, match=f"pool_version: file has 'nothing', expected {POOL_VERSION}; physics_version"):
        ensure_pool(cfg)
    assert pool.read_bytes() == before
    pool.write_bytes(b"not hdf5")
    with pytest.raises(PretrainError, match="not a readable HDF5 pretraining pool"):
        ensure_pool(cfg)
