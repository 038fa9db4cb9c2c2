"""Merge methods against hand-computed values on tiny tensors, and their defining properties."""

import math

import pytest
import torch

from model_merging.algorithms import (
    METHODS,
    DareParams,
    KnotsParams,
    MergeContext,
    RetainParams,
    TaskArithmeticParams,
    TiesParams,
    TsvParams,
    WeightedAverageParams,
    WudiParams,
    generalized_task_arithmetic,
    merge_task_vectors,
    merge_tensors,
    trim_top_k,
)
from model_merging.errors import MergeError

T1 = torch.tensor([3.0, -1.0, 0.5, -2.0])
T2 = torch.tensor([-1.0, -2.0, 1.0, 4.0])


def merged(method, taus, params=None, **ctx):
    return merge_tensors(method, taus, params, MergeContext(**ctx)).tensor


def low_rank(seed, out=7, inp=5, r=2):
    g = torch.Generator().manual_seed(seed)
    left, right = torch.randn(out, r, generator=g), torch.randn(r, inp, generator=g)
    return left @ right, (left, right)


def test_every_method_is_registered():
    assert set(METHODS) == {"task_arithmetic", "ties", "dare", "weighted_average", "tsv", "knots", "wudi", "emr",
                            "retain"}


# ------------------------------------------------------------------------------------------ hand values


def test_task_arithmetic_hand_values():
    assert torch.equal(merged("task_arithmetic", [T1, T2]), torch.tensor([2.0, -3.0, 1.5, 2.0]))
    out = merged("task_arithmetic", [T1, T2], TaskArithmeticParams(scale=0.5))
    assert torch.equal(out, torch.tensor([1.0, -1.5, 0.75, 1.0]))


def test_ties_trims_elects_and_takes_disjoint_mean():
    # k=50: keep 2 of 4 per task → [3,0,0,-2], [0,-2,0,4]; Σ = [3,-2,0,2] → σ = [+,-,0,+];
    # entry 3: only task 2's +4 agrees with σ.
    assert torch.equal(merged("ties", [T1, T2], TiesParams(k=50)), torch.tensor([3.0, -2.0, 0.0, 4.0]))
    # k=100: σ = sign([2,-3,1.5,2]); entry 1: mean(-1,-2); entry 2: mean(.5,1)
    assert torch.equal(merged("ties", [T1, T2], TiesParams(k=100)), torch.tensor([3.0, -1.5, 0.75, 4.0]))
    assert torch.equal(merged("ties", [T1, T2], TiesParams(k=100, merge_func="sum")),
                       torch.tensor([3.0, -3.0, 1.5, 4.0]))


def test_trim_keeps_ceil_k_percent_and_ties_at_threshold():
    t = torch.tensor([1.0, -5.0, 2.0, 0.5, 3.0])
    assert torch.equal(trim_top_k(t, 40), torch.tensor([0.0, -5.0, 0.0, 0.0, 3.0]))
    assert torch.equal(trim_top_k(t, 41), torch.tensor([0.0, -5.0, 2.0, 0.0, 3.0]))  # ⌈2.05⌉ = 3
    assert torch.equal(trim_top_k(torch.tensor([2.0, -2.0, 1.0]), 34), torch.tensor([2.0, -2.0, 0.0]))
    assert torch.equal(trim_top_k(t, 0), torch.zeros(5))
    with pytest.raises(MergeError, match=r"\[0, 100\]"):
        trim_top_k(t, 120)


@pytest.mark.parametrize("shape", [(6, 9), (301, 401)], ids=["small", "several-chunks"])
def test_ties_k100_sum_is_the_release_behaviour(shape):
    g = torch.Generator().manual_seed(0)
    taus = [torch.randn(shape, generator=g) for _ in range(4)]
    # The release: elect σ = sign(Σ τ_m) and add up the entries that agree with it, no trimming.
    sigma = torch.sign(sum(taus))
    release = sum(t * ((t * sigma) > 0) for t in taus)
    assert torch.allclose(merged("ties", taus, TiesParams(k=100, merge_func="sum")), release, atol=1e-6)


def test_weighted_average_hand_values_and_weight_count():
    assert torch.equal(merged("weighted_average", [T1, T2]), torch.tensor([1.0, -1.5, 0.75, 1.0]))
    out = merged("weighted_average", [T1, T2], WeightedAverageParams(weights=(1.0, 0.5)))
    assert torch.equal(out, torch.tensor([2.5, -2.0, 1.0, 0.0]))
    with pytest.raises(MergeError, match="3 averaging weights given for 2 experts"):
        merged("weighted_average", [T1, T2], WeightedAverageParams(weights=(1.0, 1.0, 1.0)))


def test_emr_hand_values():
    a, b = torch.tensor([2.0, -1.0, 0.0, 3.0]), torch.tensor([-1.0, -2.0, 1.0, 1.0])
    out = merge_tensors("emr", [a, b])
    # σ = sign([1,-3,1,4]); τ_uni = σ · max agreeing |τ| = [2,-2,1,3]
    assert torch.equal(out.tensor, torch.tensor([2.0, -2.0, 1.0, 3.0]))
    assert [m.tolist() for m in out.masks] == [[True, True, False, True], [False, True, True, True]]
    assert out.rescalers[0].item() == pytest.approx(6 / 7) and out.rescalers[1].item() == pytest.approx(5 / 6)


@pytest.mark.parametrize("n", [50, 150001], ids=["small", "several-chunks"])
def test_emr_masks_reconstruct_each_sign_pattern(n):
    g = torch.Generator().manual_seed(1)
    taus = [torch.randn(n, generator=g) for _ in range(3)]
    out = merge_tensors("emr", taus)
    sigma = torch.sign(sum(taus))
    agree = torch.stack([(t * sigma) > 0 for t in taus])
    assert torch.equal(out.tensor, sigma * (torch.stack(taus).abs() * agree).amax(0))
    for t, a, r in zip(taus, agree, out.rescalers):
        assert r.item() == pytest.approx((t.abs().sum() / (out.tensor.abs() * a).sum()).item(), rel=1e-5)
    for t, m, r in zip(taus, out.masks, out.rescalers):
        task_view = r * m * out.tensor
        nz = task_view != 0
        assert torch.equal(nz, (t * sigma) > 0)  # kept exactly where the expert agrees with the elected sign
        assert torch.equal(torch.sign(task_view[nz]), torch.sign(t[nz]))  # and with the expert's own sign
        assert (task_view[nz].abs() > 0).all()


def test_tsv_of_parallel_tasks_is_their_average():
    # τ_m = s_m u vᵀ: U_cat = [u u] has polar factor [u u]/√2, so TSV gives (s1 + s2)/2 · u vᵀ.
    u, v = torch.tensor([[0.6], [0.8]]), torch.tensor([[1.0, 0.0]])
    out = merged("tsv", [2.0 * u @ v, 4.0 * u @ v])
    assert torch.allclose(out, 3.0 * u @ v, atol=1e-6)


def test_tsv_of_orthogonal_tasks_is_their_sum_and_1d_is_mean():
    t1, t2 = torch.tensor([[2.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [0.0, 3.0]])
    assert torch.allclose(merged("tsv", [t1, t2]), t1 + t2, atol=1e-6)
    assert torch.equal(merged("tsv", [T1, T2]), (T1 + T2) / 2)
    assert torch.equal(merged("tsv", [T1, T2], TsvParams(scale=0.5)), (T1 + T2) / 4)  # α applies to 1-D too


def test_knots_ties_on_identical_tasks_averages_and_ta_variant_is_task_arithmetic():
    e = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    # [τ τ] = √2 · e1 · (e1, e1)ᵀ/√2: each V block is (1/√2, 0); their disjoint mean is the same block.
    assert torch.allclose(merged("knots", [e, e], KnotsParams(k=100)), e, atol=1e-6)
    taus = [low_rank(s)[0] for s in range(3)]
    ta = merged("knots", taus, KnotsParams(merge="task_arithmetic"))
    assert torch.allclose(ta, sum(taus), atol=1e-4)


def test_knots_disjoint_tasks_add_up():
    t1, t2 = torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [0.0, 2.0]])
    assert torch.allclose(merged("knots", [t1, t2], KnotsParams(k=100)), t1 + t2, atol=1e-6)


def test_wudi_one_adam_step_by_hand_and_optimum():
    t1, t2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]])
    # start Σ = [2,1]; gradient 2(τ−τ1)τ1ᵀτ1/1 + 2(τ−τ2)τ2ᵀτ2/2 = [2,0] + [1,1] = [3,1] > 0:
    # Adam's first step moves every entry by -lr·sign(grad).
    out = merged("wudi", [t1, t2], WudiParams(lr=0.1, steps=1))
    assert torch.allclose(out, torch.tensor([[1.9, 0.9]]), atol=1e-6)
    # The optimum solves τ(G1 + G2/2) = τ1G1 + τ2G2/2 → τ = [1, 1].
    far = merged("wudi", [t1, t2], WudiParams(lr=0.01, steps=2000))
    assert torch.allclose(far, torch.tensor([[1.0, 1.0]]), atol=2e-2)


def test_wudi_weighs_each_task_by_its_norm():
    # three conflicting rows of different norms: A = Σ G_m/‖τ_m‖² = [[1.5,-.5],[-.5,1.5]], b = Σ τ_m G_m/‖τ_m‖² =
    # Σ τ_m = [1,4] (rank-1 rows), τ = b A⁻¹ = [3.5, 6.5]/2; unweighted the optimum is [1.82, 3.08]
    ts = [torch.tensor([[2.0, 0.0]]), torch.tensor([[-1.0, 1.0]]), torch.tensor([[0.0, 3.0]])]
    far = merged("wudi", ts, WudiParams(lr=0.01, steps=2000))
    assert torch.allclose(far, torch.tensor([[1.75, 3.25]]), atol=2e-2)


def test_knots_trims_and_elects_on_the_aligned_blocks():
    g = torch.Generator().manual_seed(3)
    taus = [torch.randn(6, 4, generator=g) for _ in range(3)]
    # by hand: an explicit SVD of [τ_1 τ_2 τ_3], TIES over the three 6×4 blocks of Vᵀ (a sign flip of a singular
    # pair flips that row in every block, and TIES's election follows it, so any SVD gives the same product)
    u, s, vh = torch.linalg.svd(torch.cat(taus, 1), full_matrices=False)
    blocks = [vh[:, 4 * i: 4 * (i + 1)] for i in range(3)]
    for k in (20.0, 100.0):
        want = (u * s) @ merged("ties", blocks, TiesParams(k=k))
        assert torch.allclose(merged("knots", taus, KnotsParams(k=k)), want, atol=1e-5)
    assert not torch.allclose(merged("knots", taus, KnotsParams(k=20)), merged("knots", taus, KnotsParams(k=100)))


@pytest.mark.parametrize("name,cls", [("ties", TiesParams), ("dare", DareParams), ("knots", KnotsParams)])
def test_scale_multiplies_the_merged_vector(name, cls):
    taus = [low_rank(s)[0] for s in range(3)]
    assert torch.equal(merged(name, taus, cls(scale=0.5)), 0.5 * merged(name, taus, cls()))


def test_dare_drops_and_rescales_reproducibly():
    t = torch.arange(1, 2001, dtype=torch.float32)
    p = DareParams(p=0.5)
    a = merged("dare", [t], p, name="x", seed=3)
    assert torch.equal(a, merged("dare", [t], p, name="x", seed=3))
    assert not torch.equal(a, merged("dare", [t], p, name="x", seed=4))
    assert not torch.equal(a, merged("dare", [t], p, name="y", seed=3))
    kept = a != 0
    assert torch.equal(a[kept], 2 * t[kept])  # survivors scaled by 1/(1-p)
    assert 0.45 < kept.float().mean().item() < 0.55
    with pytest.raises(MergeError, match=r"\[0, 1\)"):
        merged("dare", [t], DareParams(p=1.0))


def test_dare_then_ties_elects_signs_after_dropping():
    t1, t2 = torch.tensor([1.0, -1.0]), torch.tensor([-3.0, -1.0])
    out = merged("dare", [t1, t2], DareParams(p=0.0, then="ties"))  # TIES's disjoint mean by default
    assert torch.equal(out, torch.tensor([-3.0, -1.0]))
    t3 = torch.tensor([3.0, -1.0])
    assert torch.equal(merged("dare", [t1, t3], DareParams(p=0.0, then="ties")), torch.tensor([2.0, -1.0]))
    assert torch.equal(merged("dare", [t1, t3], DareParams(p=0.0, then="ties", merge_func="sum")),
                       torch.tensor([4.0, -2.0]))


def test_retain_sequential_and_per_group_alpha():
    p = RetainParams(alpha_vision=0.5, alpha_llm=0.25, alpha_action_expert=1.0)
    assert torch.equal(merged("retain", [T1, T2], p, group="vision"), 0.25 * T1 + 0.5 * T2)
    assert torch.equal(merged("retain", [T1, T2], p, group="projector"), 0.25 * T1 + 0.5 * T2)
    assert torch.equal(merged("retain", [T1], p, group="llm"), 0.25 * T1)
    assert torch.equal(merged("retain", [T1, T2], p, group="action_expert"), T2)  # α=1: last skill wins
    both = merged("retain", [T1, T2], RetainParams(alpha_llm=0.5, sequential=False), group="llm")
    assert torch.equal(both, 0.25 * (T1 + T2))
    with pytest.raises(MergeError, match="no vision/LLM/action-expert group"):
        merged("retain", [T1], p, name="mystery", group="")


# -------------------------------------------------------------------------------------------- properties

ONE_IN_ONE_OUT = [("task_arithmetic", None), ("ties", TiesParams(k=100)), ("ties", TiesParams(k=100, merge_func="sum")),
                  ("tsv", None), ("wudi", WudiParams(steps=20)), ("knots", KnotsParams(k=100)),
                  ("weighted_average", None), ("dare", DareParams(p=0.0))]


@pytest.mark.parametrize("name,params", ONE_IN_ONE_OUT)
def test_one_expert_in_that_expert_out(name, params):
    tau, factors = low_rank(7)
    assert torch.allclose(merged(name, [tau], params), tau, atol=1e-5)
    assert torch.allclose(merged(name, [tau], params, factors=(factors,)), tau, atol=1e-5)


def test_emr_with_masks_one_expert_is_that_expert():
    tau = low_rank(8)[0]
    out = merge_tensors("emr", [tau])
    assert torch.equal(out.rescalers[0] * out.masks[0] * out.tensor, tau)


@pytest.mark.parametrize("name,params", [("tsv", None), ("knots", None), ("knots", KnotsParams(k=100)),
                                         ("wudi", WudiParams(lr=1e-2, steps=30))])
def test_factored_svd_path_matches_dense(name, params):
    pairs = [low_rank(s, out=9, inp=6, r=2) for s in (1, 2, 3)]
    taus, factors = [p[0] for p in pairs], tuple(p[1] for p in pairs)
    dense = merged(name, taus, params)
    fact = merged(name, taus, params, factors=factors)
    assert torch.allclose(dense, fact, atol=1e-4), (dense - fact).abs().max()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_is_bitwise_deterministic(name):
    taus = [low_rank(s)[0] for s in (4, 5, 6)]
    params = WudiParams(steps=5) if name == "wudi" else None
    a = merge_tensors(name, taus, params, MergeContext(name="w", group="llm", seed=1))
    b = merge_tensors(name, taus, params, MergeContext(name="w", group="llm", seed=1))
    assert torch.equal(a.tensor, b.tensor)


def test_ties_trim_on_several_chunks_matches_whole_tensor_formula():
    g = torch.Generator().manual_seed(2)
    taus = [torch.randn(123457, generator=g) for _ in range(3)]
    trimmed = []
    for t in taus:  # whole-tensor reference: keep the ⌈20% n⌉ largest magnitudes
        keep = math.ceil(0.2 * t.numel())
        thr = t.abs().sort(descending=True).values[keep - 1]
        trimmed.append(torch.where(t.abs() >= thr, t, torch.zeros_like(t)))
    sigma = torch.sign(sum(trimmed))
    agree = [(t * sigma) > 0 for t in trimmed]
    ref = sum(t * a for t, a in zip(trimmed, agree)) / torch.stack(agree).sum(0).clamp(min=1)
    assert torch.allclose(merged("ties", taus, TiesParams(k=20)), ref, atol=1e-6)


def test_generalized_core_reduces_to_ta_and_mean():
    taus = [low_rank(s)[0] for s in (1, 2)]
    assert torch.equal(generalized_task_arithmetic(taus), taus[0] + taus[1])
    mean = generalized_task_arithmetic(taus, merge_func="mean")
    assert torch.allclose(mean, (taus[0] + taus[1]) / 2)  # dense tensors: every entry has two contributors


def test_merge_task_vectors_over_named_tensors_and_shape_errors():
    tv1 = {"vlm.llm.a.weight": T1, "vlm.vision.b.weight": T1 * 2}
    tv2 = {"vlm.llm.a.weight": T2, "vlm.vision.b.weight": T2 * 2}
    out = merge_task_vectors("task_arithmetic", [tv1, tv2])
    assert torch.equal(out["vlm.vision.b.weight"], 2 * (T1 + T2)) and torch.equal(out["vlm.llm.a.weight"], T1 + T2)
    # each name's group picks its RETAIN α: (1 − α)·α·τ1 + α·τ2 with α = 0.5 (vision), 0.25 (llm)
    out = merge_task_vectors("retain", [tv1, tv2], RetainParams(alpha_vision=0.5, alpha_llm=0.25))
    assert torch.allclose(out["vlm.vision.b.weight"], 2 * (0.25 * T1 + 0.5 * T2))
    assert torch.allclose(out["vlm.llm.a.weight"], 0.1875 * T1 + 0.25 * T2)
    with pytest.raises(MergeError, match=r"task vector 1 has parameters \['vlm.vision.b.weight'\] that task 0 lacks"):
        merge_task_vectors("task_arithmetic", [tv1, {"vlm.llm.a.weight": T2}])
    with pytest.raises(MergeError, match=r"task vector 1 has shape \(3,\), task 0 has \(4,\)"):
        merge_tensors("task_arithmetic", [T1, torch.zeros(3)])
    with pytest.raises(MergeError, match="unknown merge algorithm 'nope'"):
        merge_tensors("nope", [T1])
    with pytest.raises(MergeError, match="takes TiesParams"):
        merge_tensors("ties", [T1], TsvParams())


def test_tsv_keeps_floor_rank_over_m_directions():
    # 3 tasks of rank 3 in 4×4: keep ⌊4/3⌋ = 1 direction each → output rank ≤ 3 and ≥ 1
    taus = [low_rank(s, out=4, inp=4, r=3)[0] for s in range(3)]
    out = merged("tsv", taus)
    s = torch.linalg.svdvals(out)
    assert int((s > 1e-4 * s[0]).sum()) <= 3
    assert math.isfinite(out.abs().sum().item())


# ------------------------------------------------------------------------------- DARE, TSV and KnOTS edges


def test_dare_drops_with_probability_p_and_rescales_by_one_over_one_minus_p():
    # p = 0.25 tells a drop rate from a keep rate, and 1/(1 − p) from 1/p (both are 2 at p = 0.5)
    t = torch.arange(1, 4001, dtype=torch.float32)
    out = merged("dare", [t], DareParams(p=0.25), name="x", seed=0)
    kept = out != 0
    assert 0.7 < kept.float().mean().item() < 0.8
    assert torch.equal(out[kept], t[kept] / 0.75)


def test_dare_drops_each_task_with_its_own_pattern():
    # two identical tasks, p = 0.5: an entry keeps 0, 1 or 2 copies (each ×2); one shared pattern gives only 0 and 4
    t = torch.ones(2000)
    out = merged("dare", [t, t], DareParams(p=0.5), name="x", seed=0)
    assert set(out.unique().tolist()) == {0.0, 2.0, 4.0}


def test_dare_then_task_arithmetic_adds_the_survivors():
    assert torch.equal(merged("dare", [T1, T2], DareParams(p=0.0)), T1 + T2)  # a sum, not a mean of contributors


def test_tsv_refuses_a_keep_fraction_out_of_range_and_zero_tasks_merge_to_zero():
    taus = [low_rank(s)[0] for s in range(2)]
    with pytest.raises(MergeError, match=r"tsv.keep_fraction must be in \(0, 1\], got 1.5"):
        merged("tsv", taus, TsvParams(keep_fraction=1.5))
    # a weight no expert changed (e.g. LoRA B still zero): no singular direction at all, a zero merge
    zero = torch.zeros(7, 5)
    assert torch.equal(merged("tsv", [zero, zero]), zero)
    assert torch.equal(merged("tsv", [zero, zero], factors=((torch.zeros(7, 2), torch.zeros(2, 5)),) * 2), zero)


def test_knots_of_1d_tensors_is_ties_with_the_scale():
    # 1-D: no SVD, TIES directly (k=100: [3, -1.5, .75, 4]), and α still applies
    assert torch.equal(merged("knots", [T1, T2], KnotsParams(k=100, scale=0.5)), torch.tensor([1.5, -0.75, 0.375, 2.0]))


def test_factored_knots_drops_null_directions_of_tasks_sharing_a_direction():
    # τ_2 = 2 τ_1: [τ_1 τ_2 τ_3] has rank 4 < 6 = Σ r_m. The null directions of the factored core are arbitrary and,
    # kept, would compete with the real ones for TIES's top-k slots in every V block.
    (a, fa), (b, fb) = low_rank(1, out=9, inp=6), low_rank(2, out=9, inp=6)
    taus, factors = [a, 2 * a, b], (fa, (2 * fa[0], fa[1]), fb)
    for params in (KnotsParams(), KnotsParams(k=100)):
        dense, fact = merged("knots", taus, params), merged("knots", taus, params, factors=factors)
        assert torch.allclose(dense, fact, atol=1e-4), (params, (dense - fact).abs().max())


def test_factored_tsv_drops_the_null_direction_of_a_rank_deficient_expert():
    # LoRA rank 2, update rank 1 (equal columns of L): the factored SVD's second direction is numerical noise, which
    # kept would enter TSV's joint orthogonalisation as if it were real
    (_, (left, right)), (b, fb) = low_rank(1, out=9, inp=6), low_rank(2, out=9, inp=6)
    fa = (torch.cat([left[:, :1], left[:, :1]], 1), right)
    taus, factors = [fa[0] @ fa[1], b], (fa, fb)
    dense, fact = merged("tsv", taus), merged("tsv", taus, factors=factors)
    assert torch.allclose(dense, fact, atol=1e-4), (dense - fact).abs().max()
