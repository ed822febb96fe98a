"""A run imports only what it uses (process start-up counts in every job): ``python -m kdlab --help`` loads
torch (the zoo's model names are config options, registered from the model code) but not Lightning, torchmetrics,
torchvision or W&B, and a run with ``logger=csv`` loads no package beyond what torch, Lightning and
Hydra import themselves: not W&B (only with ``logger=wandb``), not the joblib / submitit launchers or Optuna (only
in a sweep that names them), not onnx / onnxruntime (``python -m kdlab.export``), not timm (``timm/<name>``
models), not pandas. The modules are read from the real process at its exit (``sys.modules``)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers.cli import ROOT, SYNTH, kdlab_env

# python -m kdlab, recording sys.modules when the process exits (after kdlab's own sys.exit)
RECORD = r"""
import atexit, json, runpy, sys
out = sys.argv.pop(1)
atexit.register(lambda: open(out, "w").write(json.dumps(sorted(sys.modules))))
runpy.run_module("kdlab", run_name="__main__", alter_sys=True)
"""

NOT_FOR_A_CSV_RUN = ["wandb", "joblib", "submitit", "optuna", "onnx", "onnxruntime", "timm", "pandas", "tensorboard"]


def modules_of(args: list[str], tmp_path, name: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    record = tmp_path / f"{name}.json"
    proc = subprocess.run([sys.executable, "-c", RECORD, str(record), *args], cwd=ROOT, env=kdlab_env(),
                          capture_output=True, text=True, timeout=600, check=False)
    return proc, set(json.loads(record.read_text()))


def libraries_alone() -> set[str]:
    """The top-level packages that importing torch, Lightning, Hydra and OmegaConf loads by itself."""
    code = "import sys, json, torch, pytorch_lightning, hydra, omegaconf; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=kdlab_env(), capture_output=True, text=True,
                         timeout=300, check=True).stdout
    return {m.split(".")[0] for m in json.loads(out.strip().splitlines()[-1])}


def test_help_loads_no_lightning(tmp_path):
    proc, mods = modules_of(["--help"], tmp_path, "help")
    assert proc.returncode == 0, proc.stderr
    assert "model: " in proc.stdout and "plain10" in proc.stdout  # the zoo's names, registered as configs
    top = {m.split(".")[0] for m in mods}
    assert not {"pytorch_lightning", "lightning_fabric", "torchmetrics", "torchvision", "scipy", "matplotlib",
                "wandb", *NOT_FOR_A_CSV_RUN} & top


@pytest.mark.slow  # a long CLI run: in make test-slow (CI runs both)
def test_a_csv_run_loads_nothing_beyond_torch_lightning_and_hydra(tmp_path):
    proc, mods = modules_of([*SYNTH, "pipeline=direct", "pipeline.chain=[plain2,plain2]", "trainer.max_epochs=1",
                             f"paths.output_dir={tmp_path / 'out'}", f"hydra.run.dir={tmp_path / 'run'}"],
                            tmp_path, "run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "run" / "results.json").is_file()
    assert {"torch", "pytorch_lightning", "kdlab.pipeline.train"} <= mods  # it did train
    top = {m.split(".")[0] for m in mods}
    assert not set(NOT_FOR_A_CSV_RUN) & top
    # the store's file lock, Hydra's plugin namespace (its discovery imports the launchers' config modules, not
    # joblib / submitit / optuna themselves) and kdlab: everything else comes with the three libraries
    assert top - libraries_alone() <= {"kdlab", "filelock", "hydra_plugins"}, top - libraries_alone()
