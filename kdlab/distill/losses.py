"""Loss building blocks shared by the strategies."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdlab.errors import ConfigError

KL_REDUCTIONS = ("batchmean", "mean_legacy")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
            reduction: str = "batchmean") -> torch.Tensor:
    """Hinton's soft-target loss ``T^2 * KL(softmax(z_t/T) || softmax(z_s/T))``.

    ``batchmean`` is the true KL averaged over the batch. ``mean_legacy`` reproduces the TAKD/DGKD
    released code, which used ``nn.KLDivLoss()``'s default ``reduction='mean'``: the KL summed over
    classes and divided by batch * classes.
    """
    if reduction not in KL_REDUCTIONS:
        raise ConfigError(f"unknown distill.kl_reduction {reduction!r}; known: {', '.join(KL_REDUCTIONS)}")
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    p_t = F.softmax(teacher_logits.float() / temperature, dim=1)
    torch_reduction = "batchmean" if reduction == "batchmean" else "mean"
    return F.kl_div(log_p_s, p_t, reduction=torch_reduction) * (temperature * temperature)


def feature_l1(student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
    """Factor-Transfer / FEED feature loss: L1 between L2-normalized flattened features.

    As in the Factor Transfer code (``nn.L1Loss()`` on ``F.normalize(x.view(B, -1))``), the absolute
    differences are averaged over batch and feature elements, which is what ``beta = 500`` is tuned for.
    """
    s = F.normalize(student_feat.float().flatten(1), dim=1)
    t = F.normalize(teacher_feat.float().flatten(1), dim=1)
    return (s - t).abs().mean()
