"""The strategy contract shared by every distillation method.

A strategy is plain PyTorch. Given the student's outputs, the outputs of the sources that teach this
batch, and the labels, it returns named loss terms and their weights; the module logs every term as
``train/loss_<name>`` and optimizes the weighted sum. Strategies with trainable parts (FEED's
translators) are ``nn.Module``s whose parameters train with the student but are never exported with it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kdlab.distill.schedules import build_schedule
from kdlab.errors import ConfigError
from kdlab.registry import Registry

STRATEGIES = Registry("distill strategy")


@dataclass
class StudentOutput:
    logits: torch.Tensor
    features: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class SourceOutput:
    logits: torch.Tensor
    features: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class StrategyContext:
    """What a strategy may need to know about its stage when it is built."""

    stage: str
    source_names: list[str]
    num_classes: int
    student_feature_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    source_feature_shapes: dict[str, dict[str, tuple[int, ...]]] = field(default_factory=dict)


LossTerms = tuple[dict[str, torch.Tensor], dict[str, float]]


class Strategy(nn.Module):
    """Base class. Subclasses set ``name`` and implement :meth:`loss_terms`."""

    name = "base"
    #: True when the strategy needs source logits (False for labels-only training).
    uses_sources = True

    def __init__(self, cfg: dict[str, Any], ctx: StrategyContext):
        super().__init__()
        self.cfg = cfg
        self.ctx = ctx
        self.temperature = float(cfg.get("temperature", 4.0))
        self.kl_reduction = str(cfg.get("kl_reduction", "batchmean"))
        lam = float(cfg.get("lam", 0.5))
        lam_end = cfg.get("lam_end")
        for value, key in ((lam, "lam"), (lam_end, "lam_end")):
            if value is not None and not 0.0 <= float(value) <= 1.0:
                raise ConfigError(f"distill.{key} (lambda) must be in [0, 1], got {value}")
        if self.temperature <= 0:
            raise ConfigError(f"distill.temperature must be > 0, got {self.temperature}")
        self.lam_at = build_schedule(str(cfg.get("lam_schedule", "constant")), lam,
                                     None if lam_end is None else float(lam_end),
                                     cfg.get("lam_milestones") or (0.5,))

    # -- what the stage must record -------------------------------------------------------------
    @classmethod
    def taps(cls, cfg: dict[str, Any]) -> tuple[list[str], list[str]]:
        """Feature points (student, sources) this strategy records, known before it is built."""
        return [], []

    def student_taps(self) -> list[str]:
        return []

    def source_taps(self) -> list[str]:
        return []

    def loss_terms(self, student: StudentOutput, sources: dict[str, SourceOutput], y: torch.Tensor,
                   progress: float) -> LossTerms:
        raise NotImplementedError

    def extra_parameters(self) -> int:
        """Trainable parameters that live in the strategy (discarded after training)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def build_strategy(cfg: dict[str, Any], ctx: StrategyContext) -> Strategy:
    name = str(cfg.get("strategy", "kd"))
    cls = STRATEGIES.get(name)
    return cls(cfg, ctx)
