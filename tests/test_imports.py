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
         "experiments.robot.libero.run_libero_eval"]


def test_the_cli_modules_import_without_the_model():
    code = ("import runpy, sys\n"
            f"for m in {LIGHT!r}: __import__(m)\n"
            "runpy.run_path('vla-scripts/finetune.py', run_name='not_main')\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'transformers', 'peft'}))")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]"


def test_finetune_refuses_a_bad_flag_before_importing_the_trainer():
    code = ("import runpy, sys\n"
            "sys.argv = ['finetune.py', '--config_name', 'tiny', '--lr', 'nan']\n"
            "ns = runpy.run_path('vla-scripts/finetune.py', run_name='not_main')\n"
            "print(ns['main'](), 'prismatic.training.trainer' in sys.modules, 'transformers' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert r.stdout.strip() == "2 False False", r.stderr[-2000:]
    assert "finetune: error: lr is nan, expected a finite number" in r.stderr


@pytest.mark.parametrize("package", [prismatic.models, model_merging, prismatic.training])
def test_every_public_name_resolves_on_first_use(package):
    for name in package.__all__:
        value = getattr(package, name)
        assert getattr(value, "__name__", name) == name or name.isupper(), name  # the object, not a module
        assert name in dir(package)
    with pytest.raises(AttributeError, match=f"module '{package.__name__}' has no attribute 'nope'"):
        package.nope  # noqa: B018
