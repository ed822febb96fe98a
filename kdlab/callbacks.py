"""Callbacks: progress display (rich on a terminal, one plain line per epoch elsewhere)."""
from __future__ import annotations

import os
import sys
import time

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback, RichProgressBar


def interactive() -> bool:
    return sys.stderr.isatty() and not os.environ.get("CI")


class EpochLines(Callback):
    """One line per epoch -- readable in CI logs and files, unlike redrawn progress bars."""

    def __init__(self, stage: str):
        self.stage = stage
        self._t0 = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        m = trainer.callback_metrics
        parts = [f"[{self.stage}] epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"]
        for key in ("train/loss", "train/acc", "val/loss", "val/acc"):
            if key in m:
                parts.append(f"{key} {float(m[key]):.4f}")
        parts.append(f"({time.perf_counter() - self._t0:.1f} s)")
        print(" ".join(parts), file=sys.stderr, flush=True)


def progress_callbacks(mode: str, stage: str) -> tuple[list[Callback], bool]:
    """Callbacks for ``callbacks.progress`` (auto | rich | plain | none) and whether Lightning's own bar is on."""
    if mode == "auto":
        mode = "rich" if interactive() else "plain"
    if mode == "rich":
        return [RichProgressBar(leave=True)], True
    if mode == "plain":
        return [EpochLines(stage)], False
    return [], False
