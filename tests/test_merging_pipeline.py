"""Merging tiny experts end to end: the artifact round trip, the CLI, reproducibility, every bad input."""

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from model_merging.algorithms import DareParams, EmrParams, RetainParams, TiesParams, WudiParams
from model_merging.errors import MergeError
from model_merging.experts import ExpertSet, parse_expert_specs
from model_merging.merge import MergeOptions, merge_experts
from model_merging.merged_model import load_merged
from model_merging.mergy import MergyConfig, main, normalize_argv
from model_merging.multi_expert import MaskedDeltaLinear
from model_merging.synthetic import save_perturbed_experts
from prismatic.checkpoint import CHECKPOINT_KIND, load_checkpoint, save_checkpoint
from prismatic.models import BaseModelConfig, build_vla, from_pretrained, get_config
from prismatic.models.configuration import LoRAConfig

REPO = Path(__file__).resolve().parents[1]
NAMES = ["spatial", "object", "goal", "long"]


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    model = build_vla("tiny", BaseModelConfig(random_seed=0), seed=0)
    return save_perturbed_experts(model, tmp_path_factory.mktemp("experts"), NAMES, noise=0.05, seed=0)


@pytest.fixture(scope="module")
def batch():
    model = build_vla("tiny", BaseModelConfig(random_seed=0), seed=0)
    rng = np.random.default_rng(0)
    return model.processor(["pick up the red cube", "open the drawer"],
                           rng.integers(0, 256, (2, 2, 64, 64, 3), dtype=np.uint8), rng.normal(size=(2, 8)))


def task_vector(expert_dir: Path, module: str) -> torch.Tensor:
    sd = load_file(str(expert_dir / "model.safetensors"))
    scale = json.loads((expert_dir / "manifest.json").read_text())["lora"]["scale"]
    return scale * sd[f"{module}.lora_B.default.weight"] @ sd[f"{module}.lora_A.default.weight"]


def quiet(*_):
    pass


# ------------------------------------------------------------------------------------------ round trip
def test_the_artifact_records_each_experts_training_crop_and_steps(experts, tmp_path):
    import shutil

    from prismatic.checkpoint import unfinished_warning

    train_configs = [{"image_aug": True, "aug": {"crop_area": 0.81}, "max_steps": 30},
                     {"image_aug": False, "max_steps": 20}]
    copies = []
    for (name, d), train, step in zip(experts[:2], train_configs, (10, 20)):
        shutil.copytree(d, tmp_path / name)
        mf = tmp_path / name / "manifest.json"
        mf.write_text(json.dumps({**json.loads(mf.read_text()), "train_config": train, "step": step}))
        copies.append((name, tmp_path / name))
    said = []
    out = merge_experts(copies, tmp_path / "m", MergeOptions(algorithm="task_arithmetic"), log=said.append)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["trained_crop_area"] == {NAMES[0]: 0.81, NAMES[1]: 1.0}
    assert [(e["step"], e["max_steps"]) for e in manifest["experts"]] == [(10, 30), (20, 20)]
    # the first expert is an intermediate checkpoint: said when merging, and again by evaluation (run_libero_eval)
    warning = (f"warning: saved before training finished (expert {NAMES[0]!r} at step 10 of 30): an intermediate "
               "checkpoint or a run that stopped early; its figures are not the finished expert's")
    assert warning in said and unfinished_warning(manifest) == warning
    ft = json.loads((tmp_path / NAMES[0] / "manifest.json").read_text())
    assert unfinished_warning(ft) == warning.replace(f"expert {NAMES[0]!r}", "the checkpoint")
    assert unfinished_warning(json.loads((tmp_path / NAMES[1] / "manifest.json").read_text())) is None
    assert unfinished_warning({"format": "mergevla-checkpoint", "step": 5}) is None  # no max_steps recorded




def test_four_experts_round_trip_through_the_artifact(experts, tmp_path):
    out = merge_experts(experts, tmp_path / "m", MergeOptions(algorithm="task_arithmetic", mask_lambda=0.6), log=quiet)
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.safetensors"]
    assert manifest["task_names"] == NAMES and manifest["algorithm"] == "task_arithmetic"
    assert manifest["masks"]["kind"] == "tall" and manifest["masks"]["lambda"] == 0.6
    base_ref = json.loads((experts[0][1] / "manifest.json").read_text())["base"]
    assert manifest["base"] == base_ref
    for name, d in experts:
        assert manifest["norm_stats"][name] == json.loads((d / "manifest.json").read_text())["norm_stats"]
    assert manifest["trained_crop_area"] == dict.fromkeys(NAMES)  # their manifests record no train_config

    merged = load_merged(out)
    cfg, base = get_config("tiny"), build_vla("tiny", BaseModelConfig(random_seed=0), seed=0)
    n_blocks = cfg.num_expert_blocks
    ckpts = [load_checkpoint(d, CHECKPOINT_KIND)[0] for _, d in experts]
    for e, name in enumerate(NAMES):
        model = merged.for_task(name)
        assert model.norm_stats == manifest["norm_stats"][name]
        sd = model.state_dict()
        for p in manifest["lora_params"]:
            module = p[: -len(".weight")]
            taus = [task_vector(d, module) for _, d in experts]
            tau = sum(taus)
            mask = taus[e].abs() > 0.6 * (tau - taus[e]).abs()
            w0 = base.state_dict()[f"{module}.base_layer.weight"]
            assert torch.allclose(sd[p], w0 + mask * tau, atol=1e-6), p
        for n in manifest["head_params"]:  # kept heads are the expert's own
            assert torch.equal(sd[n], ckpts[e][n])
        for n in manifest["shared_params"]:  # parts trained from scratch are averaged
            assert torch.allclose(sd[n], sum(c[n] for c in ckpts) / 4, atol=1e-6)
    assert any(n.startswith(f"action_expert.blocks.{n_blocks - 1}.") for n in manifest["head_params"])
    # router subspaces: from each expert's own value projections of the last shared block
    block = manifest["router"]["block"]
    assert block == n_blocks - 2 and manifest["router"]["layer"] == n_blocks
    r_act, r_vis = merged.subspaces("value")
    for e in range(4):
        for r, w in ((r_act[e], ckpts[e][f"action_expert.blocks.{block}.v_act.weight"]),
                     (r_vis[e], ckpts[e][f"action_expert.blocks.{block}.v_vis.weight"])):
            vh = torch.linalg.svd(w)[2][:8]
            assert torch.allclose(r.T @ r, vh.T @ vh, atol=1e-5)  # same subspace (signs may differ)
    stats = manifest["masks"]["stats"]
    assert stats["total"] == sum(a * b for a, b in manifest["lora_params"].values())
    assert 0 < stats["selfish_ratio"] < 1


def test_emr_rescales_each_task_once_over_the_whole_model_or_per_weight(experts, tmp_path):
    """EMR: task m runs θ0 + λ_m (mask_m ⊙ τ_uni), λ_m = Σ|τ_m| / Σ|mask_m ⊙ τ_uni| summed over every weight."""
    two = experts[:2]
    params = json.loads((merge_experts(two, tmp_path / "model", MergeOptions(algorithm="emr"), log=quiet)
                         / "manifest.json").read_text())["lora_params"]
    num, den, per_weight = [0.0, 0.0], [0.0, 0.0], {}
    for p in params:
        taus = [task_vector(d, p[: -len(".weight")]).double() for _, d in two]
        sigma = torch.sign(taus[0] + taus[1])
        masks = [t * sigma > 0 for t in taus]
        uni = sigma * torch.maximum(*[torch.where(m, t.abs(), 0) for m, t in zip(masks, taus)])
        sums = [(float(t.abs().sum()), float((m * uni).abs().sum())) for m, t in zip(masks, taus)]
        per_weight[p] = [a / b for a, b in sums]
        for i, (a, b) in enumerate(sums):
            num[i], den[i] = num[i] + a, den[i] + b
    whole = [a / b for a, b in zip(num, den)]
    for rescale, out in (("model", tmp_path / "model"), ("tensor", tmp_path / "tensor")):
        if rescale == "tensor":
            merge_experts(two, out, MergeOptions(algorithm="emr", params=EmrParams(rescale="tensor")), log=quiet)
        merged = load_merged(out)
        for p in params:
            for e, name in enumerate(NAMES[:2]):
                want = whole[e] if rescale == "model" else per_weight[p][e]
                assert float(merged.rescaler(name, p)) == pytest.approx(want, rel=1e-5), (rescale, p)
        ranges = json.loads((out / "manifest.json").read_text())["masks"]["rescalers"]
        assert ranges[NAMES[0]][0] == ranges[NAMES[0]][1] if rescale == "model" else ranges[NAMES[0]][0] < ranges[NAMES[0]][1]
    assert len({round(v[0], 6) for v in per_weight.values()}) > 1  # the two scopes differ on these experts
    with pytest.raises(MergeError, match="set it with --emr.rescale, not in a rule"):
        merge_experts(two, tmp_path / "rule", MergeOptions(algorithm="emr", rules=("llm rescale=tensor",)), log=quiet)


@pytest.mark.parametrize("algorithm", ["ties", "emr"])  # TALL masks; EMR's own masks and per-task rescalers
def test_multi_expert_model_matches_each_task_model(experts, batch, tmp_path, algorithm):
    merged = load_merged(merge_experts(experts, tmp_path / "m", MergeOptions(algorithm=algorithm), log=quiet))
    multi = merged.multi_expert()
    per_task = [merged.for_task(e).predict_action(**batch) for e in range(4)]
    for e in range(4):
        assert torch.allclose(multi.predict_action([e, e], **batch), per_task[e], atol=1e-6)
    mixed = multi.predict_action([2, 0], **batch)
    assert torch.allclose(mixed[0], per_task[2][0], atol=1e-5) and torch.allclose(mixed[1], per_task[0][1], atol=1e-5)
    assert not torch.allclose(per_task[0], per_task[1])  # tasks really differ (masks and heads)
    # cached task weights: the same outputs to the bit, each task's weight built once per layer
    cached = multi.cache_weights(True)
    assert torch.equal(cached.predict_action([2, 0], **batch), mixed)
    assert torch.equal(cached.predict_action([2, 0], **batch), mixed)
    caches = [m.cache for m in multi.modules() if isinstance(m, MaskedDeltaLinear)]
    assert caches and all(sorted(c) == [0, 2] for c in caches)
    assert all(m.cache is None for m in multi.cache_weights(False).modules() if isinstance(m, MaskedDeltaLinear))


def test_per_task_parts_keep_each_experts_action_pathway(experts, batch, tmp_path):
    """With every group kept per task nothing from scratch is averaged: task e runs expert e's own action pathway
    (queries, proprio projector, expert input, every block) on the merged VLM, in the plain and the multi model."""
    from model_merging.layout import PART_GROUPS

    out = merge_experts(experts, tmp_path / "m", MergeOptions(algorithm="task_arithmetic", per_task_parts=PART_GROUPS),
                        log=quiet)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["shared_params"] == {} and manifest["per_task_parts"] == list(PART_GROUPS)
    merged = load_merged(out)
    multi = merged.multi_expert()
    per_task = [merged.for_task(e) for e in range(4)]
    for e, (_, d) in enumerate(experts):
        own, _ = load_checkpoint(d, CHECKPOINT_KIND)
        state = per_task[e].state_dict()
        for n in manifest["head_params"]:
            assert torch.equal(state[n], own[n]), n
    preds = [m.predict_action(**batch) for m in per_task]
    mixed = multi.predict_action([3, 1], **batch)  # each sample its own task's queries, projector and blocks
    torch.testing.assert_close(mixed[0], preds[3][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed[1], preds[1][1], atol=1e-5, rtol=0)
    # the action queries alone kept per task: the multi model must pick them per sample
    queries_only = merge_experts(experts[:2], tmp_path / "q", MergeOptions(algorithm="task_arithmetic",
                                 expert_head_layers=0, per_task_parts=("action_queries",)), log=quiet)
    q = load_merged(queries_only)
    assert set(json.loads((queries_only / "manifest.json").read_text())["head_params"]) == {"action_queries"}
    both = q.multi_expert().predict_action([1, 0], **batch)
    torch.testing.assert_close(both[0], q.for_task(1).predict_action(**batch)[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(both[1], q.for_task(0).predict_action(**batch)[1], atol=1e-5, rtol=0)
    with pytest.raises(MergeError, match=r"per_task_parts \['heads'\]: expected a subset of"):
        merge_experts(experts[:2], tmp_path / "bad", MergeOptions(per_task_parts=("heads",)), log=quiet)
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("opts", [MergeOptions(algorithm="task_arithmetic"),
                                  MergeOptions(algorithm="emr"),
                                  MergeOptions(algorithm="retain", params=RetainParams(1.0, 1.0, 1.0), masks=False)],
                         ids=["ta", "emr", "retain-alpha1"])
def test_one_expert_merged_is_that_expert(experts, batch, tmp_path, opts):
    merged = load_merged(merge_experts(experts[:1], tmp_path / "m", opts, log=quiet))
    expert = from_pretrained(experts[0][1])
    assert torch.allclose(merged.for_task(0).predict_action(**batch), expert.predict_action(**batch), atol=1e-5)


def test_retain_interpolates_the_from_scratch_parts_from_their_shared_init(experts, tmp_path):
    from model_merging.layout import initial_scratch_state

    rule = r"^proprio_proj\. alpha_action_expert=0.9"
    merged = load_merged(merge_experts(experts[:2], tmp_path / "m", MergeOptions(
        algorithm="retain", masks=False, rules=(rule,)), log=quiet)).shared_state()
    init = initial_scratch_state(get_config("tiny"), 0)
    ts = [load_checkpoint(d, CHECKPOINT_KIND)[0] for _, d in experts[:2]]
    for n, alpha in (("proprio_proj.0.weight", 0.9), ("action_queries", 0.5)):  # the rule's α, the default one
        # sequential, in deltas from θ_pre: ((1 − α)·α·τ_1 + α·τ_2) with τ_k = θ_k − θ_pre
        want = init[n] + (1 - alpha) * alpha * (ts[0][n] - init[n]) + alpha * (ts[1][n] - init[n])
        torch.testing.assert_close(merged[n], want, atol=1e-6, rtol=0)


def test_merge_is_bitwise_reproducible(experts, tmp_path):
    opts = MergeOptions(algorithm="dare", params=DareParams(p=0.3, then="ties"), seed=5)
    a = merge_experts(experts, tmp_path / "a", opts, log=quiet)
    b = merge_experts(experts, tmp_path / "b", opts, log=quiet)
    digest = [hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest() for d in (a, b)]
    assert digest[0] == digest[1]
    assert (a / "manifest.json").read_text() == (b / "manifest.json").read_text()
    c = merge_experts(experts, tmp_path / "c", MergeOptions(algorithm="dare", params=opts.params, seed=6), log=quiet)
    assert json.loads((c / "manifest.json").read_text())["weights_sha256"] != digest[0]


def test_every_algorithm_produces_a_loadable_artifact(experts, batch, tmp_path):
    from model_merging.algorithms import METHODS, WudiParams

    for name in sorted(METHODS):
        params = WudiParams(steps=3) if name == "wudi" else None
        out = merge_experts(experts[:2], tmp_path / name, MergeOptions(algorithm=name, params=params), log=quiet)
        pred = load_merged(out).multi_expert().predict_action([0, 1], **batch)
        assert torch.isfinite(pred).all(), name


def test_emr_without_masks_says_it_is_an_ablation(experts, tmp_path):
    said = []
    merge_experts(experts[:2], tmp_path / "m", MergeOptions(algorithm="emr", masks=False), log=said.append)
    assert ("note: emr without masks gives every task its unified vector, with neither its per-task masks nor its "
            "rescalers: an ablation, not the method as published") in said
    said.clear()
    merge_experts(experts[:2], tmp_path / "t", MergeOptions(algorithm="ties", masks=False), log=said.append)
    assert not any(line.startswith("note:") for line in said)


def test_expert_head_layers_and_no_masks(experts, tmp_path):
    out = merge_experts(experts[:2], tmp_path / "m",
                        MergeOptions(algorithm="ties", masks=False, expert_head_layers=2, k_gate=4), log=quiet)
    manifest = json.loads((out / "manifest.json").read_text())
    blocks = {int(n.split(".")[2]) for n in manifest["head_params"] if n.startswith("action_expert.blocks.")}
    n_blocks = get_config("tiny").num_expert_blocks
    assert blocks == {n_blocks - 2, n_blocks - 1} and manifest["router"]["block"] == n_blocks - 3
    assert manifest["masks"]["enabled"] is False
    assert not any(k.startswith("mask.") for k in load_file(str(out / "model.safetensors")))
    merged = load_merged(out)
    assert merged.subspaces()[0].shape == (2, 4, get_config("tiny").llm.hidden_size)


# ------------------------------------------------------------------------------------------------- CLI


def test_cli_merges_with_the_issue_syntax(experts, tmp_path, capsys):
    argv = ["--experts", *[f"{n}={d}" for n, d in experts[:3]], "--algorithm", "ties", "--masks", "true",
            "--lambda", "0.7", "--k_gate", "4", "--expert_head_layers", "1", "--ties.k", "100",
            "--ties.merge_func", "sum", "--rules", "llm scale=0.5", "vision k=50", "--out", str(tmp_path / "m")]
    assert main(argv) == 0
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert manifest["task_names"] == NAMES[:3] and manifest["masks"]["lambda"] == 0.7
    assert manifest["params"] == {"k": 100.0, "merge_func": "sum", "scale": 1.0}
    assert manifest["rules"] == ["llm scale=0.5", "vision k=50"] and manifest["router"]["k_gate"] == 4
    assert "selfish ratio" in capsys.readouterr().out
    assert manifest["per_task_parts"] == [] and "proprio_proj.0.weight" in manifest["shared_params"]
    argv = ["--experts", *[f"{n}={d}" for n, d in experts[:2]], "--per_task_parts", "proprio_proj", "action_queries",
            "--out", str(tmp_path / "p")]
    assert main(argv) == 0
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert manifest["per_task_parts"] == ["proprio_proj", "action_queries"]
    assert "proprio_proj.0.weight" in manifest["head_params"] and "action_queries" in manifest["head_params"]
    assert main([*argv[:-1], str(tmp_path / "bad"), "--per_task_parts", "lora"]) == 2
    assert "per_task_parts ['lora']: expected a subset of" in capsys.readouterr().err


def test_normalize_argv():
    assert normalize_argv(["--experts", "a=x", "b=y", "--lambda", "0.5"]) == \
        ["--experts", '["a=x", "b=y"]', "--mask_lambda", "0.5"]
    assert normalize_argv(["--experts", "[a=x]", "--out=o"]) == ["--experts", '["a=x"]', "--out=o"]
    assert normalize_argv(["--scratch_weights", "[0.25, 0.75]"]) == ["--scratch_weights", "[0.25, 0.75]"]
    # the `=` form, and a list flag given twice adds to its list
    assert normalize_argv(["--out=o", "--experts=a=x", "--per_task_parts", "lora", "--experts", "b=y"]) == \
        ["--out=o", "--experts", '["a=x", "b=y"]', "--per_task_parts", '["lora"]']
    # one rule whose regex starts with a character class is a rule, not a YAML list
    assert normalize_argv(["--rules", "[qk]_proj scale=0.5"]) == ["--rules", '["[qk]_proj scale=0.5"]']


def test_cli_help_documents_every_field(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    import dataclasses

    for f in dataclasses.fields(MergyConfig):
        assert f"--{f.name}" in text, f.name
    for flag in ("--ties.k", "--ties.merge_func", "--wudi.steps", "--retain.alpha_llm", "--knots.merge"):
        assert flag in text


def test_cli_script_reports_bad_input_and_exits_nonzero(experts, tmp_path):
    out = tmp_path / "m"
    proc = subprocess.run(
        [sys.executable, str(REPO / "model_merging" / "mergy.py"), "--experts", f"a={experts[0][1]}",
         f"a={experts[1][1]}", "--out", str(out)],
        capture_output=True, text=True, timeout=120, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2, proc.stderr
    assert "expert name 'a' is given twice" in proc.stderr
    assert not out.exists()


def test_merge_libero_script_merges_each_algorithm_resumes_and_never_replaces_an_artifact(experts, tmp_path):
    from data_fixtures import script_env

    env = script_env(PYTHON=sys.executable, SUITES="libero_spatial libero_goal", CKPT_SPATIAL=str(experts[0][1]),
                     CKPT_GOAL=str(experts[2][1]), MERGED_ROOT=str(tmp_path / "merged"))
    merged = tmp_path / "merged"

    def script(*flags, **extra):
        return subprocess.run(["bash", str(REPO / "bash_scripts" / "merge_libero.sh"), *flags], env={**env, **extra},
                              capture_output=True, text=True, timeout=300)

    plan = script("--rules", "llm scale=0.8", DRY_RUN="1", ALGORITHMS="ties wudi")
    assert plan.returncode == 0, plan.stderr
    assert plan.stdout.count("-m model_merging.mergy --experts libero_spatial=") == 2
    assert r"--rules llm\ scale=0.8" in plan.stdout  # one argument, quoted as the shell reads it back
    assert not merged.exists()
    done = script(ALGORITHMS="task_arithmetic ties", MASK_LAMBDA="0.9")
    assert done.returncode == 0, done.stderr
    for algorithm in ("task_arithmetic", "ties"):
        manifest = json.loads((merged / algorithm / "manifest.json").read_text())
        assert manifest["algorithm"] == algorithm and manifest["task_names"] == ["libero_spatial", "libero_goal"]
        assert manifest["masks"]["lambda"] == 0.9
    made = (merged / "ties" / "manifest.json").stat().st_mtime_ns
    # the same command again keeps what it made and merges only what is new
    again = script(ALGORITHMS="ties tsv", MASK_LAMBDA="0.9")
    assert again.returncode == 0, again.stderr
    assert f"== ties: {merged / 'ties'} was merged by this command before; kept" in again.stdout
    assert (merged / "ties" / "manifest.json").stat().st_mtime_ns == made and (merged / "tsv" / "manifest.json").is_file()
    # an artifact made otherwise, an unknown or repeated algorithm stop the script before it merges anything
    other = script(ALGORITHMS="knots ties nope knots")
    assert other.returncode == 2
    assert f"error: already there, made otherwise (never replaced): {merged / 'ties'};" in other.stderr
    assert "ALGORITHMS has 'nope'; expected some of: " in other.stderr and "task_arithmetic" in other.stderr
    assert "ALGORITHMS has 'knots' twice" in other.stderr
    assert not (merged / "knots").exists()
    one = script(SUITES="libero_goal", ALGORITHMS="knots")
    assert one.returncode == 2 and "SUITES names 1 expert(s); a merge needs two or more" in one.stderr
    # killed right after a merge finished: the rerun knows the artifact as its own
    killer = tmp_path / "python_then_kill"
    killer.write_text(f'#!/bin/sh\n"{sys.executable}" "$@" || exit\n'
                      'case "$*" in *model_merging.mergy*) kill -9 "$PPID";; esac\n')
    killer.chmod(0o755)
    killed = script(ALGORITHMS="emr", MASK_LAMBDA="0.9", PYTHON=str(killer))
    assert killed.returncode == -9 and (merged / "emr" / "manifest.json").is_file()
    rerun = script(ALGORITHMS="emr", MASK_LAMBDA="0.9")
    assert rerun.returncode == 0, rerun.stderr
    assert f"== emr: {merged / 'emr'} was merged by this command before; kept" in rerun.stdout


# ------------------------------------------------------------------------------------------- bad input


def copy_expert(src: Path, dst: Path, edit_tensors=None, edit_manifest=None) -> Path:
    tensors, manifest = load_checkpoint(src, CHECKPOINT_KIND)
    for k in ("format", "format_version", "weights_sha256"):
        manifest.pop(k)
    if edit_tensors:
        edit_tensors(tensors)
    if edit_manifest:
        edit_manifest(manifest)
    return save_checkpoint(dst, tensors, manifest, CHECKPOINT_KIND)


def _drop(t):
    del t["action_queries"]


def _reshape(t):
    t["action_queries"] = torch.zeros(3, 3)


def _nan(t):
    k = next(k for k in t if k.endswith(".lora_B.default.weight"))
    t[k][0, 0] = float("nan")


def _inf(t):
    t["action_expert.in_proj.bias"][1] = float("inf")


BAD_TENSORS = {"missing tensor": (_drop, "different parameter sets"),
               "shape": (_reshape, "'action_queries' is torch.float32 \\[16, 128\\] vs torch.float32 \\[3, 3\\]"),
               "nan": (_nan, "contains NaN or inf"), "inf": (_inf, "'action_expert.in_proj.bias' .* NaN or inf")}


@pytest.mark.parametrize("case", sorted(BAD_TENSORS))
def test_bad_expert_tensors_are_named_and_nothing_is_written(experts, tmp_path, case):
    edit, msg = BAD_TENSORS[case]
    bad = copy_expert(experts[1][1], tmp_path / "bad", edit_tensors=edit)
    with pytest.raises(MergeError, match=msg):
        merge_experts([experts[0], ("bad", bad)], tmp_path / "out", log=quiet)
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]  # no partial directory left behind


def test_experts_from_different_bases_or_lora_configs_or_inits(experts, tmp_path):
    other_base = build_vla("tiny", BaseModelConfig(random_seed=1), seed=0)
    other = save_perturbed_experts(other_base, tmp_path, ["other"])[0]
    with pytest.raises(MergeError, match="different base models"):
        merge_experts([experts[0], other], tmp_path / "out", log=quiet)
    cfg = get_config("tiny", lora=LoRAConfig(r=8, alpha=16))
    small = save_perturbed_experts(build_vla(cfg, BaseModelConfig(random_seed=0), seed=0), tmp_path, ["small"])[0]
    with pytest.raises(MergeError, match="different LoRA configs"):
        merge_experts([experts[0], small], tmp_path / "out", log=quiet)
    seeded = copy_expert(experts[1][1], tmp_path / "seeded", edit_manifest=lambda m: m.update(init_seed=3))
    with pytest.raises(MergeError, match="different initialisations"):
        merge_experts([experts[0], ("seeded", seeded)], tmp_path / "out", log=quiet)
    for field, key in (("lora", "scale"), ("base", "sha256")):
        broken = copy_expert(experts[1][1], tmp_path / f"no-{key}", edit_manifest=lambda m, f=field, k=key: m[f].pop(k))
        with pytest.raises(MergeError, match=f"expert 'broken': .*manifest.json field '{field}.{key}' is None, expected a"):
            merge_experts([experts[0], ("broken", broken)], tmp_path / "out", log=quiet)
    # fields the merge reads later are checked before anything is merged, each named
    for n, (edit, says) in enumerate([
        (lambda m: m["lora"].update(scale=float("nan")), r"field 'lora' is .*a finite scale > 0 equal to alpha / r"),
        (lambda m: m["lora"].update(scale=m["lora"]["scale"] * 3), r"field 'lora' is .*equal to alpha / r"),
        (lambda m: m.update(init_seed="abc"), r"field 'init_seed' is 'abc', expected an integer"),
        (None, r"field 'weights_sha256' is None, expected a string"),
        (lambda m: m.update(train_config={"image_aug": True, "aug": None}), r"field 'train_config' is invalid"),
        (lambda m: m.update(norm_stats="q01"), r"field norm_stats is a str, expected an object"),
        (lambda m: m["norm_stats"]["action"].update(q99=[1.0] * 6), r"field norm_stats.action.q99 is .*a list of 7 finite"),
        (lambda m: m["norm_stats"]["proprio"].update(mask=[1] * 8), r"field norm_stats.proprio.mask is .*8 booleans"),
    ]):
        broken = copy_expert(experts[1][1], tmp_path / f"bad-{n}", edit_manifest=edit)
        if edit is None:  # save_checkpoint records the hash: take it out of the written manifest
            mf = broken / "manifest.json"
            mf.write_text(json.dumps({k: v for k, v in json.loads(mf.read_text()).items() if k != "weights_sha256"}))
        with pytest.raises(MergeError, match=f"expert 'broken': .*manifest.json {says}"):
            merge_experts([experts[0], ("broken", broken)], tmp_path / "out", MergeOptions(verify_hashes=False),
                          log=quiet)
    assert not (tmp_path / "out").exists()


def test_truncated_expert_file(experts, tmp_path):
    d = tmp_path / "trunc"
    shutil.copytree(experts[1][1], d)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(MergeError, match="truncated or corrupt"):
        merge_experts([experts[0], ("trunc", d)], tmp_path / "out", log=quiet)
    with pytest.raises(MergeError, match="truncated"):
        merge_experts([experts[0], ("trunc", d)], tmp_path / "out", MergeOptions(verify_hashes=False), log=quiet)
    assert not (tmp_path / "out").exists()


def test_duplicate_names_existing_output_and_bad_options(experts, tmp_path):
    with pytest.raises(MergeError, match="given twice"):
        merge_experts([("a", experts[0][1]), ("a", experts[1][1])], tmp_path / "out", log=quiet)
    with pytest.raises(MergeError, match="experts 'a' and 'b' are the same directory"):
        merge_experts([("a", experts[0][1]), ("b", experts[0][1])], tmp_path / "out", log=quiet)
    for bad in ("a.b", "a\n"):  # a trailing newline too (re.match with $ would accept it)
        with pytest.raises(MergeError, match="must use only letters"):
            merge_experts([(bad, experts[0][1])], tmp_path / "out", log=quiet)
    existing = tmp_path / "exists"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(MergeError, match="already exists"):
        merge_experts(experts[:2], existing, log=quiet)
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]
    for opts, msg in [(MergeOptions(expert_head_layers=99), "expert_head_layers must be in"),
                      (MergeOptions(k_gate=0), "k_gate must be in"),
                      (MergeOptions(mask_lambda=-1), "lambda must be a finite number >= 0, got -1"),
                      (MergeOptions(mask_lambda=float("nan")), "lambda must be a finite number >= 0, got nan"),
                      (MergeOptions(router_block=7), r"router_block must be in \[0, 3\] or -1 \(the last shared block\), got 7"),
                      (MergeOptions(router_block=-2), r"router_block must be in \[0, 3\] or -1"),
                      (MergeOptions(expert_head_layers=4), "no expert block is shared, so there is no last shared block"),
                      (MergeOptions(device="cuda:0"), "no CUDA device is available") if not torch.cuda.is_available()
                      else (MergeOptions(device="nope"), "'nope' is not a torch device"),
                      (MergeOptions(algorithm="wudi", params=WudiParams(lr=float("nan"))),
                       r"--wudi.lr is nan, expected a finite number > 0"),
                      (MergeOptions(algorithm="ties", params=TiesParams(k=150)), r"--ties.k is 150, expected in \[0, 100\]"),
                      (MergeOptions(algorithm="dare", params=DareParams(p=1.0)), r"--dare.p is 1.0, expected in \[0, 1\)"),
                      (MergeOptions(algorithm="tsv", rules=("llm keep_fraction=2",)),
                       r"--tsv.keep_fraction is 2.0 in rule 'llm keep_fraction=2.0', expected in \(0, 1\]"),
                      (MergeOptions(algorithm="retain", scratch_weights=(1.0, 1.0)), "--scratch_weights would be ignored"),
                      (MergeOptions(algorithm="retain", rules=(r"action_expert\.out_proj alpha_action_expert=0.9",)),
                       "match no parameter that retain applies rules to"),
                      (MergeOptions(scratch_weights=(float("inf"), 1.0)), "expected finite, non-negative weights"),
                      (MergeOptions(rules=("llm bogus=1",)), "has no field 'bogus'"),
                      (MergeOptions(algorithm="nope"), "unknown merge algorithm"),
                      (MergeOptions(scratch_weights=(1.0,)), "--scratch_weights: 1 weights given for 2 experts"),
                      (MergeOptions(scratch_weights=(-1.0, 2.0)), r"--scratch_weights \[-1.0, 2.0\]: expected finite, non-negative"),
                      (MergeOptions(rules=("vison scale=0",)), r"rule\(s\) \['vison scale=0.0'\] match no parameter"),
                      (MergeOptions(algorithm="task_arithmetic", rules=("action_expert scale=0",)),
                       "match no parameter that task_arithmetic applies rules to"),
                      (MergeOptions(algorithm="weighted_average", rules=("llm weights=0.5",)),
                       "takes a list, which a rule cannot set")]:
        with pytest.raises(MergeError, match=msg):
            merge_experts(experts[:2], tmp_path / "out", opts, log=quiet)
    assert not (tmp_path / "out").exists()
    (tmp_path / "afile").write_text("mine")
    with pytest.raises(MergeError, match=f"{tmp_path / 'afile'} is a file, not a directory"):
        merge_experts(experts[:2], tmp_path / "afile" / "out", log=quiet)
    with pytest.raises(MergeError, match="manifest.json is missing"):
        merge_experts([("x", tmp_path / "exists")], tmp_path / "out", log=quiet)
    run = tmp_path / "run"  # a training run given where one of its checkpoints belongs
    (run / "checkpoints" / "step_000010").mkdir(parents=True)
    with pytest.raises(MergeError, match="it is a training run directory with no finished checkpoint yet"):
        merge_experts([("x", run)], tmp_path / "out", log=quiet)
    for step in (5, 20):  # step 10 is still being written
        (run / "checkpoints" / f"step_{step:06d}").mkdir()
        (run / "checkpoints" / f"step_{step:06d}" / "manifest.json").write_text("{}")
    with pytest.raises(MergeError, match=re.escape(f"{run}/manifest.json is missing: {run} is not a finished "
                                                   f"checkpoint (format mergevla-checkpoint); it is a training run "
                                                   f"directory: give one of its checkpoints, e.g. the newest, "
                                                   f"{run}/checkpoints/step_000020")):
        merge_experts([("x", run)], tmp_path / "out", log=quiet)
    with pytest.raises(MergeError, match=re.escape(f"e.g. the newest, {run}/checkpoints/step_000020")):
        merge_experts([("x", run / "checkpoints")], tmp_path / "out", log=quiet)
    assert not (tmp_path / "out").exists()


def test_loader_is_strict(experts, tmp_path):
    out = merge_experts(experts[:2], tmp_path / "m", MergeOptions(algorithm="task_arithmetic"), log=quiet)
    with pytest.raises(MergeError, match="hashes to"):
        load_merged(out, base=BaseModelConfig(random_seed=1))
    f = out / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:-64])
    with pytest.raises(MergeError, match="truncated or corrupt"):
        load_merged(out)
    with pytest.raises(MergeError, match="truncated"):
        load_merged(out, verify=False)
    f.write_bytes(data)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["router"]["k_gate"] = 5  # the manifest no longer describes the file
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(MergeError, match="is torch.float32 \\[8, 128\\], the manifest implies"):
        load_merged(out)
    with pytest.raises(MergeError, match="expected 'mergevla-merged'"):
        load_merged(experts[0][1])


def test_cli_merges_experts_written_by_the_training_script(tmp_path, batch):
    from data_fixtures import hdf5_root, small_tasks, tiny_config

    from prismatic.training import train

    finals = []
    for i, name in enumerate(["spatial", "object"]):  # two "suites": different synthetic tasks, same seed
        root = hdf5_root(tmp_path / f"data{i}", small_tasks(seed=i))
        finals.append((name, train(tiny_config(root, tmp_path / f"run{i}", max_steps=2, save_every=2))))
    out = tmp_path / "merged"
    assert main(["--experts", *[f"{n}={d}" for n, d in finals], "--algorithm", "ties", "--out", str(out)]) == 0
    merged = load_merged(out)
    for name, d in finals:
        assert merged.norm_stats[name] == from_pretrained(d).norm_stats
    assert torch.isfinite(merged.multi_expert().predict_action([0, 1], **batch)).all()


# ------------------------------------------------------------------------------------------ average_parts

def test_average_parts_replaces_only_the_named_groups(experts, tmp_path, capsys):
    from model_merging.average_parts import main as average_main

    own = {n: load_file(str(d / "model.safetensors")) for n, d in experts}
    out = tmp_path / "goal-avg"
    argv = ["--experts", *[f"{n}={d}" for n, d in experts], "--target", "goal", "--parts", "proprio_proj",
            "shared_blocks", "--out", str(out)]
    assert average_main(argv) == 0
    got, manifest = load_checkpoint(out, CHECKPOINT_KIND)
    assert set(got) == set(own["goal"])
    last = max(int(k.split(".")[2]) for k in got if k.startswith("action_expert.blocks."))
    averaged = 0
    for k, v in got.items():
        mean = sum(own[n][k] for n in NAMES) / 4
        if k.startswith("proprio_proj.") or (k.startswith("action_expert.blocks.") and int(k.split(".")[2]) < last):
            torch.testing.assert_close(v, mean, rtol=1e-6, atol=1e-7)
            assert not torch.equal(v, own["goal"][k])
            averaged += 1
        else:  # LoRA, queries, the expert's input layers and the kept last block: the goal expert's own
            assert torch.equal(v, own["goal"][k]), k
    assert averaged > 4 and manifest["averaged_parts"]["parts"] == ["proprio_proj", "shared_blocks"]
    assert from_pretrained(out).norm_stats == from_pretrained(dict(experts)["goal"]).norm_stats
    # with no block kept per task the merge shares the final norm and head too, and so does the average
    out0 = tmp_path / "goal-avg-lh0"
    assert average_main([*argv[:-1], str(out0), "--expert_head_layers", "0"]) == 0
    got0, _ = load_checkpoint(out0, CHECKPOINT_KIND)
    for k in ("action_expert.out_proj.weight", "action_expert.out_norm.weight", f"action_expert.blocks.{last}.gate"):
        torch.testing.assert_close(got0[k], sum(own[n][k] for n in NAMES) / 4, rtol=1e-6, atol=1e-7)
    # the output is never overwritten unasked; bad input names the field and writes nothing
    assert average_main(argv) == 2 and "refusing to overwrite" in capsys.readouterr().err
    bad = ["--experts", *[f"{n}={d}" for n, d in experts], "--out", str(tmp_path / "x")]
    assert average_main([*bad, "--target", "goal", "--parts", "lora"]) == 2
    assert "--parts ['lora']: expected a subset of" in capsys.readouterr().err
    assert average_main([*bad, "--target", "kitchen"]) == 2
    assert "--target 'kitchen' is not one of the experts" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    mine = tmp_path / "mine"  # a directory of the user's gets no checkpoint files added beside theirs
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    assert average_main([*bad[:-1], str(mine), "--target", "goal"]) == 2
    assert f"--out {mine} holds files other than a checkpoint's (notes.txt)" in capsys.readouterr().err
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    (out / ".model.safetensors.tmp-host-1-x").write_text("")  # a killed write's temp: still this checkpoint's
    assert average_main([*argv, "--overwrite", "true"]) == 0


def test_a_failed_merge_leaves_no_directory_it_created(experts, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr("model_merging.merge._write_router", boom)
    (tmp_path / "kept").mkdir()
    with pytest.raises(RuntimeError, match="disk full"):
        merge_experts(experts[:2], tmp_path / "kept" / "new" / "deeper" / "out", log=quiet)
    assert list((tmp_path / "kept").iterdir()) == []  # new/deeper and the partial directory are gone


def test_scratch_weights_are_a_convex_combination(experts, tmp_path):
    out = merge_experts(experts[:2], tmp_path / "m", MergeOptions(algorithm="task_arithmetic", scratch_weights=(1.0, 3.0)),
                        log=quiet)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["scratch_weights"] == [0.25, 0.75]  # normalised: these average the experts' own weights
    name = "proprio_proj.0.weight"
    a, b = (load_checkpoint(d, CHECKPOINT_KIND)[0][name] for _, d in experts[:2])
    shared = load_merged(out).for_task(0).state_dict()[name]
    torch.testing.assert_close(shared, 0.25 * a + 0.75 * b, atol=1e-6, rtol=0)


def test_bad_options_are_refused_before_any_expert_is_read(tmp_path):
    from model_merging.algorithms import TiesParams

    missing = [("a", tmp_path / "nowhere-a"), ("b", tmp_path / "nowhere-b")]  # reading them would fail otherwise
    with pytest.raises(MergeError, match=r"--ties\.k"):
        merge_experts(missing, tmp_path / "out", MergeOptions(algorithm="ties", params=TiesParams(k=150.0)), log=quiet)
    with pytest.raises(MergeError, match="mask lambda must be a finite number >= 0, got nan"):
        merge_experts(missing, tmp_path / "out", MergeOptions(mask_lambda=float("nan")), log=quiet)
    with pytest.raises(MergeError, match="checkpoint directory .*nowhere-a does not exist"):  # good options: then the experts
        merge_experts(missing, tmp_path / "out", MergeOptions(), log=quiet)


# ------------------------------------------------------------------------------ expert set and average_parts


def test_average_parts_uses_the_given_weights_and_records_them_normalised(experts, tmp_path):
    from model_merging.average_parts import main as average_main

    own = {n: load_file(str(d / "model.safetensors")) for n, d in experts}
    out = tmp_path / "goal-w"
    assert average_main(["--experts", *[f"{n}={d}" for n, d in experts], "--target", "goal", "--parts",
                         "proprio_proj", "--weights", "1", "0", "0", "3", "--out", str(out)]) == 0
    got, manifest = load_checkpoint(out, CHECKPOINT_KIND)
    assert manifest["averaged_parts"]["weights"] == [0.25, 0.0, 0.0, 0.75]
    names = [k for k in got if k.startswith("proprio_proj.")]
    assert names
    for k in names:  # NAMES order: spatial, object, goal, long
        torch.testing.assert_close(got[k], 0.25 * own["spatial"][k] + 0.75 * own["long"][k], rtol=1e-6, atol=1e-7)


def test_average_parts_keeps_every_block_with_all_of_them_per_task(experts):
    """L_h may be every block (nothing of the expert's blocks shared), one more is refused."""
    from model_merging.average_parts import average_parts
    from model_merging.layout import PART_GROUPS, part_group

    es = ExpertSet.open(experts)
    n = es.layout.num_blocks
    own = {name: load_file(str(d / "model.safetensors")) for name, d in experts}
    got = average_parts(es, "goal", PART_GROUPS, expert_head_layers=n)
    for k, v in got.items():
        if k in es.layout.scratch and part_group(k) != "shared_blocks":  # queries, proprio projector, expert input
            torch.testing.assert_close(v, sum(own[name][k] for name in NAMES) / 4, rtol=1e-6, atol=1e-7)
        else:  # LoRA, every block, the final norm and head: the goal expert's own
            assert torch.equal(v, own["goal"][k]), k
    with pytest.raises(MergeError, match=rf"--expert_head_layers must be in 0\.\.{n}, got {n + 1}"):
        average_parts(es, "goal", PART_GROUPS, expert_head_layers=n + 1)


@pytest.mark.parametrize("edit, says", [
    (_reshape, r"expert 'bad': tensor 'action_queries' has shape \[3, 3\], expected \[16, 128\]"),
    (_drop, r"expert 'bad': .*model\.safetensors does not hold the trainable parameters of config 'tiny' "
            r"\(missing \['action_queries'\], unexpected \[\]\)"),
])
def test_a_single_expert_is_checked_against_the_layout_of_its_config(experts, tmp_path, edit, says):
    """With one expert (or all alike) there is no other expert to compare with: the config's layout is the check."""
    bad = copy_expert(experts[1][1], tmp_path / "bad", edit_tensors=edit)
    with pytest.raises(MergeError, match=says):
        ExpertSet.open([("bad", bad)])


def test_expert_set_refuses_other_configs_dtypes_and_a_boolean_init_seed(experts, tmp_path):
    for spec in ("spatial=", "=some/dir", "spatial"):
        with pytest.raises(MergeError, match=rf"--experts entry '{spec}': expected NAME=DIR"):
            parse_expert_specs([spec])
    renamed = copy_expert(experts[1][1], tmp_path / "renamed", edit_manifest=lambda m: m["config"].update(name="tiny-b"))
    with pytest.raises(MergeError, match=r"experts 'spatial' and 'b' have different model configs \(fields \['name'\]\)"):
        ExpertSet.open([experts[0], ("b", renamed)])
    wide = copy_expert(experts[1][1], tmp_path / "wide",
                       edit_tensors=lambda t: t.update(action_queries=t["action_queries"].double()))
    with pytest.raises(MergeError, match=r"experts 'spatial' and 'b': tensor 'action_queries' is torch\.float32 "
                                         r"\[16, 128\] vs torch\.float64 \[16, 128\]"):
        ExpertSet.open([experts[0], ("b", wide)])
    flag = copy_expert(experts[1][1], tmp_path / "flag", edit_manifest=lambda m: m.update(init_seed=True))
    with pytest.raises(MergeError, match=r"expert 'b': .*manifest\.json field 'init_seed' is True, expected an integer"):
        ExpertSet.open([("b", flag)])


# ------------------------------------------------------------------------------ merge options and loading


def test_router_options_at_their_limits(experts, tmp_path):
    n_blocks, hidden = get_config("tiny").num_expert_blocks, get_config("tiny").llm.hidden_size
    for opts, msg in [(MergeOptions(router_layer=n_blocks + 1), rf"router_layer must be in \[0, {n_blocks}\] or -1, got {n_blocks + 1}"),
                      (MergeOptions(router_block=n_blocks), rf"router_block must be in \[0, {n_blocks - 1}\] or -1"),
                      (MergeOptions(k_gate=hidden + 1), rf"k_gate must be in \[1, {hidden}\], got {hidden + 1}")]:
        with pytest.raises(MergeError, match=msg):
            merge_experts(experts[:2], tmp_path / "out", opts, log=quiet)
    assert not (tmp_path / "out").exists()
    # the largest values each accepts: the last block, the embedding layer's states, every direction of D
    out = merge_experts(experts[:2], tmp_path / "m", MergeOptions(algorithm="task_arithmetic", masks=False,
                        router_block=n_blocks - 1, router_layer=0, k_gate=hidden), log=quiet)
    router = json.loads((out / "manifest.json").read_text())["router"]
    assert (router["block"], router["layer"], router["k_gate"]) == (n_blocks - 1, 0, hidden)
    assert load_merged(out).subspaces()[0].shape == (2, hidden, hidden)


def test_cli_options_reach_the_merge_and_default_like_the_api():
    from model_merging.mergy import options_from_config

    cfg = MergyConfig(algorithm="dare", masks=False, mask_lambda=0.7, k_gate=4, expert_head_layers=2,
                      per_task_parts=["proprio_proj"], router_block=0, router_layer=1, rules=["llm p=0.2"],
                      scratch_weights=[1.0, 3.0], seed=7, device="cpu", verify_hashes=False, dare=DareParams(p=0.3))
    assert options_from_config(cfg) == MergeOptions(
        algorithm="dare", params=DareParams(p=0.3), rules=("llm p=0.2",), masks=False, mask_lambda=0.7, k_gate=4,
        expert_head_layers=2, per_task_parts=("proprio_proj",), router_block=0, router_layer=1,
        scratch_weights=(1.0, 3.0), seed=7, device="cpu", verify_hashes=False)
    # `mergy` with no options merges as merge_experts does with none
    assert options_from_config(MergyConfig()) == MergeOptions(params=TiesParams())


def test_loader_refuses_a_wrong_dtype_and_a_manifest_missing_a_from_scratch_part(experts, tmp_path):
    from safetensors.torch import save_file

    out = merge_experts(experts[:2], tmp_path / "m", MergeOptions(algorithm="task_arithmetic"), log=quiet)
    f, mf = out / "model.safetensors", out / "manifest.json"
    tensors, manifest = load_file(str(f)), json.loads(mf.read_text())

    def rewrite(ts, m):  # a consistent artifact again: its manifest records the new file's sha256
        save_file(ts, str(f))
        mf.write_text(json.dumps({**m, "weights_sha256": hashlib.sha256(f.read_bytes()).hexdigest()}))

    p = "proprio_proj.0.weight"
    rewrite({**tensors, f"shared.{p}": tensors[f"shared.{p}"].double()}, manifest)
    with pytest.raises(MergeError, match=rf"tensor 'shared.{p}' is torch.float64 \[.*\], the manifest implies torch.float32"):
        load_merged(out)
    # file and manifest agree, but the manifest leaves out a part the config has: it would keep its random init
    rewrite({k: v for k, v in tensors.items() if k != f"shared.{p}"},
            {**manifest, "shared_params": {k: v for k, v in manifest["shared_params"].items() if k != p}})
    with pytest.raises(MergeError, match=rf"do not match config 'tiny' \(missing \['{p}'\], extra \[\]\)"):
        load_merged(out).for_task(0)
