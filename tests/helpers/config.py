"""The composed config of ``python -m kdlab <overrides>`` without running it: ``compose_config`` (a resolved plain
dict), ``compose_dictconfig`` (Hydra's DictConfig, unresolved, optionally with the ``hydra`` node); ``stage_keys``
and ``wiring`` of a composed config."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


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


class _DataStub:
    """What stage_description needs from a datamodule; the fingerprint stands for the data config."""

    num_classes, in_channels, image_size = 10, 1, 28
    train_views = False

    def __init__(self, data_cfg: dict):
        self._cfg = {k: v for k, v in data_cfg.items() if k != "batch_size"}

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self._cfg, sort_keys=True).encode()).hexdigest()[:16]

    def for_stage(self, seed=None, augment=None, views=False) -> _DataStub:
        """A stage's view (pipeline.per_stage.<stage>.augment: another data fingerprint); this stub unchanged."""
        stage = _DataStub(self._cfg)
        if augment is not None:
            stage._cfg["augment"] = augment
        stage.train_views = bool(views)
        return stage


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

