"""Test-time router: scores by hand, batched scoring equals separate forwards, the routed policy."""

import numpy as np
import pytest
import torch

from experiments.robot.policy import VLAPolicy
from model_merging.artifact import ROUTER_VARIANTS
from model_merging.errors import MergeError
from model_merging.experts import ExpertSet
from model_merging.layout import initial_scratch_state
from model_merging.linalg import top_right_singular_vectors
from model_merging.merge import MergeOptions, merge_experts, router_subspaces, router_variants
from model_merging.merged_model import load_merged
from model_merging.routed_policy import RoutedPolicy, load_routed_policy
from model_merging.router import routing_accuracy, subspace_scores
from model_merging.synthetic import save_perturbed_experts
from prismatic.models import BaseModelConfig, build_vla

NAMES = ["spatial", "object", "goal"]


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    model = build_vla("tiny", BaseModelConfig(random_seed=0), seed=0)
    return save_perturbed_experts(model, tmp_path_factory.mktemp("experts"), NAMES, noise=0.05, seed=1)


@pytest.fixture(scope="module")
def merged(experts, tmp_path_factory):
    out = merge_experts(experts, tmp_path_factory.mktemp("merged") / "m", MergeOptions(), log=None)
    return load_merged(out)


@pytest.fixture(scope="module")
def batch(merged):
    rng = np.random.default_rng(0)
    return merged.multi_expert().processor(["put the bowl on the plate", "open the drawer"],
                                           rng.integers(0, 256, (2, 2, 64, 64, 3), dtype=np.uint8),
                                           np.zeros((2, 8), np.float32))


@pytest.fixture(scope="module")
def task_states(merged, batch):
    """Each task's own (plain, separately built) model's hidden states at the router's layer."""
    layer = merged.manifest["router"]["layer"]
    states = []
    for e in range(len(NAMES)):
        out = merged.for_task(e)(**batch, keep_states=True)
        states.append((out.act_states[layer], out.vis_states[layer]))
    return states


def test_scores_by_hand_on_hand_made_subspaces():
    d = 4
    e = torch.eye(d)
    r_a, r_b = e[:2], e[2:]  # expert a reads dims 0-1, expert b dims 2-3
    h_act = torch.tensor([[[3.0, 4.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]])  # norms in a: 5, 1; in b: 0, 0
    h_vis = torch.tensor([[[0.0, 0.0, 0.0, 2.0], [6.0, 8.0, 0.0, 0.0]]])  # in a: 0, 10; in b: 2, 0
    s_a = subspace_scores(h_act, h_vis, r_a, r_a)
    s_b = subspace_scores(h_act, h_vis, r_b, r_b)
    assert s_a.item() == pytest.approx(0.5 * (3.0 + 5.0))  # ½[mean(5, 1) + mean(0, 10)]
    assert s_b.item() == pytest.approx(0.5 * (0.0 + 1.0))  # ½[mean(0, 0) + mean(2, 0)]
    # per-sample subspaces (N, k, D): sample 0 scored with a, sample 1 with b
    both = subspace_scores(h_act.repeat(2, 1, 1), h_vis.repeat(2, 1, 1), torch.stack([r_a, r_b]),
                           torch.stack([r_a, r_b]))
    assert torch.allclose(both, torch.tensor([4.0, 0.5]))


def test_routing_accuracy_per_suite():
    acc = routing_accuracy(["a", "a", "b", "b", "b"], ["a", "b", "b", "b", "a"])
    assert acc == {"a": 0.5, "b": pytest.approx(2 / 3), "all": 0.6}
    with pytest.raises(ValueError, match="2 true tasks but 1"):
        routing_accuracy(["a", "b"], ["a"])


@pytest.mark.parametrize("variant", ["value", "key", "key_value", "value_update"])
def test_batched_route_equals_one_forward_per_candidate(merged, batch, task_states, variant):
    result = merged.route(batch, variant)
    r_act, r_vis = merged.subspaces(variant)
    refs = torch.stack([subspace_scores(h_act, h_vis, r_act[e], r_vis[e]) for e, (h_act, h_vis) in enumerate(task_states)], 1)
    assert torch.allclose(result.scores, refs, atol=1e-4, rtol=1e-5)
    assert torch.equal(result.expert, refs.argmax(1))  # the expert whose separately computed score is highest
    assert result.info(0)["routed_task"] == NAMES[int(result.expert[0])]


def test_variants_use_different_subspaces(merged):
    v, k, kv = (merged.subspaces(x)[0] for x in ("value", "key", "key_value"))
    assert not torch.allclose(v, k) and not torch.allclose(kv, v)
    with pytest.raises(ValueError, match="router variant 'query'"):
        merged.subspaces("query")


def test_value_update_subspace_is_that_of_the_learned_update():
    # W0 (the shared init) is large on input dims 0-1, the learned update lives on dims 2-3
    d, k = 6, 2
    w0 = torch.zeros(4, d)
    w0[0, 0], w0[1, 1] = 10.0, 9.0
    upd = torch.zeros(4, d)
    upd[2, 2], upd[3, 3] = 1.0, 0.5
    w = {"v_act.weight": w0 + upd, "v_vis.weight": w0 + upd, "k_act.weight": w0, "k_vis.weight": w0}
    init = {n: w0 for n in w}
    out = router_subspaces(w, k, ["value", "value_update"], init)

    def projector(r):
        return r.T @ r

    p = torch.zeros(d, d)
    p[0, 0] = p[1, 1] = 1.0
    assert torch.allclose(projector(out[("value", "vis")]), p, atol=1e-5)  # the init dominates W
    q = torch.zeros(d, d)
    q[2, 2] = q[3, 3] = 1.0
    for side in ("act", "vis"):
        assert torch.allclose(projector(out[("value_update", side)]), q, atol=1e-5)
    with pytest.raises(MergeError, match="router variant 'value_update' needs the experts' initial weights"):
        router_subspaces(w, k, ["value_update"])


def test_merged_value_update_subspaces_come_from_each_expert_minus_the_shared_init(experts, merged):
    block = merged.manifest["router"]["block"]
    k = merged.manifest["router"]["k_gate"]
    es = ExpertSet.open(experts)
    start = initial_scratch_state(es.config, int(es.init_seed))
    r_act, r_vis = merged.subspaces("value_update")
    for e in range(len(NAMES)):
        for r, proj in ((r_act, "v_act"), (r_vis, "v_vis")):
            n = f"action_expert.blocks.{block}.{proj}.weight"
            ref = top_right_singular_vectors(es.expert_tensor(e, n) - start[n], k)
            assert torch.allclose(r[e].T @ r[e], ref.T @ ref, atol=1e-5)
    # the perturbed experts' updates are pure noise, unlike their weights: a different subspace
    assert not torch.allclose(merged.subspaces("value")[1], r_vis, atol=1e-3)


def test_update_variants_need_the_experts_init_seed(experts, tmp_path):
    es = ExpertSet.open(experts)
    assert router_variants(es) == list(ROUTER_VARIANTS)
    for e in es.experts:
        e.manifest["init_seed"] = None
    assert router_variants(es) == ["value", "key", "key_value"]
    m = load_merged(merge_experts(es, tmp_path / "m", MergeOptions(), log=None))
    assert m.router_variants == ["value", "key", "key_value"]
    with pytest.raises(ValueError, match=r"router variant 'value_update' in .*: expected one of \['value', 'key'"):
        m.subspaces("value_update")
    with pytest.raises(ValueError, match="router variant 'value_update'"):
        RoutedPolicy(m, variant="value_update")
    with pytest.raises(MergeError, match="retain interpolates .* no init_seed"):
        merge_experts(es, tmp_path / "r", MergeOptions(algorithm="retain"), log=None)
    assert not (tmp_path / "r").exists()


def test_router_picks_the_expert_whose_subspace_fits_the_states(merged, batch, task_states, monkeypatch):
    k, d = merged.manifest["router"]["k_gate"], merged.config.llm.hidden_size
    for target in range(len(NAMES)):
        h_act, h_vis = task_states[target]
        # hand-made: the target's subspace is the top principal directions of its own hidden states,
        # the other experts get random k-dimensional subspaces
        def top(h):
            return torch.linalg.svd(h.reshape(-1, d), full_matrices=False)[2][:k]

        g = torch.Generator().manual_seed(target)
        rand = [torch.linalg.qr(torch.randn(d, k, generator=g))[0].T for _ in NAMES]
        r_act = torch.stack([top(h_act) if e == target else rand[e] for e in range(len(NAMES))])
        r_vis = torch.stack([top(h_vis) if e == target else rand[e] for e in range(len(NAMES))])
        monkeypatch.setattr(merged, "subspaces", lambda variant="value", a=r_act, v=r_vis: (a, v))
        assert merged.route(batch).expert.tolist() == [target, target]


def test_route_without_masks_uses_one_shared_forward(experts, batch, tmp_path):
    m = load_merged(merge_experts(experts, tmp_path / "m", MergeOptions(algorithm="task_arithmetic", masks=False),
                                  log=None))
    result = m.route(batch)
    layer = m.manifest["router"]["layer"]
    out = m.for_task(0)(**batch, keep_states=True)
    r_act, r_vis = m.subspaces()
    for e in range(len(NAMES)):
        ref = subspace_scores(out.act_states[layer], out.vis_states[layer], r_act[e], r_vis[e])
        assert torch.allclose(result.scores[:, e], ref, atol=1e-4)



def test_route_without_masks_but_per_task_queries_runs_each_candidates_own_model(experts, batch, tmp_path):
    # per-task action queries feed each task's LLM its own query embeddings: one shared forward is not enough
    opts = MergeOptions(algorithm="task_arithmetic", masks=False, per_task_parts=("action_queries",))
    m = load_merged(merge_experts(experts, tmp_path / "m", opts, log=None))
    assert not m.candidates_share_llm_input
    result = m.route(batch)
    layer = m.manifest["router"]["layer"]
    r_act, r_vis = m.subspaces()
    refs = []
    for e in range(len(NAMES)):
        out = m.for_task(e)(**batch, keep_states=True)
        refs.append(subspace_scores(out.act_states[layer], out.vis_states[layer], r_act[e], r_vis[e]))
        assert torch.allclose(result.scores[:, e], refs[e], atol=1e-4)
    shared = m.for_task(0)(**batch, keep_states=True)  # what the shared forward would have scored
    stale = subspace_scores(shared.act_states[layer], shared.vis_states[layer], r_act[1], r_vis[1])
    assert not torch.allclose(stale, refs[1], atol=1e-4)


# ----------------------------------------------------------------------------------------- routed policy


def fake_obs(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"agentview_image": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
            "robot0_eye_in_hand_image": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
            "robot0_eef_pos": rng.normal(size=3), "robot0_eef_quat": np.array([0.0, 0.0, 0.6, 0.8]),
            "robot0_gripper_qpos": rng.normal(size=2) * 0.01}


def test_routed_policy_routes_then_acts_with_the_routed_expert(merged):
    policy = RoutedPolicy(merged)
    obs, instr = [fake_obs(0), fake_obs(1)], ["put the bowl on the plate", "open the drawer"]
    infos = policy.start_episodes(obs, instr, episode_ids=[10, 11])
    assert [i["routed_expert"] for i in infos] == [NAMES[policy.routed[10]], NAMES[policy.routed[11]]]
    assert set(infos[0]["route_scores"]) == set(NAMES)
    policy.routed[11] = (policy.routed[10] + 1) % len(NAMES)  # force a mixed batch of two experts
    actions = policy.act(obs, instr, [10, 11])
    assert actions.shape == (2, 8, 7) and np.isfinite(actions).all()
    assert set(np.unique(actions[..., -1])) <= {-1.0, 1.0}
    for row, eid in enumerate([10, 11]):  # same as the routed expert's own deployable model
        single = VLAPolicy(merged.for_task(policy.routed[eid])).act([obs[row]], [instr[row]], [0])
        assert np.allclose(actions[row], single[0], atol=1e-4)
    policy.end_episodes([10])
    with pytest.raises(ValueError, match="episode 10 was never started"):
        policy.act(obs[:1], instr[:1], [10])


def test_forced_task_and_loader_entry_point(merged):
    policy = load_routed_policy(merged.directory, force_task="goal")
    infos = policy.start_episodes([fake_obs(2)], ["open the drawer"])
    assert infos == [{"routed_expert": "goal", "routed_index": 2, "route_forced": True}]
    assert policy.act([fake_obs(3)], ["open the drawer"], [0]).shape == (1, 8, 7)
    with pytest.raises(MergeError, match="unknown task 'nope'; this merged model has"):
        RoutedPolicy(merged, force_task="nope")


def test_task_and_expert_indices_out_of_range_are_refused(merged):
    n = len(NAMES)
    for bad in (n, -1):
        with pytest.raises(MergeError, match=rf"task index {bad} outside 0..{n - 1}"):
            merged.for_task(bad)
    with pytest.raises(ValueError, match=rf"expert index \[0, {n}\] outside 0..{n - 1}"):
        with merged.multi_expert().select([0, n]):
            pass
