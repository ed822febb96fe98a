"""DataFreeModule: a student learned from generated images only (DAFL), with its generator.

The Trainer iterates :class:`StepIndices` (``iters_per_epoch`` step numbers, no images) instead of the
training split: :class:`DataFreeData` wraps the run's datamodule, hands out that index loader for
training and the real validation and test loaders for reporting. Each step draws a latent batch, makes
images with the generator, runs the frozen teacher (eval mode, parameters frozen, but with autograd so
that the generator's loss reaches the generator), and updates the generator and the student in the same
step (manual optimization: two optimizers). The latent batch of step ``i`` of epoch ``e`` is drawn from a
``torch.Generator`` seeded by (stage seed, e, i, rank), so a resumed stage draws exactly the batches the
uninterrupted one would have.

The generator is a submodule: checkpointed with the stage (resume), never exported (the store keeps
``model.*`` only), counted as ``extra_params``. After every epoch a grid of generated images (fixed latent
batch, generator in eval mode, so the training is unaffected) is written as
``<run dir>/generated/<stage>/epoch_<NNN>.png`` and logged to W&B when a W&B logger is on.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger
from torch import nn

from kdlab.data.loader import derive_seed
from kdlab.models import FeatureTaps
from kdlab.modules.distill import freeze
from kdlab.modules.supervised import SupervisedModule

GRID_IMAGES = 64  # images per saved grid (8 x 8)


class StepIndices:
    """What the Trainer iterates as the training "loader" of a data-free stage: ``n`` step numbers."""

    def __init__(self, n: int):
        self.n = int(n)

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.n))


class DataFreeData(pl.LightningDataModule):
    """The run's datamodule as a data-free stage sees it: step numbers for training (the training split is
    never read), the real validation and test splits for reporting."""

    def __init__(self, dm: Any, steps: int):
        super().__init__()
        self.dm = dm
        self.steps = int(steps)

    def setup(self, stage: str | None = None) -> None:
        self.dm.setup(stage)

    def train_dataloader(self) -> StepIndices:
        return StepIndices(self.steps)

    def val_dataloader(self) -> Any:
        self.dm.trainer = self.trainer  # the inner datamodule shards evaluation by the Trainer's ranks
        return self.dm.val_dataloader()

    def test_dataloader(self) -> Any:
        self.dm.trainer = self.trainer
        return self.dm.test_dataloader()

    def to_device(self, device: torch.device | str) -> DataFreeData:
        if hasattr(self.dm, "to_device"):
            self.dm.to_device(device)
        return self


class DataFreeModule(SupervisedModule):
    """Student ``model``, frozen ``teacher``, a DAFL ``strategy`` (loss terms, batch size, steps) and the
    ``generator`` it trains; ``optimizer`` / ``scheduler`` are the student's, the generator's optimizer is
    the strategy's ``generator_optimizer``."""

    def __init__(self, model: nn.Module, num_classes: int, optimizer: Callable[..., torch.optim.Optimizer],
                 scheduler: Callable[..., Any] | None, teacher: nn.Module, strategy: Any, generator: nn.Module,
                 image_dir: Path | None = None, seed: int = 0, **kwargs: Any):
        super().__init__(model, num_classes, optimizer, scheduler, **kwargs)
        self.automatic_optimization = False  # two optimizers, one backward per step
        self.strategy = strategy
        self.generator = generator
        self.__dict__["teacher"] = freeze(teacher)  # not a submodule: never checkpointed, never in train mode
        self._teacher_taps = FeatureTaps(teacher, [strategy.teacher_tap])
        self.image_dir = Path(image_dir) if image_dir is not None else None
        self.seed = int(seed)
        self.batch_size = int(strategy.batch_size)
        self.iters_per_epoch = int(strategy.iters_per_epoch)
        self.grids: list[Path] = []

    def fit_data(self, dm: Any) -> DataFreeData:
        """What ``trainer.fit`` gets instead of ``dm``."""
        return DataFreeData(dm, self.iters_per_epoch)

    def extra_parameters(self) -> int:
        return sum(p.numel() for p in self.generator.parameters() if p.requires_grad)

    def close(self) -> None:
        self._teacher_taps.remove()

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.teacher.to(self.device).eval()

    def latent(self, n: int, *parts: Any) -> torch.Tensor:
        rng = torch.Generator().manual_seed(derive_seed("dafl-latent", self.seed, *parts))
        return self.generator.sample(n, rng).to(self.device)

    # -- training -----------------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        # its own batch per step (and per rank: DDP ranks draw different images), the same after a resume
        x = self._input(self.generator(self.latent(self.batch_size, self.current_epoch, batch_idx,
                                                   self.global_rank)))
        t_logits = self.teacher(x)
        g_terms, g_weights = self.strategy.generator_terms(t_logits, self._teacher_taps.features[
            self.strategy.teacher_tap])
        kd = self.strategy.kd_term(self.model(x.detach()), t_logits)
        loss = kd + sum(g_weights[k] * v for k, v in g_terms.items() if g_weights[k] != 0.0)
        if not self._check_finite(loss, batch_idx):
            return None  # rolled back: no step
        for opt in optimizers:
            opt.zero_grad()
        self.manual_backward(loss)
        for opt in optimizers:
            opt.step()
        self.samples_seen += self.batch_size
        self.accumulate("train/loss", loss, self.batch_size)
        for name, value in {**g_terms, "kd": kd}.items():
            self.accumulate(f"train/loss_{name}", value, self.batch_size)
        return loss.detach()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        if batch_idx + 1 >= self.iters_per_epoch:  # where Lightning steps epoch schedulers: before validation
            scheduler = self.lr_schedulers()
            if scheduler is not None:
                scheduler.step()

    def on_train_epoch_end(self) -> None:
        if self.image_dir is not None and self.trainer.is_global_zero:
            self.save_grid(self.image_dir / f"epoch_{self.current_epoch:03d}.png")

    @torch.no_grad()
    def save_grid(self, path: Path) -> Path:
        """A grid of generated images from a fixed latent batch (eval mode: BN running statistics, no
        update of them), min-max scaled for viewing; logged to every W&B logger."""
        from torchvision.utils import save_image

        was_training = self.generator.training
        self.generator.eval()
        try:
            images = self.generator(self.latent(GRID_IMAGES, "grid")).float().cpu()
        finally:
            self.generator.train(was_training)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(images, str(path), nrow=8, normalize=True)
        self.grids.append(path)
        for lg in self.loggers:
            if isinstance(lg, WandbLogger):
                lg.log_image(key="train/generated", images=[str(path)], caption=[f"epoch {self.current_epoch}"])
        return path

    # -- optimization -------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        student = self.optimizer_factory(params=[p for p in self.model.parameters() if p.requires_grad])
        g_params = [p for p in self.generator.parameters() if p.requires_grad]
        optimizers = ([self.strategy.generator_optimizer(params=g_params)] if g_params else []) + [student]
        if self.scheduler_factory is None:
            return optimizers
        scheduler = self.scheduler_factory(student, max_epochs=self.max_epochs_total)
        return optimizers, [{"scheduler": scheduler, "interval": "epoch"}]
