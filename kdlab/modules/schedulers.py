"""LR schedules, built from config with ``_partial_: true`` and completed with the stage's epoch count.

Milestones are fractions of ``max_epochs`` so one recipe serves any epoch budget.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LambdaLR, MultiStepLR


def constant(optimizer: torch.optim.Optimizer, max_epochs: int) -> LambdaLR:
    return LambdaLR(optimizer, lambda epoch: 1.0)


def multistep(optimizer: torch.optim.Optimizer, max_epochs: int, milestones: Sequence[float] = (0.5, 0.75),
              gamma: float = 0.1) -> MultiStepLR:
    """Decay by ``gamma`` at each milestone (a fraction of ``max_epochs``, or an epoch if > 1)."""
    epochs = sorted({round(m * max_epochs) if m <= 1 else int(m) for m in milestones})
    return MultiStepLR(optimizer, milestones=[e for e in epochs if e > 0], gamma=gamma)


def cosine(optimizer: torch.optim.Optimizer, max_epochs: int, eta_min: float = 0.0) -> CosineAnnealingLR:
    return CosineAnnealingLR(optimizer, T_max=max(int(max_epochs), 1), eta_min=eta_min)
