"""The CLIs check their flags before importing the model: transformers and peft take seconds to import, which a
user pays on every refused command and every `--help`, and the bash scripts pay in each helper call."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import model_merging
import prismatic.models
import prismatic.training

REPO = Path(__file__).resolve().parents[1]
LIGHT = ["prismatic.models", "prismatic.models.loading", "prismatic.training", "model_merging",
         "model_merging.mergy", "model_merging.average_parts", "model_merging.exemplar_router",
         "experiments.robot.libero.run_libero_eval", "experiments.robot.demo"]


def _python(code: str) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter at the repository root, offline."""
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})


def test_the_cli_modules_import_without_the_model():
    code = ("import runpy, sys\n"
            f"for m in {LIGHT!r}: __import__(m)\n"
            "runpy.run_path('vla-scripts/finetune.py', run_name='not_main')\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'transformers', 'peft'}))")
    r = _python(code)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]"


@pytest.mark.parametrize("run, argv, message", [
    ("runpy.run_path('vla-scripts/finetune.py', run_name='not_main')['main']()", ["--config_name", "tiny", "--lr", "nan"],
     "finetune: error: lr is nan, expected a finite number"),
    ("__import__('experiments.robot.demo').robot.demo.cli()", ["--quick", "true", "--out_dir", "README.md"],
     "demo: error: out_dir README.md is a file, not a directory"),
])
def test_a_refused_flag_never_imports_the_model(run, argv, message):
    code = ("import runpy, sys\n"
            f"sys.argv = ['cli', *{argv!r}]\n"
            f"print({run}, sorted({{m.split('.')[0] for m in sys.modules}} & {{'transformers', 'peft'}}))")
    r = _python(code)
    assert r.stdout.strip() == "2 []", r.stderr[-2000:]
    assert message in r.stderr


@pytest.mark.parametrize("package", [prismatic.models, model_merging, prismatic.training])
def test_every_public_name_resolves_on_first_use(package):
    for name in package.__all__:
        value = getattr(package, name)
        assert getattr(value, "__name__", name) == name or name.isupper(), name  # the object, not a module
        assert name in dir(package)
    with pytest.raises(AttributeError, match=f"module '{package.__name__}' has no attribute 'nope'"):
        package.nope  # noqa: B018
