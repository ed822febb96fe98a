"""Shared helpers: run the real CLI in a subprocess on small synthetic data."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

# Tiny, learnable synthetic data and short training: every CLI test runs in seconds.
SYNTH = ["preset=none", "data=synthetic", "data.n_train=640", "data.n_test=200", "data.batch_size=64", "logger=csv",
         "trainer.max_epochs=2", "optimizer.lr=0.01", "callbacks.progress=plain"]


def kdlab_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"WANDB_MODE": "offline", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0",
                "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"})
    env.pop("WANDB_API_KEY", None)
    env.update(extra or {})
    return env


def run_kdlab(args: list[str], out: Path, run_dir: Path | None = None, synth: bool = True, timeout: int = 600,
              multirun: bool = False, env: dict[str, str] | None = None, module: str = "kdlab"
              ) -> subprocess.CompletedProcess:
    """``python -m kdlab`` with outputs under ``out`` (store shared between calls with the same ``out``)."""
    cmd = [sys.executable, "-m", module]
    if multirun:
        cmd.append("-m")
    cmd += (SYNTH if synth else []) + list(args) + [f"paths.output_dir={out}"]
    if run_dir is not None:
        cmd.append(f"hydra.{'sweep' if multirun else 'run'}.dir={run_dir}")
    return subprocess.run(cmd, cwd=ROOT, env=kdlab_env(env), capture_output=True, text=True, timeout=timeout,
                          check=False)


def read_results(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "results.json").read_text())


def trained(results: dict) -> list[str]:
    return [s["name"] for s in results["stages"] if not s["cached"]]


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)
    yield
