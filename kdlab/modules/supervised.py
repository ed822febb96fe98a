"""SupervisedModule: one model trained from labels. DistillModule extends it with frozen sources."""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MaxMetric
from torchmetrics.classification import MulticlassAccuracy

from kdlab.errors import TrainingError


class SupervisedModule(pl.LightningModule):
    """Trains ``model`` with cross-entropy; logs train/ val/ test/ metrics through torchmetrics.

    ``optimizer`` and ``scheduler`` are partials (Hydra ``_partial_: true``): the optimizer gets the
    parameters, the scheduler gets the optimizer and ``max_epochs``.
    """

    def __init__(self, model: nn.Module, num_classes: int, optimizer: Callable[..., torch.optim.Optimizer],
                 scheduler: Callable[..., Any] | None = None, max_epochs: int = 1, stage: str = "stage",
                 label_smoothing: float = 0.0, channels_last: bool = False):
        super().__init__()
        self.model = model
        self.stage_name = stage
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.max_epochs_total = int(max_epochs)
        self.label_smoothing = float(label_smoothing)
        self.channels_last = bool(channels_last)
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc_best = MaxMetric()
        self.val_curve: list[float] = []
        self.samples_seen = 0
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)

    # -- plumbing -----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def on_fit_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "to_device"):
            dm.to_device(self.device)

    on_test_start = on_fit_start

    def on_train_epoch_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "set_epoch"):
            dm.set_epoch(self.current_epoch)

    def progress(self) -> float:
        return self.current_epoch / max(self.max_epochs_total, 1)

    # -- training -----------------------------------------------------------------------------------
    def compute_terms(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, float]]:
        logits = self.model(x)
        ce = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        return logits, {"ce": ce}, {"ce": 1.0}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, idx = batch
        x = self._input(x)
        logits, terms, weights = self.compute_terms(x, y, idx)
        loss = sum(weights[name] * value for name, value in terms.items() if weights[name] != 0.0)
        if not isinstance(loss, torch.Tensor):  # every weight is zero
            loss = logits.sum() * 0.0
        self._check_finite(loss, batch_idx)
        self.train_acc(logits.detach(), y)
        bs = y.shape[0]
        self.samples_seen += bs
        self.log("train/loss", loss.detach(), on_step=False, on_epoch=True, prog_bar=True, batch_size=bs)
        for name, value in terms.items():
            self.log(f"train/loss_{name}", value.detach(), on_step=False, on_epoch=True, batch_size=bs)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, batch_size=bs)
        return loss

    def _check_finite(self, loss: torch.Tensor, batch_idx: int) -> None:
        # On accelerators a per-step check would force a device sync; there it runs every 25 steps
        # (a NaN never recovers, so it is still caught, naming the step where it was seen).
        if loss.device.type != "cpu" and batch_idx % 25:
            return
        if not bool(torch.isfinite(loss)):
            raise TrainingError(
                f"stage {self.stage_name!r}: loss is {float(loss)} at epoch {self.current_epoch}, step "
                f"{self.global_step} (batch {batch_idx}); lower the learning rate or set on_nan=rollback")

    # -- evaluation ---------------------------------------------------------------------------------
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y, _ = batch
        logits = self.model(self._input(x))
        loss = F.cross_entropy(logits, y)
        self.val_acc(logits, y)
        self.log("val/loss", loss, on_step=False, on_epoch=True, batch_size=y.shape[0])
        self.log("val/acc", self.val_acc, on_step=False, on_epoch=True, prog_bar=True, batch_size=y.shape[0])

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        acc = self.val_acc.compute()
        self.val_acc_best(acc)
        self.log("val/acc_best", self.val_acc_best.compute(), prog_bar=False)
        self.val_curve.append(float(acc))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y, _ = batch
        logits = self.model(self._input(x))
        self.test_acc(logits, y)
        self.log("test/acc", self.test_acc, on_step=False, on_epoch=True, batch_size=y.shape[0])

    # -- optimization -------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(params=self.trainable_parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer, max_epochs=self.max_epochs_total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    # -- resume state -------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["kdlab_val_curve"] = list(self.val_curve)
        checkpoint["kdlab_samples_seen"] = int(self.samples_seen)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.val_curve = [float(v) for v in checkpoint.get("kdlab_val_curve", [])]
        self.samples_seen = int(checkpoint.get("kdlab_samples_seen", 0))
        if self.val_curve:
            self.val_acc_best.update(torch.tensor(max(self.val_curve)))


def is_finite_number(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
