"""Shared helpers and fixtures of the test suite (pytest loads this file first; import from ``tests.conftest``).

* the CLI in a subprocess on small synthetic data: ``run_kdlab``, ``read_results``, ``trained``, ``SYNTH``;
* the composed config of ``python -m kdlab <overrides>`` without running it: ``compose_config`` (a resolved
  plain dict; the ``compose`` fixture is the same function), ``compose_dictconfig`` (Hydra's DictConfig,
  unresolved, optionally with the ``hydra`` node); ``stage_keys`` and ``wiring`` of a composed config;
* a small in-memory synthetic datamodule: ``synthetic_datamodule`` (the ``synthetic_dm`` fixture).
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

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


# -- the composed config of `python -m kdlab <overrides>` (the repo's conf/, preset included) ---------------
def compose_dictconfig(*overrides: str, return_hydra_config: bool = False) -> Any:
    """Hydra's composed config (a DictConfig, not resolved) for ``overrides``, as the CLI composes it:
    kdlab's ``model=<zoo name>`` groups registered, Hydra's global state cleared before and after."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from kdlab.cli.hydra_app import CONF_DIR, register_configs

    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides), return_hydra_config=return_hydra_config)
    finally:
        GlobalHydra.instance().clear()


def compose_config(*overrides: str) -> dict:
    """The resolved config (a plain dict) that ``python -m kdlab <overrides>`` runs."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(compose_dictconfig(*overrides), resolve=True)


@pytest.fixture(scope="session")
def compose():
    """``compose("+experiment=kd_fashion_mnist", "seed=1")``: :func:`compose_config` as a fixture."""
    return compose_config


class _DataStub:
    """What stage_description needs from a datamodule; the fingerprint stands for the data config."""

    num_classes, in_channels, image_size = 10, 1, 28

    def __init__(self, data_cfg: dict):
        self._fp = hashlib.sha256(json.dumps({k: v for k, v in data_cfg.items() if k != "batch_size"},
                                             sort_keys=True).encode()).hexdigest()[:16]

    def fingerprint(self) -> str:
        return self._fp


def stage_keys(cfg: dict) -> dict[str, str]:
    """Store key of every stage of a composed config, computed as the runner does (sources' keys chained in)."""
    from kdlab.pipeline import build_stages
    from kdlab.pipeline.assemble import stage_description
    from kdlab.pipeline.context import RunContext
    from kdlab.store import stage_key

    ctx = RunContext(cfg=cfg, run_dir=Path("."), store=None, dm=_DataStub(cfg["data"]), method="m", dataset="d",
                     group="g")
    keys: dict[str, str] = {}
    for spec in build_stages(cfg):
        keys[spec.name] = stage_key(stage_description(spec, ctx, [keys[s] for s in spec.sources]))
    return keys


def wiring(cfg: dict) -> dict[str, list[str]]:
    """{stage: its sources} of a composed config."""
    from kdlab.pipeline import build_stages

    return {s.name: s.sources for s in build_stages(cfg)}


# -- a small synthetic datamodule (in-memory tensors, loaded at once) ------------------------------------------
def synthetic_datamodule(batch_size: int = 32, seed: int = 0, **data: Any):
    """``build_datamodule({"name": "synthetic", **data}, batch_size, seed)``, loaded (prepare_data and setup
    done); ``data`` are synthetic's keys (n_train, n_test, augment, image_size, ...: kdlab/data/config.py)."""
    from kdlab.data import build_datamodule

    return build_datamodule({"name": "synthetic", **data}, batch_size=batch_size, seed=seed)


@pytest.fixture(scope="session")
def synthetic_dm():
    """``synthetic_dm(n_train=256, n_test=64, batch_size=32)``: :func:`synthetic_datamodule` as a fixture."""
    return synthetic_datamodule
