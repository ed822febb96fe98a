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


def kd_loss_sum(student_logits: torch.Tensor, source_logits: list[torch.Tensor], temperature: float,
                reduction: str = "batchmean") -> torch.Tensor:
    """``sum_k kd_loss(student_logits, source_logits[k])`` in one pass: the student's log-softmax once and the
    sources' KL terms as one stacked tensor op (what DGKD and multi-teacher KD do every step)."""
    if reduction not in KL_REDUCTIONS:
        raise ConfigError(f"unknown distill.kl_reduction {reduction!r}; known: {', '.join(KL_REDUCTIONS)}")
    if len(source_logits) == 1:
        return kd_loss(student_logits, source_logits[0], temperature, reduction)
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    z_t = torch.stack([t.float() for t in source_logits]) / temperature  # (K, B, C)
    log_p_t = F.log_softmax(z_t, dim=2)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum()  # sum over sources, batch and classes
    denom = log_p_s.shape[0] * (1 if reduction == "batchmean" else log_p_s.shape[1])
    return kl / denom * (temperature * temperature)


def feature_l1(student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
    """Factor-Transfer / FEED feature loss: L1 between L2-normalized flattened features.

    As in the Factor Transfer code (``nn.L1Loss()`` on ``F.normalize(x.view(B, -1))``), the absolute
    differences are averaged over batch and feature elements, which is what ``beta = 500`` is tuned for.
    """
    s = F.normalize(student_feat.float().flatten(1), dim=1)
    t = F.normalize(teacher_feat.float().flatten(1), dim=1)
    return (s - t).abs().mean()
