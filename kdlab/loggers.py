"""Experiment loggers for one stage: W&B (offline unless a key or WANDB_MODE=online says otherwise),
CSV alongside, optional TensorBoard. ``logger=none`` turns them all off."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pytorch_lightning.loggers import CSVLogger, Logger


def wandb_mode(requested: str | None) -> str:
    if requested and requested != "auto":
        return requested
    env = os.environ.get("WANDB_MODE")
    if env:
        return env
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def build_loggers(cfg: dict[str, Any], run_dir: Path, stage: dict[str, Any], group: str,
                  wandb_config: dict[str, Any]) -> list[Logger]:
    loggers: list[Logger] = []
    if cfg.get("csv"):
        loggers.append(CSVLogger(save_dir=str(run_dir / "csv"), name=stage["name"], version=""))
    if cfg.get("tensorboard"):
        from pytorch_lightning.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(save_dir=str(run_dir / "tensorboard"), name=stage["name"], version=""))
    w = cfg.get("wandb")
    if w:
        from pytorch_lightning.loggers import WandbLogger

        mode = wandb_mode(w.get("mode"))
        os.environ.setdefault("WANDB_SILENT", "true")
        loggers.append(WandbLogger(
            project=w.get("project", "kdlab"), entity=w.get("entity"), group=group,
            job_type=stage["role"], name=f"{group}/{stage['name']}",
            tags=[t for t in (stage.get("method"), stage.get("dataset"), stage.get("arch"), *(w.get("tags") or []))
                  if t],
            config=wandb_config, save_dir=str(run_dir), offline=(mode == "offline"),
            mode=mode if mode in ("online", "offline", "disabled") else None, reinit="finish_previous",
        ))
        # Lightning always passes `anonymous`, which wandb >= 0.19 warns about on every run; it has no effect.
        getattr(loggers[-1], "_wandb_init", {}).pop("anonymous", None)
    return loggers


def finish_loggers(loggers: list[Logger], status: str = "success") -> None:
    """Close every logger so that each stage's W&B run ends (marked failed when the stage failed) before the
    next stage starts."""
    for lg in loggers:
        lg.finalize(status)
        if type(lg).__name__ == "WandbLogger":
            run = getattr(lg, "_experiment", None)  # never start a run just to finish it
            if run is not None and hasattr(run, "finish"):
                run.finish(exit_code=0 if status == "success" else 1)
