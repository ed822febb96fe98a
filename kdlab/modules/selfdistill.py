"""SelfDistillModule: one quantized network that teaches itself (SPEQ, ``kdlab/distill/speq.py``).

Each training step runs the network twice on the batch: a teacher pass under ``no_grad`` with the activation
bit-width of every switchable layer drawn by the strategy (seeded by the stage seed and the step, so a
resumed or repeated run draws the same bits), with BatchNorm's running statistics restored afterwards, then
the student pass at the model's own bit-widths. The teacher pass never reaches the optimizer: it has no
graph, and the module has no parameter the student lacks.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from kdlab.data.loader import derive_seed
from kdlab.distill.base import SourceOutput, Strategy, StudentOutput
from kdlab.errors import ConfigError
from kdlab.models.quant import activation_bits, switchable
from kdlab.modules.supervised import SupervisedModule


@contextlib.contextmanager
def bn_statistics_kept(model: nn.Module) -> Iterator[None]:
    """Run the block (in train mode: batch statistics) and put every BatchNorm's running statistics back."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in norms]
    try:
        yield
    finally:
        for m, (mean, var, n) in zip(norms, saved, strict=True):
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(n)


def self_teaching_layers(model: nn.Module, stage: str) -> list[Any]:
    """The input quantizers a self-teacher switches; a ConfigError when the model has none."""
    layers = switchable(model)
    if not layers:
        raise ConfigError(f"distill=speq: stage {stage!r} has no quantized activations to switch; quantize its "
                          f"model, e.g. model.quant.act_bits=4 (or +pipeline.per_stage.{stage}.model.quant.act_bits=4)")
    return layers


class SelfDistillModule(SupervisedModule):
    def __init__(self, model: nn.Module, num_classes: int, optimizer, scheduler, strategy: Strategy,
                 seed: int = 0, **kwargs: Any):
        super().__init__(model, num_classes, optimizer, scheduler, **kwargs)
        self.__dict__["strategy"] = strategy  # no parameters, nothing to checkpoint: not a submodule
        self.__dict__["switch"] = self_teaching_layers(model, self.stage_name)
        self.target_bits = int(self.switch[0].bits)
        self.seed = int(seed)
        self.drawn: list[int] | None = None  # the last teacher pass's bit-widths (tests, logs)

    def teacher_bits(self) -> list[int]:
        return self.strategy.draw(len(self.switch), self.target_bits,
                                  derive_seed("speq", self.seed, int(self.global_step)) % (2**63))

    def compute_terms(self, x, y, idx, views=None):
        self.drawn = self.teacher_bits()
        with torch.no_grad(), activation_bits(self.switch, self.drawn), bn_statistics_kept(self.model):
            t_logits = self.model(x)
        logits = self.model(x)
        self.accumulate("train/teacher_bits", sum(self.drawn) / len(self.drawn), y.shape[0])
        terms, weights = self.strategy.loss_terms(StudentOutput(logits, {}, idx), {"self": SourceOutput(t_logits)},
                                                  y, self.progress())
        return logits, terms, weights
