"""SupervisedModule: one model trained from labels. DistillModule extends it with frozen sources."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MaxMetric
from torchmetrics.classification import MulticlassAccuracy

from kdlab.errors import ConfigError, TrainingError, warn
from kdlab.modules.fidelity import split_outputs


class SupervisedModule(pl.LightningModule):
    """Trains ``model`` with cross-entropy; logs train/ val/ test/ metrics through torchmetrics.

    ``optimizer`` and ``scheduler`` are partials (Hydra ``_partial_: true``): the optimizer gets the
    parameters, the scheduler gets the optimizer and ``max_epochs``.

    ``on_nan``: a NaN/inf loss either stops the stage (``stop``: a TrainingError naming stage, epoch and
    step) or (``rollback``) restores the weights from the start of the epoch (the last checkpointed
    state), resets the optimizer's state, multiplies the learning rate by ``ROLLBACK_LR_FACTOR`` and skips
    the batch -- at most ``max_rollbacks`` times, then it stops.
    """

    ON_NAN = ("stop", "rollback")
    ROLLBACK_LR_FACTOR = 0.1

    def __init__(self, model: nn.Module, num_classes: int, optimizer: Callable[..., torch.optim.Optimizer],
                 scheduler: Callable[..., Any] | None = None, max_epochs: int = 1, stage: str = "stage",
                 label_smoothing: float = 0.0, channels_last: bool = False, on_nan: str = "stop",
                 max_rollbacks: int = 3):
        super().__init__()
        if on_nan not in self.ON_NAN:
            raise ConfigError(f"unknown on_nan {on_nan!r}; known: {', '.join(self.ON_NAN)}")
        self.on_nan = on_nan
        self.max_rollbacks = int(max_rollbacks)
        self.rollbacks = 0
        self._good_state: dict[str, torch.Tensor] | None = None
        self.model = model
        self.stage_name = stage
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.max_epochs_total = int(max_epochs)
        self.label_smoothing = float(label_smoothing)
        self.channels_last = bool(channels_last)
        # training metrics are summed on the device and logged once per epoch (see accumulate())
        self._epoch_sums: dict[str, tuple[Any, int]] = {}
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc_best = MaxMetric()
        self.val_curve: list[float] = []  # the per-epoch evaluation's accuracy (on the test split: see eval_names)
        # the per-epoch training accuracy and loss (the epoch means of train/acc and train/loss, as logged), to
        # show beside val_curve whether a stage fits its training split; a module that logs no train/acc has none
        self.train_curve: list[float] = []
        self.train_loss_curve: list[float] = []
        # its metric names; without a validation split the loop runs on the test split and is logged as such
        # (kdlab.pipeline.protocol.TEST_NAMES), so that nothing reading val/acc reads the test split
        self.eval_names = {"loss": "val/loss", "acc": "val/acc", "acc_best": "val/acc_best"}
        #: the last test pass's {"logits": (N, K) fp16, "labels": (N,)} in test-split order (None before one)
        self.test_outputs: dict[str, torch.Tensor] | None = None
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
        self._epoch_sums = {}
        if self.on_nan == "rollback":  # the state at the epoch's start is the last checkpointed one
            self._good_state = {k: v.detach().clone() for k, v in self.state_dict().items()}

    def on_train_start(self) -> None:
        total = self.trainer.estimated_stepping_batches  # max_epochs x batches per epoch / accumulation
        self._total_steps = int(total) if total != float("inf") else None

    def progress(self) -> float:
        """Training progress in [0, 1], per optimizer step: 0 at the first step and exactly 1 at the last, so
        that a lambda schedule reaches ``lam_end``. ``global_step`` is restored on resume, and so is this."""
        total = getattr(self, "_total_steps", None)
        if not total:  # no Trainer (unit use) or an open-ended run: by epoch
            return self.current_epoch / max(self.max_epochs_total, 1)
        return min(self.global_step / max(total - 1, 1), 1.0)

    # -- training -----------------------------------------------------------------------------------
    def compute_terms(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, views: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, float]]:
        logits = self.model(x)
        ce = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        return logits, {"ce": ce}, {"ce": 1.0}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, idx, *rest = batch  # (x, y, idx) or, for view-cached sources, (x, y, idx, view)
        x = self._input(x)
        logits, terms, weights = self.compute_terms(x, y, idx, *rest)
        loss = sum(weights[name] * value for name, value in terms.items() if weights[name] != 0.0)
        if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
            # every weight is zero, or every weighted term is a constant (e.g. no source taught the batch
            # under lambda = 1): a zero with a graph, so that backward() and the optimizer step still run
            loss = logits.sum() * 0.0 + (loss.detach() if isinstance(loss, torch.Tensor) else 0.0)
        if not self._check_finite(loss, batch_idx):
            return None  # rolled back: Lightning skips this batch's backward and optimizer step
        bs = y.shape[0]
        self.samples_seen += bs
        self.accumulate("train/loss", loss, bs)
        for name, value in terms.items():
            self.accumulate(f"train/loss_{name}", value, bs)
        self.accumulate("train/acc", (logits.detach().argmax(1) == y).float().mean(), bs)
        return loss

    def accumulate(self, name: str, value: torch.Tensor | float, n: int) -> None:
        """Add a batch's mean ``value`` over ``n`` samples to the epoch mean of ``name``.

        The sums stay on the device (no sync per step) and are logged once, at the epoch's last batch: five
        ``self.log`` calls and a torchmetrics update per step cost about 6 % of a CPU student step with four
        live sources (py-spy, benchmarks/README figure a)."""
        v = value.detach() * n if isinstance(value, torch.Tensor) else float(value) * n
        total, count = self._epoch_sums.get(name, (0.0, 0))
        self._epoch_sums[name] = (total + v, count + n)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        n_batches = self.trainer.num_training_batches
        last = self.trainer.fit_loop.epoch_loop.batch_progress.is_last_batch or (
            isinstance(n_batches, int) and batch_idx + 1 >= n_batches)
        if last:
            for name, (total, count) in self._epoch_sums.items():
                self.log(name, total / max(count, 1), on_step=False, on_epoch=True, prog_bar=name == "train/loss",
                         batch_size=1, sync_dist=True)
            for name, curve in (("train/acc", self.train_curve), ("train/loss", self.train_loss_curve)):
                if name in self._epoch_sums:  # the mean over ranks, as sync_dist logs it (identity on one device)
                    total, count = self._epoch_sums[name]
                    curve.append(float(self.trainer.strategy.reduce(torch.as_tensor(total / max(count, 1),
                                                                                    device=self.device),
                                                                    reduce_op="mean")))
            self._epoch_sums = {}

    def _check_finite(self, loss: torch.Tensor, batch_idx: int) -> bool:
        """True to go on; False after a rollback (skip the batch); raises to stop the stage."""
        # On accelerators a per-step check would force a device sync; there it runs every 25 steps
        # (a NaN never recovers, so it is still caught, naming the step where it was seen).
        if loss.device.type != "cpu" and batch_idx % 25 and self.on_nan == "stop":
            return True
        bad = not bool(torch.isfinite(loss))
        if self.on_nan == "rollback" and self._trainer is not None and self.trainer.world_size > 1:
            bad = bool(self.trainer.strategy.reduce_boolean_decision(bad, all=False))  # all ranks roll back
        if not bad:
            return True
        where = (f"stage {self.stage_name!r}: loss is {float(loss.detach())} at epoch {self.current_epoch}, step "
                 f"{self.global_step} (batch {batch_idx})")
        if self.on_nan == "rollback" and self._good_state is not None:
            if self.rollbacks < self.max_rollbacks:
                self._rollback(where)
                return False
            raise TrainingError(f"{where}; still not finite after {self.rollbacks} rollbacks (learning rate now "
                                f"{self._lrs()}); lower optimizer.lr")
        raise TrainingError(f"{where}; lower the learning rate or set on_nan=rollback")

    def _lrs(self) -> str:
        return ", ".join(f"{g['lr']:g}" for opt in self.trainer.optimizers for g in opt.param_groups)

    def _rollback(self, where: str) -> None:
        self.rollbacks += 1
        self.load_state_dict(self._good_state)
        for opt in self.trainer.optimizers:
            opt.state.clear()  # momentum / Adam moments may hold the blow-up
            for group in opt.param_groups:
                group["lr"] *= self.ROLLBACK_LR_FACTOR
                if "initial_lr" in group:
                    group["initial_lr"] *= self.ROLLBACK_LR_FACTOR
        for config in self.trainer.lr_scheduler_configs:  # schedules recompute lr from base_lrs
            if hasattr(config.scheduler, "base_lrs"):
                config.scheduler.base_lrs = [lr * self.ROLLBACK_LR_FACTOR for lr in config.scheduler.base_lrs]
        warn(f"{where}; rolled back to the weights at the start of epoch {self.current_epoch} with the "
             f"learning rate x{self.ROLLBACK_LR_FACTOR:g} ({self._lrs()}); rollback {self.rollbacks} of "
             f"{self.max_rollbacks}")

    # -- evaluation ---------------------------------------------------------------------------------
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y, _ = batch
        logits = self.model(self._input(x))
        loss = F.cross_entropy(logits, y)
        self.val_acc(logits, y)
        self.log(self.eval_names["loss"], loss, on_step=False, on_epoch=True, batch_size=y.shape[0])
        self.log(self.eval_names["acc"], self.val_acc, on_step=False, on_epoch=True, prog_bar=True,
                 batch_size=y.shape[0])

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        acc = self.val_acc.compute()
        self.val_acc_best(acc)
        self.log(self.eval_names["acc_best"], self.val_acc_best.compute(), prog_bar=False)
        self.val_curve.append(float(acc))

    def on_test_epoch_start(self) -> None:
        self._test_rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y, idx = batch
        logits = self.model(self._input(x))
        self.test_acc(logits, y)
        self.log("test/acc", self.test_acc, on_step=False, on_epoch=True, batch_size=y.shape[0])
        self._test_rows.append((idx, logits.detach(), y))

    def on_test_epoch_end(self) -> None:
        # the pass's logits in split order, kept for the stage's fidelity and calibration (kdlab/modules/fidelity.py)
        self.test_outputs = split_outputs(self._test_rows)
        self._test_rows = []

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
        checkpoint["kdlab_train_curve"] = list(self.train_curve)
        checkpoint["kdlab_train_loss_curve"] = list(self.train_loss_curve)
        checkpoint["kdlab_samples_seen"] = int(self.samples_seen)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.val_curve = [float(v) for v in checkpoint.get("kdlab_val_curve", [])]
        self.train_curve = [float(v) for v in checkpoint.get("kdlab_train_curve", [])]
        self.train_loss_curve = [float(v) for v in checkpoint.get("kdlab_train_loss_curve", [])]
        self.samples_seen = int(checkpoint.get("kdlab_samples_seen", 0))
        if self.val_curve:
            self.val_acc_best.update(torch.tensor(max(self.val_curve)))
