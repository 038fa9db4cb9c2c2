"""Issue 2: the MergeVLA model, real sizes on `meta` and the tiny config on CPU."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import Dinov2WithRegistersModel, SiglipVisionModel

from prismatic.checkpoint import CHECKPOINT_KIND, CheckpointError, load_checkpoint, save_checkpoint
from prismatic.models import BaseModelConfig, MergeVLA, build_vla, from_pretrained, get_config, save_pretrained
from prismatic.models.lora import apply_lora
from prismatic.models.modeling import ExpertBlock, dino_hf_config, siglip_hf_config


def n_params(module, pred=lambda n: True):
    return sum(p.numel() for n, p in module.named_parameters() if pred(n))


def linear_lora_count(in_f, out_f, r):
    return r * (in_f + out_f)


def test_real_size_parameter_counts_match_published_architecture():
    cfg = get_config("qwen25-dinosiglip-224px")
    with torch.device("meta"):
        model = MergeVLA(cfg)
        full_dino = Dinov2WithRegistersModel(dino_hf_config(cfg.dino, 224, cfg.dino.num_layers))
        siglip_cfg = siglip_hf_config(cfg.siglip, 224, cfg.siglip.num_layers)
        siglip_cfg.vision_use_head = True
        full_siglip = SiglipVisionModel(siglip_cfg)
    # Qwen2.5-0.5B, tied embeddings: the published 494,032,768.
    assert n_params(model.vlm.llm) == 494_032_768
    # The published towers (303.2M and 427.7M parameters); we build all but the last block (and no head).
    assert round(n_params(full_dino) / 1e6, 1) == 303.2
    assert round(n_params(full_siglip) / 1e6, 1) == 427.7
    dino_block = n_params(full_dino.encoder.layer[-1])
    siglip_block = n_params(full_siglip.encoder.layers[-1])
    siglip_head = n_params(full_siglip.head)
    assert n_params(model.vlm.vision.dino) == n_params(full_dino) - dino_block
    assert n_params(model.vlm.vision.siglip) == n_params(full_siglip) - siglip_block - siglip_head
    # Projector 2176 → 8704 → 896 → 896.
    assert n_params(model.vlm.projector) == (2176 * 8704 + 8704) + (8704 * 896 + 896) + (896 * 896 + 896)
    # Action expert: LN(6272) + Linear(6272→896); 24 blocks of 8 Linear(896, 896) + gate + LN; LN + Linear(896→7).
    d = 896
    block = 8 * (d * d + d) + 1 + 2 * d
    expected_expert = 2 * 7 * d + (7 * d * d + d) + 24 * block + 2 * d + (d * 7 + 7)
    assert n_params(model.action_expert) == expected_expert
    assert round(expected_expert / 1e6) == 160
    # every linear layer of the VLM, listed before LoRA wraps any: all of them but the tied lm_head get LoRA
    linears = [(n, m.in_features, m.out_features) for n, m in model.vlm.named_modules() if isinstance(m, torch.nn.Linear)]
    assert {n.split(".")[0] for n, _, _ in linears} == {"vision", "projector", "llm"}
    # LoRA r=64 on every LLM linear: q, k, v, o, gate, up, down per layer.
    with torch.device("meta"):
        apply_lora(model, cfg.lora)
    per_layer = sum(linear_lora_count(i, o, 64) for i, o in [
        (896, 896), (896, 128), (896, 128), (896, 896), (896, 4864), (896, 4864), (4864, 896)])
    assert n_params(model.vlm.llm, lambda n: "lora_" in n) == 24 * per_layer == 35_192_832
    # ... and on every other VLM linear; nothing else gets LoRA (lm_head is tied and excluded).
    expected_lora = sum(linear_lora_count(i, o, 64) for n, i, o in linears if n != "llm.lm_head")
    assert n_params(model, lambda n: "lora_" in n) == expected_lora
    assert not hasattr(model.vlm.llm.lm_head, "base_layer")


def smooth_batch(model, n=2, seed=0):
    rng = np.random.default_rng(seed)
    a0, a1 = rng.uniform(-1, 1, (n, 1, 7)), rng.uniform(-1, 1, (n, 1, 7))
    actions = a0 + (a1 - a0) * np.linspace(0, 1, 8)[None, :, None]
    instructions = ["pick up the red cube and place it in the bowl", "push the plate"][:n]
    images = rng.integers(0, 256, (n, 2, 64, 64, 3), dtype=np.uint8)
    return model.processor(instructions, images, rng.normal(size=(n, 8)), actions)


def test_prompt_is_the_published_chat_template():
    from prismatic.models.processing import build_prompt

    # docs/DESIGN.md §1's template; the instruction lower-cased (as OpenVLA's scripts pass it), its full stop dropped
    assert build_prompt("  Put the Bowl on the plate. ") == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat action should the robot take to put the bowl on the plate?<|im_end|>\n"
        "<|im_start|>assistant\n")


def test_the_vision_gate_scales_the_vision_logits():
    torch.manual_seed(0)
    block = ExpertBlock(8, 2, self_attn=False)
    x, h_act = torch.randn(1, 3, 8), torch.randn(1, 4, 8)
    h_vis = [torch.randn(1, 5, 8) for _ in range(2)]
    assert block.gate.item() == 0.0
    with torch.no_grad():
        attn = [block.attention(x, h_act, h)[0] for h in h_vis]
        assert not torch.allclose(attn[0], attn[1])  # g = 0: σ = 0.5, the vision keys count
        block.gate.fill_(-50.0)  # σ(g) ≈ 0: every vision logit 0, whatever the vision keys
        attn = [block.attention(x, h_act, h)[0] for h in h_vis]
    torch.testing.assert_close(attn[0], attn[1])
    vis = attn[0][..., 4:]  # after the 4 action-side keys
    torch.testing.assert_close(vis, vis[..., :1].expand_as(vis))


def test_tiny_forward_shapes(tiny_vla):
    batch = smooth_batch(tiny_vla)
    out = tiny_vla(**batch, keep_states=True)
    cfg = tiny_vla.config
    assert out.actions.shape == (2, 8, 7)
    assert out.loss.ndim == 0
    assert len(out.act_states) == len(out.vis_states) == cfg.llm.num_layers + 1
    assert out.act_states[-1].shape == (2, cfg.num_action_queries, cfg.llm.hidden_size)
    assert out.vis_states[-1].shape == (2, 2 * 16, cfg.llm.hidden_size)  # 2 images × 4×4 patches of 16 px



def test_expert_blocks_read_the_query_and_vision_states_with_the_proprio_token_among_the_query_keys(tiny_vla):
    batch = smooth_batch(tiny_vla)
    seen = []
    hook = tiny_vla.action_expert.blocks[0].register_forward_hook(lambda _m, args, _o: seen.append(args))
    try:
        out = tiny_vla(**batch, keep_states=True)
    finally:
        hook.remove()
    # layer 0's states are the LLM's inputs: the learned queries, and the projected patches (none of the text)
    vis = tiny_vla.vlm.projector(tiny_vla.vlm.vision(batch["pixel_values"]))
    torch.testing.assert_close(out.vis_states[0], vis)
    torch.testing.assert_close(out.act_states[0], tiny_vla.action_queries.expand(2, -1, -1))
    (_, act_keys, vis_keys), = seen  # block 0 reads layer 1, the proprio token last among the query-side keys
    proprio = tiny_vla.proprio_proj(batch["proprio"]).unsqueeze(1)
    torch.testing.assert_close(act_keys, torch.cat([out.act_states[1], proprio], 1))
    torch.testing.assert_close(vis_keys, out.vis_states[1])


def test_sequence_layout_puts_vision_after_first_token_and_queries_after_text(tiny_vla):
    model = tiny_vla
    ids, lens = model.processor.tokenize(["pick up the cube", "push the red ball to the left zone"])
    assert lens[0] < lens[1]
    pixels = torch.rand(2, 2, 3, 64, 64)
    x, query_pos, v = model.build_sequence(ids, lens, pixels)
    emb = model.vlm.llm.get_input_embeddings()(ids)
    vis = model.vlm.projector(model.vlm.vision(pixels))
    q = model.config.num_action_queries
    for b in range(2):
        n = int(lens[b])
        torch.testing.assert_close(x[b, 0], emb[b, 0])
        torch.testing.assert_close(x[b, 1 : 1 + v], vis[b])
        torch.testing.assert_close(x[b, 1 + v : v + n], emb[b, 1:n])
        assert query_pos[b].tolist() == list(range(v + n, v + n + q))
        torch.testing.assert_close(x[b, v + n : v + n + q], model.action_queries)
        torch.testing.assert_close(x[b, v + n + q :], emb[b, n:])  # pads go last


def test_padding_does_not_change_predictions(tiny_vla):
    model = tiny_vla.eval()
    batch = smooth_batch(model)
    try:
        both = model(**batch).actions
        alone = model(**{k: v[1:2] if k != "input_ids" else v[1:2, : int(batch["text_lens"][1])]
                         for k, v in batch.items()}).actions
        short = model(**{k: v[0:1] if k != "input_ids" else v[0:1, : int(batch["text_lens"][0])]
                         for k, v in batch.items()}).actions
    finally:
        model.train()  # the session model is shared: later tests expect it as built
    torch.testing.assert_close(both[1:2], alone, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(both[0:1], short, atol=1e-5, rtol=1e-4)


def test_action_loss_is_l1_or_mse_of_the_predicted_chunk(tiny_vla):
    batch = smooth_batch(tiny_vla)

    def run(**kw):  # the same expert input noise on every call
        torch.manual_seed(0)
        return tiny_vla(**batch, **kw)

    out = run()
    err = (out.actions - batch["actions"]).double()
    assert out.loss.item() == pytest.approx(err.abs().mean().item(), rel=1e-5)
    assert out.act_states is None and out.vis_states is None  # kept only when asked
    assert run(action_loss="mse").loss.item() == pytest.approx(err.pow(2).mean().item(), rel=1e-5)
    with pytest.raises(ValueError, match="action_loss is 'huber'"):
        tiny_vla(**batch, action_loss="huber")


def test_expert_input_noise_is_drawn_in_training_only():
    model = build_vla("tiny", BaseModelConfig(random_seed=0), seed=0)
    batch = smooth_batch(model)

    def actions(seed):
        torch.manual_seed(seed)
        with torch.no_grad():
            return model(**batch).actions

    assert model.training and torch.equal(actions(0), actions(0)) and not torch.allclose(actions(0), actions(1))
    model.eval()
    assert torch.equal(actions(0), actions(1))


def test_gradients_reach_only_lora_queries_proprio_and_expert():
    model = build_vla("tiny", BaseModelConfig(random_seed=0), seed=0)
    model(**smooth_batch(model)).loss.backward()
    # LoRA B starts at zero, so A gets no gradient on the first step; B, and everything from scratch, does.
    for name, p in model.named_parameters():
        trainable = ".lora_" in name or name.startswith(("action_queries", "proprio_proj.", "action_expert."))
        assert p.requires_grad == trainable, name
        if not trainable:
            assert p.grad is None, name
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(grads[n] is not None and grads[n].abs().sum() > 0 for n in grads if ".lora_B." in n)
    assert grads["action_queries"].abs().sum() > 0
    assert grads["proprio_proj.0.weight"].abs().sum() > 0
    assert grads["action_expert.blocks.0.q_vis.weight"].abs().sum() > 0
    assert grads["action_expert.blocks.0.gate"].abs().sum() > 0
    from prismatic.models.pretrained import count_parameters

    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert count_parameters(model) == n_params(model) > count_parameters(model, trainable_only=True) == n_trainable


def test_baseline_and_mergevla_experts_differ_exactly_in_the_self_attention_path():
    cross = MergeVLA(get_config("tiny")).action_expert
    base = MergeVLA(get_config("tiny", expert_arch="self_attn")).action_expert
    cross_names, base_names = set(dict(cross.named_parameters())), set(dict(base.named_parameters()))
    extra = base_names - cross_names
    assert cross_names < base_names
    assert extra == {f"blocks.{i}.{p}_self.{w}" for i in range(4) for p in "qkv" for w in ("weight", "bias")}
    # With the self path's values zeroed and its logits pushed to -inf-like, the two compute the same thing
    # up to the gate function: set g so that tanh(g_base) == sigmoid(g_cross).
    base.load_state_dict(cross.state_dict(), strict=False)
    g = torch.tensor([0.3])
    for bc, bb in zip(cross.blocks, base.blocks):
        bc.gate.data.copy_(g)
        bb.gate.data.copy_(torch.atanh(torch.sigmoid(g)))
        bb.q_self.weight.data.zero_()
        bb.q_self.bias.data.fill_(0.0)
        bb.k_self.weight.data.zero_()
        bb.k_self.bias.data.fill_(-1e4)  # ≠ 0 needed: zero keys would still take softmax mass
        bb.q_self.bias.data[:] = 1.0  # queries·keys = -1e4·head_dim → exp underflows to exactly 0
    torch.manual_seed(0)
    x = torch.randn(2, 8, 128)
    h_act, h_vis = torch.randn(2, 17, 128), torch.randn(2, 128, 128)
    for bc, bb in zip(cross.blocks, base.blocks):
        torch.testing.assert_close(bc(x, h_act, h_vis), bb(x, h_act, h_vis), atol=1e-5, rtol=1e-5)


def test_one_hundred_steps_on_a_fixed_batch_cut_the_l1_loss_tenfold():
    torch.manual_seed(0)
    model = build_vla("tiny", BaseModelConfig(random_seed=0), seed=0)
    batch = smooth_batch(model)
    model.eval()
    before = model(**batch).loss.item()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(100):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    after = model(**batch).loss.item()
    assert after * 10 <= before, (before, after)


def test_save_load_gives_identical_predictions(tmp_path):
    model = build_vla("tiny", BaseModelConfig(random_seed=3), seed=1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))  # LoRA B nonzero, so LoRA matters
    model.norm_stats = {"action": {"q01": [-1.0] * 7, "q99": [1.0] * 7, "mask": [True] * 6 + [False]},
                        "proprio": {"q01": [-1.0] * 8, "q99": [1.0] * 8, "mask": [True] * 8}}
    batch = smooth_batch(model)
    save_pretrained(model, tmp_path / "ckpt", step=7)
    manifest = json.loads((tmp_path / "ckpt" / "manifest.json").read_text())
    assert manifest["step"] == 7 and manifest["config_name"] == "tiny" and manifest["lora"]["scale"] == 2.0
    assert manifest["base"]["kind"] == "random" and manifest["init_seed"] == 1
    reloaded = from_pretrained(tmp_path / "ckpt")
    assert torch.equal(model.predict_action(**batch), reloaded.predict_action(**batch))
    assert reloaded.norm_stats == model.norm_stats
    assert reloaded.manifest["step"] == 7 and reloaded.manifest["init_seed"] == 1
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        save_pretrained(model, tmp_path / "ckpt")


def test_checkpoint_on_another_base_is_refused(tmp_path):
    model = build_vla("tiny", BaseModelConfig(random_seed=0), seed=0)
    save_pretrained(model, tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="was trained on base"):
        from_pretrained(tmp_path / "ckpt", base=BaseModelConfig(random_seed=1))


def test_a_checkpoint_path_that_is_a_file_is_named_as_one(tmp_path):
    (tmp_path / "ckpt").write_text("")
    with pytest.raises(CheckpointError, match="checkpoint directory .*ckpt is a file, not a directory"):
        from_pretrained(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="checkpoint directory .*none does not exist"):
        from_pretrained(tmp_path / "none")


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_manifest", "bad_json", "wrong_format", "no_base",
                                    "bad_norm_stats", "bad_config"])
def test_corrupt_or_truncated_checkpoint_raises_a_clear_error(tmp_path, damage):
    model = build_vla("tiny", BaseModelConfig(random_seed=0), seed=0)
    d = save_pretrained(model, tmp_path / "ckpt")
    w, m = d / "model.safetensors", d / "manifest.json"
    if damage == "truncate":
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
        match = "truncated or corrupt"
    elif damage == "flip":
        data = bytearray(w.read_bytes())
        data[-5] ^= 0xFF
        w.write_bytes(bytes(data))
        match = "truncated or corrupt"
    elif damage == "no_manifest":
        m.unlink()
        match = "manifest.json is missing"
    elif damage == "bad_json":
        m.write_text("{not json")
        match = "not valid JSON"
    elif damage == "no_base":
        m.write_text(json.dumps({k: v for k, v in json.loads(m.read_text()).items() if k != "base"}))
        match = "field 'base' is None, expected the reference of the base"
    elif damage == "bad_config":
        manifest = json.loads(m.read_text())
        m.write_text(json.dumps({**manifest, "config": {**manifest["config"], "bogus": 1}}))
        match = r"manifest.json: field 'config' is invalid \(unknown VLAConfig fields \['bogus'\]"
    elif damage == "bad_norm_stats":
        m.write_text(json.dumps({**json.loads(m.read_text()), "norm_stats": {"action": {}}}))
        match = r"manifest.json field norm_stats.action.q01 is None, expected a list of 7"
    else:
        m.write_text(json.dumps({**json.loads(m.read_text()), "format": "something-else"}))
        match = "field 'format'"
    with pytest.raises(CheckpointError, match=match):
        from_pretrained(d)


def test_missing_base_gives_a_clear_error(tmp_path):
    from prismatic.models.loading import BaseModelError

    with pytest.raises(BaseModelError, match="no base model given"):
        build_vla("tiny", BaseModelConfig())
    with pytest.raises(BaseModelError, match="put the Hugging Face-format directory"):
        build_vla("tiny", BaseModelConfig(llm_path=tmp_path / "Qwen2.5-0.5B"))


def test_unknown_config_name_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown config_name 'huge'; "
                                         r"expected one of \['qwen25-dinosiglip-224px', 'tiny'\]"):
        get_config("huge")


def test_base_dir_round_trip(tmp_path):
    from prismatic.models.loading import random_base, save_base_dir

    cfg = get_config("tiny")
    tok = build_vla(cfg, BaseModelConfig(random_seed=5)).processor.tokenizer
    digest = save_base_dir(tmp_path / "base", cfg, random_base(cfg, 5), tok.to_str())
    model = build_vla(cfg, BaseModelConfig(base_dir=tmp_path / "base"))
    assert model.base_ref["sha256"] == digest == build_vla(cfg, BaseModelConfig(random_seed=5)).base_ref["sha256"]
    with pytest.raises(FileExistsError, match=r"base already holds base\.json, vlm\.safetensors, tokenizer\.json; "
                                              "refusing to overwrite it"):
        save_base_dir(tmp_path / "base", cfg, random_base(cfg, 5), tok.to_str())


def test_base_weights_that_do_not_fit_the_config_name_the_source_and_the_keys():
    from prismatic.models.loading import BaseModelError, load_vlm_weights, random_base
    from prismatic.models.modeling import PrismaticVLM

    cfg = get_config("tiny")
    state = random_base(cfg, 5)
    vlm = PrismaticVLM(cfg)
    load_vlm_weights(vlm, state, "seed 5", "tiny")
    assert torch.equal(vlm.projector[0].weight, state["projector.0.weight"])
    dropped = dict(state)
    del dropped["projector.0.weight"]
    with pytest.raises(BaseModelError, match=r"base weights \(seed 5\) do not fit config 'tiny'.*projector\.0\.weight"):
        load_vlm_weights(PrismaticVLM(cfg), dropped, "seed 5", "tiny")
    with pytest.raises(BaseModelError, match=r"unexpected \['extra.weight'\]"):
        load_vlm_weights(PrismaticVLM(cfg), {**state, "extra.weight": torch.zeros(1)}, "seed 5", "tiny")


# ------------------------------------------------------------------------------- the action expert, written out


def test_rope_turns_each_dimension_pair_by_position_times_its_frequency():
    from prismatic.models.modeling import rope

    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).expand(1, 1, 2, 4)  # (B, H, T, hd): the same vector at positions 0 and 1
    out = rope(x, base=100.0)[0, 0]
    torch.testing.assert_close(out[0], x[0, 0, 0])  # position 0 is not turned
    # position 1: the pairs (0, 2) and (1, 3) turn by 1 · 100^(-0/4) = 1 rad and 1 · 100^(-2/4) = 0.1 rad
    c1, s1, c2, s2 = math.cos(1.0), math.sin(1.0), math.cos(0.1), math.sin(0.1)
    torch.testing.assert_close(out[1], torch.tensor([c1 - 3 * s1, 2 * c2 - 4 * s2, 3 * c1 + s1, 4 * c2 + 2 * s2]))


def expert_block_by_hand(blk, x, h_act, h_vis):
    """ExpertBlock's formula: per key set its own q/k/v, rope on queries and keys, the vision logits times the gate
    (σ(g), or tanh(g) in the baseline), one softmax over [self (baseline only), act, vis] keys scaled by 1/√head_dim,
    then out = ReLU(Linear(LayerNorm(o_proj(heads merged) + x)))."""
    from prismatic.models.modeling import rope

    b, d, nh = x.shape[0], x.shape[-1], blk.heads
    hd = d // nh

    def heads(lin, t):  # (B, N, D) → (B, H, N, hd)
        return lin(t).reshape(b, t.shape[1], nh, hd).permute(0, 2, 1, 3)

    gate = torch.tanh(blk.gate) if blk.has_self_attn else torch.sigmoid(blk.gate)
    logits, values = [], []
    for name, keys in ([("self", x)] if blk.has_self_attn else []) + [("act", h_act), ("vis", h_vis)]:
        q, k = rope(heads(getattr(blk, f"q_{name}"), x)), rope(heads(getattr(blk, f"k_{name}"), keys))
        s = torch.einsum("bhqc,bhkc->bhqk", q, k) / math.sqrt(hd)
        logits.append(gate * s if name == "vis" else s)
        values.append(heads(getattr(blk, f"v_{name}"), keys))
    w = torch.softmax(torch.cat(logits, -1), dim=-1)
    out = torch.einsum("bhqk,bhkc->bqhc", w, torch.cat(values, 2)).reshape(b, -1, d)
    ln, lin = blk.ffn[0], blk.ffn[1]
    return torch.relu(lin(F.layer_norm(blk.o_proj(out) + x, (d,), ln.weight, ln.bias, ln.eps)))


@pytest.mark.parametrize("self_attn", [False, True])
def test_expert_block_computes_its_formula(self_attn):
    torch.manual_seed(0)
    blk = ExpertBlock(8, 2, self_attn=self_attn)
    with torch.no_grad():
        for p in blk.parameters():  # LayerNorm affine and biases too: nothing left at a neutral init
            p.normal_(0.0, 0.5)
        blk.gate.fill_(0.7)
        x, h_act, h_vis = torch.randn(2, 3, 8), torch.randn(2, 4, 8), torch.randn(2, 5, 8)
        got, want = blk(x, h_act, h_vis), expert_block_by_hand(blk, x, h_act, h_vis)
    assert (want > 0).float().mean() > 0.1  # not all ReLU'd away
    torch.testing.assert_close(got, want)


def test_action_expert_runs_norm_projection_relu_then_block_i_on_layer_i_plus_one():
    from prismatic.models.modeling import ActionExpert

    cfg = get_config("tiny")
    torch.manual_seed(0)
    expert = ActionExpert(cfg)
    d, n_layers = cfg.llm.hidden_size, cfg.llm.num_layers
    with torch.no_grad():
        for p in expert.parameters():
            if p.ndim == 1:  # biases, LayerNorm affines, gates: off their neutral init
                p.normal_(0.0, 0.5)
    act = [torch.randn(2, 3, d) for _ in range(n_layers + 1)]
    vis = [torch.randn(2, 5, d) for _ in range(n_layers + 1)]
    proprio = torch.randn(2, 1, d)

    def by_hand(x):  # x: the expert's (B, chunk_len, action_dim · D) input
        x = torch.relu(expert.in_proj(expert.in_norm(x)))
        for i, blk in enumerate(expert.blocks):
            x = blk(x, torch.cat([act[i + 1], proprio], 1), vis[i + 1])
        return expert.out_proj(expert.out_norm(x))

    with torch.no_grad():
        expert.eval()
        got = expert(act, vis, proprio)
        assert got.shape == (2, cfg.chunk_len, cfg.action_dim)
        torch.testing.assert_close(got, by_hand(torch.zeros(2, cfg.chunk_len, cfg.action_dim * d)))
        expert.train()  # the zero input plus noise of std expert_noise_std
        torch.manual_seed(1)
        got = expert(act, vis, proprio)
        torch.manual_seed(1)
        want = by_hand(cfg.expert_noise_std * torch.randn(2, cfg.chunk_len, cfg.action_dim * d))
    torch.testing.assert_close(got, want)


def test_projector_is_linear_gelu_linear_gelu_linear():
    from prismatic.models.modeling import make_projector

    torch.manual_seed(0)
    proj = make_projector(6, 4)
    x = torch.randn(2, 3, 6)
    h = F.gelu(F.linear(x, proj[0].weight, proj[0].bias))  # exact GELU, as Prismatic's nn.GELU()
    h = F.gelu(F.linear(h, proj[2].weight, proj[2].bias))
    with torch.no_grad():
        torch.testing.assert_close(proj(x), F.linear(h, proj[4].weight, proj[4].bias))
    assert proj[0].out_features == 24  # 4 × vision_dim


def test_llm_settings_reach_the_qwen2_model():
    """rope_theta changes no shape: a config that lost it would still load every weight and run wrong."""
    import dataclasses

    from prismatic.models.modeling import Qwen2ForCausalLM, qwen2_hf_config

    cfg = get_config("tiny")
    cfg.llm = dataclasses.replace(cfg.llm, rope_theta=5e5)
    llm = Qwen2ForCausalLM(qwen2_hf_config(cfg))
    head_dim = cfg.llm.hidden_size // cfg.llm.num_heads
    inv_freq = llm.model.rotary_emb.inv_freq
    torch.testing.assert_close(inv_freq[1], torch.tensor(5e5 ** (-2 / head_dim)))


# --------------------------------------------------------------------------------------------------- LoRA and init


def test_lora_adds_alpha_over_r_times_b_a_x_with_the_configured_dropout():
    from prismatic.models.configuration import LoRAConfig

    model = MergeVLA(get_config("tiny"))
    apply_lora(model, LoRAConfig(r=4, alpha=12, dropout=0.25))
    layer = model.vlm.projector[0]
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert a.shape == (4, layer.in_features) and b.shape == (layer.out_features, 4)
    assert isinstance(layer.lora_dropout["default"], torch.nn.Dropout) and layer.lora_dropout["default"].p == 0.25
    model.eval()  # no dropout
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        b.normal_()
        torch.testing.assert_close(layer(x), layer.base_layer(x) + 3.0 * (x @ a.T @ b.T))  # scale 12 / 4


def test_trainable_parts_are_initialised_from_the_seed_alone(tiny_vla):
    """Whatever the base weights, the build order or the global RNG: experts of one seed start identical."""
    from prismatic.models.lora import init_trainable

    cfg = get_config("tiny")
    want = build_vla(cfg, BaseModelConfig(random_seed=1), seed=2).trainable_state_dict()
    model = MergeVLA(cfg)
    apply_lora(model, cfg.lora)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    torch.manual_seed(5)
    init_trainable(model, 2)
    after = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(3))  # the global RNG is left where it was
    got = model.trainable_state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    # every trainable tensor is reset, whatever it held
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.fill_(0.5)
    init_trainable(model, 2)
    assert all(torch.equal(v, want[k]) for k, v in model.trainable_state_dict().items())
    # what they are set to: gates 0, queries N(0, 0.02²), LoRA A uniform in ±1/√fan_in, LoRA B 0
    assert all(blk.gate.item() == 0.0 for blk in model.action_expert.blocks)
    q = model.action_queries
    assert abs(q.std().item() - 0.02) < 0.002 and abs(q.mean().item()) < 0.002
    for name, p in model.named_parameters():
        if ".lora_A." in name:
            bound = 1 / math.sqrt(p.shape[1])
            assert 0.9 * bound < p.abs().max().item() <= bound, name
        elif ".lora_B." in name:
            assert not p.any(), name
    assert not torch.equal(tiny_vla.action_queries, want["action_queries"])  # seed 0 is another start


# ------------------------------------------------------------------------------------------------ the VLA's API


def test_predict_action_runs_without_the_training_noise_and_restores_the_mode(tiny_vla):
    batch = smooth_batch(tiny_vla)
    tiny_vla.eval()
    try:
        evaluated = tiny_vla.predict_action(**batch)
        assert not tiny_vla.training
    finally:
        tiny_vla.train()
    assert torch.equal(tiny_vla.predict_action(**batch), evaluated)
    assert tiny_vla.training


def test_per_task_queries_take_the_place_of_the_learned_queries(tiny_vla):
    q = torch.randn(2, tiny_vla.config.num_action_queries, tiny_vla.config.llm.hidden_size)

    class PerTask(torch.nn.Module):
        def forward(self, b):
            return q[:b]

    ids, lens = tiny_vla.processor.tokenize(["pick up the cube", "push the red ball to the left zone"])
    tiny_vla.per_task_queries = PerTask()
    try:
        x, query_pos, _ = tiny_vla.build_sequence(ids, lens, torch.rand(2, 2, 3, 64, 64))
    finally:
        tiny_vla.per_task_queries = None
    for b in range(2):
        torch.testing.assert_close(x[b, query_pos[b]], q[b])


# ---------------------------------------------------------------------------------------- reload details


def test_reloaded_model_keeps_its_init_seed_and_a_checkpoint_missing_a_tensor_is_refused(tmp_path):
    """The init seed is what merging checks experts share: a reload that saves again must keep it. And a checkpoint
    missing a trainable tensor would otherwise leave that part at its random initialisation."""
    save_pretrained(build_vla("tiny", BaseModelConfig(random_seed=0), seed=3), tmp_path / "ckpt")
    reloaded = from_pretrained(tmp_path / "ckpt")
    assert reloaded.init_seed == 3
    save_pretrained(reloaded, tmp_path / "again")
    assert load_checkpoint(tmp_path / "again", CHECKPOINT_KIND)[1]["init_seed"] == 3
    tensors, manifest = load_checkpoint(tmp_path / "ckpt", CHECKPOINT_KIND)
    for k in ("format", "format_version", "weights_sha256"):
        manifest.pop(k)
    save_checkpoint(tmp_path / "extra", {**tensors, "action_expert.extra": torch.zeros(1)}, manifest, CHECKPOINT_KIND)
    del tensors["action_queries"]
    save_checkpoint(tmp_path / "partial", tensors, manifest, CHECKPOINT_KIND)
    with pytest.raises(CheckpointError, match=r"partial/model\.safetensors: tensor names differ from config 'tiny' "
                                              r"\(missing \['action_queries'\], unexpected \[\]\)"):
        from_pretrained(tmp_path / "partial")
    # a tensor the model has no place for would be dropped silently by the non-strict load
    with pytest.raises(CheckpointError, match=r"extra/model\.safetensors: tensor names differ from config 'tiny' "
                                              r"\(missing \[\], unexpected \['action_expert\.extra'\]\)"):
        from_pretrained(tmp_path / "extra")


# ------------------------------------------------------------------------------- processor and config details


def _processor_with_pad_id(pad_id: int, image_size: int = 64):
    """The tiny vocabulary with the pad token moved to `pad_id` (Qwen's pad is 151643, not 0)."""
    from tokenizers import Tokenizer, models

    from prismatic.models.processing import PAD_TOKEN, SPECIAL_TOKENS, UNK_TOKEN, VLAProcessor, build_tiny_tokenizer

    tiny = build_tiny_tokenizer()
    vocab = tiny.get_vocab()
    other = next(w for w, i in vocab.items() if i == pad_id)
    vocab[other], vocab[PAD_TOKEN] = vocab[PAD_TOKEN], pad_id
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    tok.normalizer, tok.pre_tokenizer = tiny.normalizer, tiny.pre_tokenizer
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return VLAProcessor(tok, image_size, 512)


def test_short_prompts_are_padded_with_the_pad_token():
    proc = _processor_with_pad_id(7)
    ids, lens = proc.tokenize(["pick up the cube", "push the red ball to the left zone"])
    assert proc.pad_id == 7 and ids.shape == (2, int(lens[1]))
    assert ids[0, : lens[0]].tolist() == proc.encode("pick up the cube")
    assert ids[0, lens[0]:].tolist() == [7] * int(lens[1] - lens[0])
    assert ids[1].tolist() == proc.encode("push the red ball to the left zone") and 7 not in ids[1].tolist()


def test_processor_images_are_channels_first_in_zero_one():
    from prismatic.models.processing import VLAProcessor, build_tiny_tokenizer

    proc = VLAProcessor(build_tiny_tokenizer(), 4, 512)
    x = np.arange(1 * 2 * 4 * 4 * 3, dtype=np.uint8).reshape(1, 2, 4, 4, 3)  # every pixel and channel distinct
    out = proc.images(x)
    assert out.shape == (1, 2, 3, 4, 4) and out.dtype == torch.float32
    torch.testing.assert_close(out, torch.from_numpy(x).permute(0, 1, 4, 2, 3).float() / 255)  # [b, n, c, row, col]
    with pytest.raises(ValueError, match=r"images must be \(batch, cameras, H, W, 3\), got \(2, 4, 4, 3\)"):
        proc.images(x[0])


def test_processor_downscaling_averages_thin_lines_instead_of_dropping_them():
    """256 → 64 px: a one-pixel line every 4 columns must read as 1/4 grey (antialiased), not vanish or dominate."""
    from prismatic.models.processing import VLAProcessor, build_tiny_tokenizer

    x = np.zeros((1, 1, 256, 256, 3), np.uint8)
    x[..., ::4, :] = 255
    out = VLAProcessor(build_tiny_tokenizer(), 64, 512).images(x)
    torch.testing.assert_close(out[..., 2:-2], torch.full_like(out[..., 2:-2], 0.25), atol=0.02, rtol=0)


def test_a_tokenizer_larger_than_the_llm_vocabulary_is_refused():
    from prismatic.models.processing import VLAProcessor, build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    n = tok.get_vocab_size()
    VLAProcessor(tok, 64, n)
    with pytest.raises(ValueError, match=f"tokenizer has {n} tokens but the LLM only {n - 1}"):
        VLAProcessor(tok, 64, n - 1)


def test_get_config_overrides_are_checked():
    assert get_config("tiny", chunk_len=4).chunk_len == 4
    with pytest.raises(ValueError, match=r"unknown VLAConfig field 'chunk_length'"):
        get_config("tiny", chunk_length=4)
    with pytest.raises(ValueError, match=r"expert_arch is 'self-attn', expected one of \['cross_attn', 'self_attn'\]"):
        get_config("tiny", expert_arch="self-attn")


def test_config_survives_a_json_round_trip_and_bad_fields_are_named():
    from prismatic.models.configuration import VLAConfig

    for name in ("tiny", "qwen25-dinosiglip-224px"):
        cfg = get_config(name)
        assert VLAConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg  # JSON turns tuples into lists
    d = get_config("tiny").to_dict()
    with pytest.raises(ValueError, match=r"unknown VLAConfig fields \['bogus'\]"):
        VLAConfig.from_dict({**d, "bogus": 1})
    with pytest.raises(ValueError, match=r"VLAConfig field 'llm' is 5, expected an object of LLMConfig fields"):
        VLAConfig.from_dict({**d, "llm": 5})
    with pytest.raises(ValueError, match=r"unknown LLMConfig fields \['bogus'\] in 'llm'"):
        VLAConfig.from_dict({**d, "llm": {**d["llm"], "bogus": 1}})
    # a DINOv2 config without hidden_act is not given SigLIP's legacy activation
    dino = {k: v for k, v in d["dino"].items() if k != "hidden_act"}
    assert VLAConfig.from_dict({**d, "dino": dino}).dino.hidden_act == "gelu"


def test_tiny_tokenizer_reads_the_whole_prompt_every_time():
    from prismatic.models.processing import VLAProcessor, build_tiny_tokenizer

    proc = VLAProcessor(build_tiny_tokenizer(), 64, 512)
    expected = ["<|im_start|>", "system", "you", "are", "qwen", ",", "created", "by", "alibaba", "cloud", ".", "you",
                "are", "a", "helpful", "assistant", ".", "<|im_end|>", "<|im_start|>", "user", "what", "action",
                "should", "the", "robot", "take", "to", "pick", "up", "the", "cube", "?", "<|im_end|>", "<|im_start|>",
                "assistant"]
    for _ in range(2):  # the second time from the processor's cache
        assert [proc.tokenizer.id_to_token(i) for i in proc.encode("Pick up the cube.")] == expected


def test_tiny_vocabulary_ids_are_positions_in_the_list_and_a_repeated_word_keeps_its_first_id(tmp_path):
    from pathlib import Path

    from prismatic.models.processing import SPECIAL_TOKENS, TINY_VOCAB_FILE, build_tiny_tokenizer

    words = [w.strip() for w in TINY_VOCAB_FILE.read_text().splitlines() if w.strip() and not w.startswith("#")]
    vocab = build_tiny_tokenizer().get_vocab()
    assert len(set(words)) == len(words)  # a repeat takes no id, so every id after it would not be its position
    assert vocab == {w: i for i, w in enumerate((*SPECIAL_TOKENS, *words))}
    shipped = json.loads(Path("pretrained_models/tabletop4-tiny-base/tokenizer.json").read_text())["model"]["vocab"]
    assert vocab == shipped  # the shipped base was trained with these ids
    f = tmp_path / "vocab.txt"
    f.write_text("# a comment\npick\nplace\npick\nbowl\n")
    assert {w: i for w, i in build_tiny_tokenizer(f).get_vocab().items() if i >= len(SPECIAL_TOKENS)} == {
        "pick": 4, "place": 5, "bowl": 6}
