"""Callbacks of every stage's Trainer, instantiated from ``conf/callbacks`` (Hydra ``_target_``).

``callbacks.progress`` (auto | rich | plain | none) is the one setting; every other entry is a Lightning
callback config, instantiated for each stage (``conf/callbacks/default.yaml``'s ``display`` turns the
setting into a progress display). Add one from the command line, e.g.
``+callbacks.lr_monitor._target_=pytorch_lightning.callbacks.LearningRateMonitor``. The stage's own
checkpointing (best and last, in the store's work directory) is not a config entry: the store needs it.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any

import pytorch_lightning as pl
from hydra.utils import instantiate
from pytorch_lightning.callbacks import Callback, ProgressBar, RichProgressBar

from kdlab.errors import ConfigError

PROGRESS_MODES = ("auto", "rich", "plain", "none")


def interactive() -> bool:
    return sys.stderr.isatty() and not os.environ.get("CI")


class EpochLines(Callback):
    """One line per epoch -- readable in CI logs and files, unlike redrawn progress bars (rank 0 only)."""

    def __init__(self) -> None:
        self._t0 = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        m = trainer.callback_metrics
        stage = getattr(pl_module, "stage_name", "stage")
        parts = [f"[{stage}] epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"]
        for key in ("train/loss", "train/acc", "val/loss", "val/acc", "test/loss_epoch", "test/acc_epoch"):
            if key in m:
                parts.append(f"{key} {float(m[key]):.4f}")
        parts.append(f"({time.perf_counter() - self._t0:.1f} s)")
        print(" ".join(parts), file=sys.stderr, flush=True)


def progress_display(mode: str = "auto") -> Callback | None:
    """``callbacks.progress``: Lightning's rich bar (on a terminal with ``auto``), one plain line per epoch
    (elsewhere), or nothing. Lightning shows a bar on rank 0 only; EpochLines prints on rank 0 only."""
    if str(mode) not in PROGRESS_MODES:
        raise ConfigError(f"unknown callbacks.progress {mode!r}; known: {', '.join(PROGRESS_MODES)}")
    if mode == "auto":
        mode = "rich" if interactive() else "plain"
    if mode == "rich":
        return RichProgressBar(leave=True)
    if mode == "plain":
        return EpochLines()
    return None


def build_callbacks(cfg: dict[str, Any] | None) -> list[Callback]:
    """The configured callbacks (entries that build to None, like ``progress_display("none")``, add none).
    A bad entry is a ConfigError naming it."""
    out: list[Callback] = []
    for entry, node in (cfg or {}).items():
        if entry == "progress" or node is None or node is False:
            continue
        if not isinstance(node, dict) or "_target_" not in node:
            raise ConfigError(f"callbacks.{entry} must be a callback config with a _target_ or null, got {node!r}")
        try:
            cb = instantiate(node)
        except ConfigError:
            raise
        except Exception as e:
            cause = e.__cause__ or e
            if isinstance(cause, ConfigError):
                raise cause from None
            raise ConfigError(f"callbacks.{entry}: {(str(cause).strip().splitlines() or [type(cause).__name__])[0]}"
                              ) from e
        if cb is None:
            continue
        if not isinstance(cb, Callback):
            raise ConfigError(f"callbacks.{entry}._target_ {node['_target_']!r} is not a Lightning callback")
        out.append(cb)
    return out


def has_progress_bar(callbacks: list[Callback]) -> bool:
    """Whether Lightning's progress bar must be enabled (it refuses a ProgressBar callback otherwise)."""
    return any(isinstance(cb, ProgressBar) for cb in callbacks)
