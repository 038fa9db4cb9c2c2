"""The command-line entry points as users run them: finetune.py, torchrun (2 gloo processes), the bash script."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from data_fixtures import SUITE, echo_python, hdf5_root, script_env
from transformers import Qwen2ForCausalLM

from prismatic.checkpoint import load_checkpoint
from prismatic.models.configuration import get_config
from prismatic.models.modeling import qwen2_hf_config

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "vla-scripts" / "finetune.py"
BASH = REPO / "bash_scripts" / "finetune_libero.sh"
TINY = ["--config_name", "tiny", "--batch_size", "2", "--grad_accumulation_steps", "1", "--progress_bar", "false",
        "--seed", "0", "--device", "cpu", "--cpu_threads", "1"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return hdf5_root(tmp_path_factory.mktemp("libero"))


def _env(**extra):
    return script_env(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **extra)


def _run(cmd, timeout=240, **env):
    return subprocess.run(cmd, cwd=REPO, env=_env(**env), capture_output=True, text=True, timeout=timeout)


def test_bad_input_exits_2_with_a_message_and_no_traceback(tmp_path):
    r = _run([sys.executable, str(SCRIPT), *TINY, "--data_root", str(tmp_path / "nowhere"),
              "--out_dir", str(tmp_path / "out")])
    assert r.returncode == 2, r.stderr
    assert f"error: data_root {tmp_path / 'nowhere'} does not exist" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_refusals_come_before_anything_is_written(data_root, tmp_path):
    """Each bad flag exits 2 with one line naming it; no out_dir appears, so the corrected command runs."""
    (tmp_path / "afile").write_text("")
    cfg = get_config("tiny")
    Qwen2ForCausalLM(qwen2_hf_config(cfg)).save_pretrained(tmp_path / "qwen")
    llm = {f"llm.{k}": v for k, v in Qwen2ForCausalLM(qwen2_hf_config(cfg)).state_dict().items()}
    bad_ckpt = tmp_path / "bad.pt"  # a Prismatic checkpoint whose projector has the wrong shape
    torch.save({"model": {"projector": {"4.weight": torch.zeros(3, 3)}, "llm_backbone": llm}}, bad_ckpt)
    cases = [
        (["--lr", "nan"], "error: lr is nan, expected a finite number"),
        (["--seed", "-1"], "error: seed is -1, expected >= 0"),
        (["--attn_implementation", "flash_attention_2"], "error: attn_implementation flash_attention_2 needs a CUDA device"),
        (["--base.random_seed", "0", "--base.llm_path", str(tmp_path / "no_qwen"), "--config_name", "qwen25-dinosiglip-224px"],
         f"error: no tokenizer.json at {tmp_path / 'no_qwen'}"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "error: device is 'cuda' but no CUDA device is available"))
    cases += [
        ([], f"{tmp_path / 'afile'} is a file, not a directory", tmp_path / "afile" / "run"),
        (["--base.llm_path", str(tmp_path / "qwen"), "--base.random_seed", "0", "--base.prismatic_checkpoint",
          str(bad_ckpt)], "does not fit config 'tiny'"),
    ]
    runs = []  # each run spends seconds importing torch; they run side by side
    for i, (flags, msg, *out) in enumerate(cases):
        out = out[0] if out else tmp_path / f"run{i}"
        cmd = [sys.executable, str(SCRIPT), *TINY, "--data_root", str(data_root), "--out_dir", str(out), "--max_steps",
               "1", *flags]
        runs.append((flags, msg, out, subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                                                       stderr=subprocess.PIPE, text=True)))
    for flags, msg, out, proc in runs:
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 2 and msg in err and "Traceback" not in err, (flags, err[-2000:])
        assert not out.exists(), flags


def test_two_process_gloo_ddp_run(data_root, tmp_path):
    out = tmp_path / "ddp"
    r = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
              *TINY, "--data_root", str(data_root), "--out_dir", str(out), "--max_steps", "3", "--save_every", "3",
              "--log_every", "1"], timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    tensors, manifest = load_checkpoint(out / "checkpoints" / "step_000003", "mergevla-checkpoint")
    assert manifest["step"] == 3 and all(torch.isfinite(t).all() for t in tensors.values())
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    n = manifest["dataset"]["num_steps"]
    assert [r["step"] for r in rows] == [1, 2, 3]  # only rank 0 logs
    assert rows[-1]["epoch"] == pytest.approx(3 * 2 * 2 / n)  # 2 processes × batch 2 per step
    # train() checks at the end that both processes hold the same weights; it would have exited non-zero


@pytest.mark.parametrize("env, flags, says", [
    ({}, ["--suite", "libero_object"], "error: give the suite as the first argument"),
    ({}, ["--suite=libero_object"], "error: give the suite as the first argument"),
    ({"NPROC": "abc"}, [], "error: NPROC is 'abc', expected a positive integer"),
    ({"NPROC": "0"}, [], "error: NPROC is '0', expected a positive integer"),
    ({"PYTHON": "/nonexistent/python"}, [], "error: PYTHON=/nonexistent/python is not an executable"),
])
def test_bash_script_refuses_a_suite_flag_a_bad_nproc_and_no_interpreter(tmp_path, env, flags, says):
    r = _run(["bash", str(BASH), *flags], **{"OUT_ROOT": str(tmp_path / "runs"), "PYTHON": sys.executable, **env})
    assert r.returncode == 2 and says in r.stderr and not (tmp_path / "runs").exists(), r.stderr


def test_bash_script_trains_checkpoints_and_resumes(data_root, tmp_path):
    env = {"DATA_ROOT": str(data_root), "OUT_ROOT": str(tmp_path / "runs"), "PYTHON": sys.executable, "NPROC": "1"}
    first = _run(["bash", str(BASH), SUITE, *TINY, "--max_steps", "2", "--save_every", "1"], **env)
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / "runs" / f"{SUITE}-tiny-cross_attn-seed0"  # TINY trains seed 0
    again = _run(["bash", str(BASH), SUITE, *TINY, "--max_steps", "3", "--save_every", "1", "--resume", "true"], **env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming" in again.stderr and "from step 2" in again.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000001", "step_000002", "step_000003"]
    cfg = json.loads((run / "run.json").read_text())["config"]
    assert cfg["suite"] == SUITE and cfg["config_name"] == "tiny" and cfg["data_root"] == str(data_root)


@pytest.mark.parametrize("suite,steps", [("libero_spatial", 30000), ("libero_object", 20000),
                                         ("libero_goal", 30000), ("libero_10", 50000)])
def test_bash_script_sets_each_suites_step_count(tmp_path, suite, steps):
    fake = tmp_path / "python"  # an "interpreter" that prints the command line it was given
    echo_python(fake)
    r = _run(["bash", str(BASH), suite, "--lr", "1e-4"], PYTHON=str(fake), NPROC="1", DATA_ROOT="/data/x")
    argv = r.stdout.split("\n")
    assert r.returncode == 0 and argv[0].endswith("finetune.py")
    assert argv[argv.index("--max_steps") + 1] == str(steps) and argv[argv.index("--suite") + 1] == suite
    assert argv[argv.index("--data_root") + 1] == "/data/x"
    assert argv[argv.index("--base.base_dir") + 1] == "pretrained_models/mergevla-base-qwen25-dinosiglip-224px"
    assert argv[argv.index("--resume") + 1] == "true"  # re-running the command continues the run
    assert argv[-3:-1] == ["--lr", "1e-4"]  # the user's flags come last, so they win


def test_bash_script_needs_steps_for_other_suites():
    r = _run(["bash", str(BASH), "libero_90"], PYTHON=sys.executable, NPROC="1")
    assert r.returncode == 2 and "no default step count for suite 'libero_90'" in r.stderr


@pytest.mark.parametrize("flags, env, run", [
    ([], {}, "libero_90-tiny-cross_attn-seed7"),
    (["--seed=3", "--expert_arch", "self_attn"], {}, "libero_90-tiny-self_attn-seed3"),
    (["--expert_arch=self_attn"], {"SEED": "5"}, "libero_90-tiny-self_attn-seed5"),
    (["--seed", "1"], {"SEED": "5"}, "libero_90-tiny-cross_attn-seed1"),  # the flag comes last, so it wins
])
def test_bash_script_names_the_run_by_config_architecture_and_seed(tmp_path, flags, env, run):
    """As finetune.py names its default run, so a second seed or the baseline gets a directory of its own."""
    fake = tmp_path / "python"
    echo_python(fake)
    r = _run(["bash", str(BASH), "libero_90", "--max_steps=2", "--config_name=tiny", *flags], PYTHON=str(fake),
             NPROC="1", OUT_ROOT="out", **env)
    argv = r.stdout.split("\n")
    assert r.returncode == 0, r.stderr
    assert "--max_steps" not in argv and "--base.base_dir" not in argv  # tiny trains on a random base
    assert argv[argv.index("--out_dir") + 1] == f"out/{run}"


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_same_weights(data_root, tmp_path):
    """A real kill -9 in the middle of training (the default suite simulates the crash in-process)."""
    args = [sys.executable, str(SCRIPT), *TINY, "--data_root", str(data_root), "--max_steps", "6",
            "--save_every", "2", "--grad_accumulation_steps", "2"]
    assert _run([*args, "--out_dir", str(tmp_path / "a")]).returncode == 0
    proc = subprocess.Popen([*args, "--out_dir", str(tmp_path / "b")], cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while not (tmp_path / "b" / "checkpoints" / "step_000002" / "manifest.json").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert _run([*args, "--out_dir", str(tmp_path / "b"), "--resume", "true"]).returncode == 0
    a, _ = load_checkpoint(tmp_path / "a" / "checkpoints" / "step_000006", "mergevla-checkpoint")
    b, _ = load_checkpoint(tmp_path / "b" / "checkpoints" / "step_000006", "mergevla-checkpoint")
    assert all(torch.equal(a[k], b[k]) for k in a)
