"""Experiment loggers for one stage, instantiated from ``conf/logger`` (Hydra ``_target_``).

``logger`` holds named entries; each non-null entry is a Lightning logger config. For every stage kdlab
instantiates each entry with what its class takes (:func:`stage_kwargs`): ``save_dir`` (the entry's own,
relative to the run directory; default: the entry's name), the stage's name as ``name`` (CSV, TensorBoard,
W&B) or the run's group and the stage as ``run_name`` (MLflow), and for a class that takes a ``stage``
argument (:class:`StageWandbLogger`) the stage's description, the run's W&B group and the config to log.
``logger=none`` has no entries. Add one from the command line, e.g.
``+logger.mlflow._target_=pytorch_lightning.loggers.MLFlowLogger``. :func:`check_loggers` checks every entry
(its class, the library it needs, its arguments) before any data loads.
"""
from __future__ import annotations

import inspect
import logging
import os
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from hydra.utils import get_class, instantiate
from pytorch_lightning.loggers import Logger, WandbLogger

from kdlab.errors import ConfigError


def wandb_mode(requested: str | None) -> str:
    if requested and requested != "auto":
        return requested
    env = os.environ.get("WANDB_MODE")
    if env:
        return env
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class StageWandbLogger(WandbLogger):
    """Lightning's WandbLogger, one W&B run per stage: offline unless a key or ``WANDB_MODE=online`` says
    otherwise (``mode: auto``), grouped by run, the job type the stage's role, tagged with the method, the
    data set and the architecture."""

    def __init__(self, save_dir: str, name: str, stage: dict[str, Any], group: str, run_config: dict[str, Any],
                 project: str = "kdlab", entity: str | None = None, mode: str | None = "auto",
                 tags: list[str] | None = None, **kwargs: Any):
        mode = wandb_mode(mode)
        os.environ.setdefault("WANDB_SILENT", "true")
        super().__init__(
            project=project, entity=entity, group=group, job_type=stage["role"], name=f"{group}/{name}",
            tags=[t for t in (stage.get("method"), stage.get("dataset"), stage.get("arch"), *(tags or [])) if t],
            config=run_config, save_dir=save_dir, offline=(mode == "offline"),
            mode=mode if mode in ("online", "offline", "disabled") else None, reinit="finish_previous", **kwargs)
        # Lightning always passes `anonymous`, which wandb >= 0.19 warns about on every run; it has no effect.
        getattr(self, "_wandb_init", {}).pop("anonymous", None)


#: Lightning loggers whose library is an optional install: (the module each needs, its pip package)
NEEDS: dict[str, tuple[str, str]] = {"MLFlowLogger": ("mlflow", "mlflow"), "CometLogger": ("comet_ml", "comet-ml"),
                                     "NeptuneLogger": ("neptune", "neptune"), "WandbLogger": ("wandb", "wandb")}


def _class(target: str) -> Any:
    """Hydra's ``get_class`` without the log line it writes for a target it cannot import (the ConfigError
    that follows names it)."""
    log = logging.getLogger("hydra.utils")
    disabled, log.disabled = log.disabled, True
    try:
        return get_class(target)
    finally:
        log.disabled = disabled


def logger_entries(cfg: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """The non-null entries of ``logger``, each checked to name an importable logger class (a ConfigError
    otherwise, before anything trains)."""
    out: dict[str, dict[str, Any]] = {}
    for entry, node in (cfg or {}).items():
        if node is None or node is False:
            continue
        if not isinstance(node, dict) or "_target_" not in node:
            raise ConfigError(f"logger.{entry} must be a logger config with a _target_ (e.g. "
                              f"pytorch_lightning.loggers.CSVLogger) or null, got {node!r}")
        try:
            cls = _class(str(node["_target_"]))
        except Exception as e:
            raise ConfigError(f"logger.{entry}._target_ {node['_target_']!r} cannot be imported: "
                              f"{(str(e).strip().splitlines() or [type(e).__name__])[-1]}") from e
        if not (isinstance(cls, type) and issubclass(cls, Logger)):
            raise ConfigError(f"logger.{entry}._target_ {node['_target_']!r} is not a Lightning logger")
        out[entry] = dict(node)
    return out


def stage_kwargs(cls: type, entry: str, node: dict[str, Any], run_dir: Path, stage: dict[str, Any], group: str,
                 run_config: dict[str, Any]) -> dict[str, Any]:
    """What kdlab passes a logger of class ``cls`` for one stage (over the entry's own values), each only where
    the class takes it: ``save_dir`` (the entry's, relative to the run directory), the stage's name as
    ``name`` or ``<group>/<stage>`` as ``run_name`` (MLflow: a run of the tracking server, like W&B's run name),
    and for a class that takes ``stage`` (StageWandbLogger) the stage, the group and the config to log."""
    params = inspect.signature(cls).parameters
    save = Path(str(node.get("save_dir", entry)))
    out: dict[str, Any] = {}
    if "save_dir" in params:
        out["save_dir"] = str(save if save.is_absolute() else run_dir / save)
    if "name" in params:
        out["name"] = stage["name"]
    elif "run_name" in params:
        out["run_name"] = f"{group}/{stage['name']}"
    if "stage" in params:
        out.update(stage=stage, group=group, run_config=run_config)
    return out


def check_loggers(cfg: dict[str, Any] | None) -> None:
    """Every logger entry names a Lightning logger whose library is installed and that takes the entry's
    arguments and kdlab's (:func:`stage_kwargs`): a ConfigError naming the entry otherwise, before any data
    loads (instantiating a logger would start its run)."""
    for entry, node in logger_entries(cfg).items():
        cls = get_class(str(node["_target_"]))
        for base in cls.__mro__:
            module, package = NEEDS.get(base.__name__, (None, None))
            if module and base.__module__.startswith("pytorch_lightning") and find_spec(module) is None:
                raise ConfigError(f"logger.{entry}: {cls.__name__} needs the {package} package, which is not "
                                  f"installed (pip install {package}), or drop the entry (logger.{entry}=null)")
        given = {k: v for k, v in node.items() if not k.startswith("_")}
        kwargs = {**given, **stage_kwargs(cls, entry, node, Path("."), {"name": "student", "role": "student"},
                                          "group", {})}
        try:
            inspect.signature(cls).bind(**kwargs)
        except TypeError as e:
            takes = ", ".join(p for p in inspect.signature(cls).parameters if p not in ("self", "kwargs"))
            raise ConfigError(f"logger.{entry}: {cls.__name__} {e}; it takes: {takes}") from e


def build_loggers(cfg: dict[str, Any] | None, run_dir: Path, stage: dict[str, Any], group: str,
                  wandb_config: dict[str, Any]) -> list[Logger]:
    loggers: list[Logger] = []
    for entry, node in logger_entries(cfg).items():
        kwargs = stage_kwargs(get_class(str(node["_target_"])), entry, node, run_dir, stage, group, wandb_config)
        node.pop("save_dir", None)
        try:
            # partial, then called: the stage values reach the logger as they are (not as Hydra config nodes)
            loggers.append(instantiate(node, _partial_=True, _convert_="all")(**kwargs))
        except Exception as e:
            cause = e.__cause__ or e
            raise ConfigError(f"logger.{entry}: {(str(cause).strip().splitlines() or [type(cause).__name__])[0]}"
                              ) from e
    return loggers


def finish_loggers(loggers: list[Logger], status: str = "success") -> None:
    """Close every logger so that each stage's W&B run ends (marked failed when the stage failed) before the
    next stage starts."""
    for lg in loggers:
        lg.finalize(status)
        if isinstance(lg, WandbLogger):
            run = getattr(lg, "_experiment", None)  # never start a run just to finish it
            if run is not None and hasattr(run, "finish"):
                run.finish(exit_code=0 if status == "success" else 1)
