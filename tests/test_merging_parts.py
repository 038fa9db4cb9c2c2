"""TALL masks and their packing, per-module rules, streaming safetensors I/O, the model layout."""

import json
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from model_merging.algorithms import RetainParams, TiesParams
from model_merging.errors import MergeError
from model_merging.layout import PART_GROUPS, initial_scratch_state, model_layout, part_group
from model_merging.masks import (
    MaskStats,
    apply_mask,
    pack_mask,
    packed_task_masks,
    selfish_ratio,
    tall_masks,
    unpack_mask,
)
from model_merging.rules import group_of, params_for, parse_rule, parse_rules
from model_merging.tensor_files import SafetensorsReader, SafetensorsStreamWriter, TensorSpec
from prismatic.models import get_config

# -------------------------------------------------------------------------------------------------- masks


def test_tall_masks_hand_values_and_selfish_ratio():
    t1, t2 = torch.tensor([1.0, 0.2, 0.0]), torch.tensor([-1.0, 1.0, 0.0])
    merged = t1 + t2  # [0, 1.2, 0]
    # S1 = |τ1| > 0.6|τ_m − τ1| = [1 > .6, .2 > .6, 0 > 0]; S2 = [1 > .6, 1 > .12, 0 > 0]
    s1, s2 = tall_masks([t1, t2], merged, 0.6)
    assert s1.tolist() == [True, False, False] and s2.tolist() == [True, True, False]
    stats = MaskStats()
    stats.add([s1, s2])
    assert (stats.total, stats.none, stats.selfish, stats.shared, stats.per_task) == (3, 1, 1, 1, [1, 2])
    assert stats.selfish_ratio == pytest.approx(1 / 3) and stats.selfish_ratio_active == pytest.approx(1 / 2)
    assert selfish_ratio([s1, s2]) == pytest.approx(1 / 3)


def test_lambda_zero_selects_every_nonzero_entry():
    g = torch.Generator().manual_seed(0)
    taus = [torch.randn(40, generator=g) * (torch.rand(40, generator=g) > 0.3) for _ in range(3)]
    for t, m in zip(taus, tall_masks(taus, sum(taus), 0.0)):
        assert torch.equal(m, t != 0)
    with pytest.raises(ValueError, match=">= 0"):
        tall_masks(taus, sum(taus), -0.1)


@pytest.mark.parametrize("shape", [(3, 5), (8,), (1,), (2, 3, 7)])
def test_pack_matches_numpy_packbits_and_round_trips(shape):
    g = torch.Generator().manual_seed(1)
    m = torch.rand(shape, generator=g) > 0.5
    packed = pack_mask(m)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-m.numel() // 8)
    assert np.array_equal(packed.numpy(), np.packbits(m.numpy().reshape(-1)))
    assert torch.equal(unpack_mask(packed, shape), m)
    with pytest.raises(ValueError, match="needs"):
        unpack_mask(packed[:-1] if packed.numel() > 1 else torch.zeros(2, dtype=torch.uint8), shape)


def test_chunked_packed_masks_equal_whole_tensor_masks():
    g = torch.Generator().manual_seed(3)
    taus = [torch.randn(301, 433, generator=g) for _ in range(3)]  # 130333 entries: 2+ chunks, not a multiple of 8
    merged = sum(taus)
    stats = MaskStats()
    packed = packed_task_masks(taus, merged, 0.6, stats=stats)
    whole = tall_masks(taus, merged, 0.6)
    assert all(torch.equal(p, pack_mask(w)) for p, w in zip(packed, whole))
    ref = MaskStats()
    ref.add(whole)
    assert stats == ref and stats.per_task == [int(w.sum()) for w in whole]
    assert stats.density() == [int(w.sum()) / w.numel() for w in whole]
    given = packed_task_masks(None, merged, masks=whole)
    assert all(torch.equal(p, q) for p, q in zip(packed, given))


def test_packed_masks_at_lambda_0_keep_exactly_each_tasks_nonzero_entries():
    # trimmed (sparse) task vectors: |τ_m| > 0·|τ_merge − τ_m| holds where τ_m ≠ 0, nowhere else (not where both are 0)
    taus = [torch.tensor([1.0, 0.0, 0.0, -2.0, 0.0]), torch.tensor([0.0, 0.0, 3.0, 1.0, 0.0])]
    merged = torch.tensor([1.0, 0.0, 3.0, -1.0, 0.0])
    for p, t in zip(packed_task_masks(taus, merged, 0.0), taus):
        assert torch.equal(unpack_mask(p, t.shape), t != 0)


def test_apply_mask_is_theta0_plus_rescaled_masked_delta():
    w0, tau = torch.tensor([1.0, 1.0, 1.0]), torch.tensor([0.5, -2.0, 4.0])
    m = torch.tensor([True, False, True])
    assert torch.equal(apply_mask(w0, tau, m), torch.tensor([1.5, 1.0, 5.0]))
    assert torch.equal(apply_mask(w0, tau, m, torch.tensor(0.5)), torch.tensor([1.25, 1.0, 3.0]))
    assert torch.equal(apply_mask(w0, tau, None), w0 + tau)


# -------------------------------------------------------------------------------------------------- rules


def test_default_groups_follow_the_design_split():
    names = {"vlm.vision.dino.encoder.layer.0.attention.q_proj.weight": "vision",
             "vlm.projector.0.weight": "projector", "vlm.llm.model.layers.0.mlp.up_proj.weight": "llm",
             "action_queries": "action_queries", "proprio_proj.2.bias": "proprio",
             "action_expert.blocks.3.v_act.weight": "action_expert"}
    for n, g in names.items():
        assert group_of(n) == g
    with pytest.raises(MergeError, match="none of the groups"):
        group_of("something.else")


def test_rules_first_match_wins_with_group_names_and_regexes():
    rules = parse_rules([r"^vlm\.llm\.model\.layers\.1\. k=50", "llm k=80 merge_func=sum", "vision scale=0.5"],
                        TiesParams)
    base = TiesParams()
    assert params_for("vlm.llm.model.layers.1.self_attn.q_proj.weight", base, rules) == TiesParams(k=50.0)
    assert params_for("vlm.llm.model.layers.0.self_attn.q_proj.weight", base, rules) == \
        TiesParams(k=80.0, merge_func="sum")
    assert params_for("vlm.vision.siglip.x.weight", base, rules).scale == 0.5
    assert params_for("vlm.projector.0.weight", base, rules) is base
    assert parse_rule("llm sequential=false", RetainParams).overrides == (("sequential", False),)
    assert parse_rule("llm sequential=True", RetainParams).overrides == (("sequential", True),)


@pytest.mark.parametrize("text,msg", [
    ("llm", "expected 'PATTERN field=value"),
    ("llm kk=3", "has no field 'kk'"),
    ("llm k=abc", "cannot read 'abc'"),
    ("llm k", "is not field=value"),
    ("([ k=3", "neither a group name nor a valid regex"),
])
def test_bad_rules_are_named(text, msg):
    with pytest.raises(MergeError, match=msg):
        parse_rule(text, TiesParams)


# ------------------------------------------------------------------------------------------ tensor files


def test_stream_writer_output_reads_with_the_reference_library(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.uint8), "c": torch.tensor(2.5),
               "d": torch.randn(2, dtype=torch.float64)}
    specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    w = SafetensorsStreamWriter(tmp_path / "x.safetensors", specs, {"format": "test"})
    for n, t in tensors.items():
        w.write(n, t)
    digest = w.close()
    import hashlib

    assert digest == hashlib.sha256((tmp_path / "x.safetensors").read_bytes()).hexdigest()
    back = load_file(str(tmp_path / "x.safetensors"))
    assert set(back) == set(tensors) and all(torch.equal(back[n], t) for n, t in tensors.items())
    r = SafetensorsReader(tmp_path / "x.safetensors")
    assert r.metadata == {"format": "test"} and all(torch.equal(r.get(n), t) for n, t in tensors.items())


def test_stream_writer_refuses_out_of_plan_tensors(tmp_path):
    w = SafetensorsStreamWriter(tmp_path / "x.safetensors", [TensorSpec("a", torch.float32, (2,))])
    with pytest.raises(ValueError, match="expected tensor 'a' F32 \\[2\\]"):
        w.write("a", torch.zeros(3))
    with pytest.raises(ValueError, match="only 0 of 1"):
        w.close()


def test_reader_reads_reference_files_and_catches_truncation(tmp_path):
    f = tmp_path / "ref.safetensors"
    save_file({"w": torch.randn(64, 64), "bf": torch.randn(3).to(torch.bfloat16)}, str(f))
    r = SafetensorsReader(f)
    assert r.get("bf").dtype == torch.bfloat16 and r.specs["w"].shape == (64, 64)
    data = f.read_bytes()
    f.write_bytes(data[:-100])
    with pytest.raises(MergeError, match="truncated"):
        SafetensorsReader(f)
    f.write_bytes(data[:5])
    with pytest.raises(MergeError, match="too short"):
        SafetensorsReader(f)
    with pytest.raises(MergeError, match="no tensor named 'zz'"):
        r.get("zz")


# ------------------------------------------------------------------------------------------------- layout


def test_layout_heads_and_initial_state(tiny_vla):
    cfg = get_config("tiny")
    lay = model_layout(cfg)
    trainable = tiny_vla.trainable_state_dict()
    assert {f"{m}.lora_A.default.weight" for m in lay.lora_modules} == {k for k in trainable if ".lora_A." in k}
    last = cfg.num_expert_blocks - 1
    heads1 = lay.head_names(1)
    assert all(n.startswith((f"action_expert.blocks.{last}.", "action_expert.out_")) for n in heads1)
    assert "action_expert.out_proj.weight" in heads1 and f"action_expert.blocks.{last}.gate" in heads1
    assert len(lay.head_names(2)) > len(heads1) and lay.head_names(0) == []
    assert set(lay.head_names(1)) | set(lay.shared_names(1)) == set(lay.scratch)
    assert lay.head_module(f"action_expert.blocks.{last}.ffn.0.weight") == f"action_expert.blocks.{last}"
    # per_task_parts: exactly the named groups join the head; with all four nothing is averaged
    heads_q = lay.head_names(1, ("action_queries", "proprio_proj"))
    assert set(heads_q) - set(heads1) == {n for n in lay.scratch if n.startswith(("action_queries", "proprio_proj."))}
    assert lay.shared_names(1, PART_GROUPS) == [] and set(lay.head_names(1, PART_GROUPS)) == set(lay.scratch)
    assert lay.shared_names(0, PART_GROUPS) == []  # with L_h = 0 too: the final norm and head go with the blocks
    assert {part_group(n) for n in lay.shared_names(1)} == set(PART_GROUPS)
    assert part_group("action_expert.in_proj.weight") == "expert_input" and part_group("action_expert.out_proj.bias") == "shared_blocks"
    assert lay.head_module("proprio_proj.2.weight") == "proprio_proj" and lay.head_module("action_queries") == "action_queries"
    assert lay.head_module("action_expert.in_norm.bias") == "action_expert.in_norm"
    with pytest.raises(ValueError, match=r"per_task_parts \['lora'\]: expected a subset of"):
        lay.head_names(1, ("lora",))
    # RETAIN's θ_pre for the from-scratch parts is exactly where build_vla(seed=0) starts them
    init = initial_scratch_state(cfg, 0)
    assert set(init) == set(lay.scratch) and all(torch.equal(init[n], trainable[n]) for n in init)


# ------------------------------------------------------------------------------ tensor files: what is refused


def test_stream_writer_aligns_the_data_and_keeps_empty_tensors_in_the_plan(tmp_path):
    """Data starts 8-byte aligned whatever the header length; a zero-element tensor still takes its place."""
    for name in ("a", "ab", "abc", "abcd", "abcde", "abcdef", "abcdefg", "abcdefgh"):  # header lengths mod 8 all differ
        tensors = {name: torch.arange(3, dtype=torch.float32), "empty": torch.zeros(0, 2), "z": torch.tensor([7], dtype=torch.int64)}
        f = tmp_path / f"{name}.safetensors"
        w = SafetensorsStreamWriter(f, [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()])
        for n, t in tensors.items():
            w.write(n, t)
        w.close()
        (n_header,) = struct.unpack("<Q", f.read_bytes()[:8])
        assert n_header % 8 == 0, name
        back = load_file(str(f))
        assert all(torch.equal(back[n], t) for n, t in tensors.items())


def test_stream_writer_refuses_a_wrong_dtype_a_duplicate_plan_and_an_extra_tensor(tmp_path):
    with pytest.raises(ValueError, match="duplicate tensor names"):
        SafetensorsStreamWriter(tmp_path / "d.safetensors", [TensorSpec("a", torch.float32, (2,))] * 2)
    w = SafetensorsStreamWriter(tmp_path / "x.safetensors", [TensorSpec("a", torch.float32, (2,))])
    with pytest.raises(ValueError, match=r"expected tensor 'a' F32 \[2\], got 'a' F64 \[2\]"):
        w.write("a", torch.zeros(2, dtype=torch.float64))  # the bytes of a float64 are not those of a float32
    w.write("a", torch.zeros(2))
    with pytest.raises(ValueError, match="tensor 'b' written after the planned ones"):
        w.write("b", torch.zeros(2))
    w.close()


def _raw(path, header: dict, data: bytes, n_header=None):
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if n_header is None else n_header) + blob + data)


def test_reader_refuses_headers_that_do_not_describe_the_file(tmp_path):
    f = tmp_path / "x.safetensors"
    _raw(f, {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}, b"\0" * 12)
    with pytest.raises(MergeError, match=r"tensor 'w' spans 12 bytes, its shape needs 16"):
        SafetensorsReader(f)
    _raw(f, {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, n_header=10_000)
    with pytest.raises(MergeError, match=r"header length 10000 does not fit the file \(\d+ bytes\): truncated"):
        SafetensorsReader(f)
    _raw(f, {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8)
    assert torch.equal(SafetensorsReader(f).get("w"), torch.zeros(2))


# ----------------------------------------------------------------------- masks, rules, chunks, linalg, caching


def test_mask_inputs_are_checked():
    t = torch.tensor([1.0, -1.0])
    with pytest.raises(ValueError, match="finite number >= 0, got inf"):  # λ = ∞ would set no mask at all
        tall_masks([t], t, float("inf"))
    with pytest.raises(ValueError, match="finite number >= 0, got inf"):
        packed_task_masks([t], t, float("inf"))
    with pytest.raises(ValueError, match=r"needs 1 uint8 bytes, got 1 torch.int8"):
        unpack_mask(torch.tensor([3], dtype=torch.int8), (2,))


def test_apply_mask_keeps_the_weights_dtype():
    w0 = torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16)
    out = apply_mask(w0, torch.tensor([0.5, 0.25, 1.0]), torch.tensor([True, False, True]))
    assert out.dtype == torch.bfloat16 and torch.equal(out, torch.tensor([1.5, 2.0, 4.0], dtype=torch.bfloat16))


def test_all_finite_looks_at_every_chunk():
    from model_merging.chunks import all_finite, spans

    t = torch.zeros(3 << 20)
    assert all_finite(t)
    t[-1] = float("inf")  # in the last of three 1M-entry chunks
    assert not all_finite(t)
    assert list(spans(10, 4)) == [(0, 4), (4, 8), (8, 10)] and list(spans(0, 4)) == []


def test_regex_rules_are_searched_anywhere_in_the_name():
    rules = parse_rules([r"q_proj scale=0.5"], TiesParams)
    assert params_for("vlm.llm.model.layers.0.self_attn.q_proj.weight", TiesParams(), rules).scale == 0.5
    assert params_for("vlm.llm.model.layers.0.self_attn.k_proj.weight", TiesParams(), rules).scale == 1.0


def test_rank_cutoff_is_numpys_matrix_rank_tolerance_and_top_k_may_take_every_direction():
    from model_merging.linalg import rank_cutoff, top_right_singular_vectors

    # tol = s_max · max(shape) · eps: 1e-6 is below it for a 100 × 100 matrix (tol ≈ 1.2e-5), above it for 2 × 2
    s = torch.tensor([1.0, 1e-6])
    assert rank_cutoff(s, (100, 100)) == 1 == np.linalg.matrix_rank(np.diag([1.0, 1e-6] + [0.0] * 98).astype(np.float32))
    assert rank_cutoff(s, (2, 2)) == 2 and rank_cutoff(torch.zeros(3), (3, 3)) == 0
    w = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    r = top_right_singular_vectors(w, 3)  # k = min(out, in): the whole row space
    assert r.shape == (3, 5) and torch.allclose(r @ r.T, torch.eye(3), atol=1e-5)
    assert torch.allclose(w @ r.T @ r, w, atol=1e-5)
    with pytest.raises(ValueError, match=r"cannot take 4 singular vectors of a \(3, 5\) matrix"):
        top_right_singular_vectors(w, 4)


def test_masked_delta_linear_runs_each_samples_task_and_rebuilds_cached_weights_after_a_cast():
    import torch.nn as nn

    from model_merging.multi_expert import ExpertSelector, MaskedDeltaLinear

    base = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    delta = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    masks = [torch.tensor([[True, False, True], [False, False, False]]), torch.ones(2, 3, dtype=torch.bool)]
    selector = ExpertSelector()
    lin = MaskedDeltaLinear(base, delta, [pack_mask(m) for m in masks], [torch.tensor(1.0), torch.tensor(0.5)], selector)
    lin.cache = {}
    x = torch.ones(2, 3)
    selector.index = torch.tensor([1, 0])
    # task 0: W0 + S0 ⊙ τ = [[2, 0, 3], [0, 1, 0]] → row sums 5, 1; task 1: W0 + 0.5 τ = [[1.5, 1, 1.5], [2, 3.5, 3]]
    y = lin(x)
    assert torch.equal(y, torch.tensor([[4.0, 8.5], [5.0, 1.0]])) and sorted(lin.cache) == [0, 1]
    lin.double()  # the cached fp32 weights no longer fit: built again in the new dtype
    assert torch.equal(lin(x.double()), y.double())
