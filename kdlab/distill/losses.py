"""Loss building blocks shared by the strategies."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdlab.errors import ConfigError

KL_REDUCTIONS = ("batchmean", "mean_legacy")


STANDARDIZE_EPS = 1e-7
"""Added to the standard deviation in :func:`standardize_logits` (the value of the logit-standardization code)."""


def standardize_logits(logits: torch.Tensor, eps: float = STANDARDIZE_EPS) -> torch.Tensor:
    """Z-score each sample's logits over the classes (the last dimension): ``(z - mean(z)) / (std(z) + eps)``.

    Logit standardization (Sun et al., "Logit Standardization in Knowledge Distillation", CVPR 2024, arXiv
    2403.01427) applies this to the student's and the teacher's logits before the temperature, so that the
    student matches the teacher's logit *relations*, not their range: the result does not change when a
    sample's logits are shifted by a constant or multiplied by a positive factor. ``std`` is the unbiased
    (n - 1) estimate, as in the authors' code (``Tensor.std``) for which their base temperatures were tuned.
    The variance is clamped at ``eps**2`` before the square root so that a constant logit vector (e.g. a
    zero-initialized classifier) standardizes to 0 with a zero, not NaN, gradient. Runs in the input's dtype.
    """
    mean = logits.mean(dim=-1, keepdim=True)
    std = logits.var(dim=-1, keepdim=True, unbiased=True).clamp_min(eps * eps).sqrt()
    return (logits - mean) / (std + eps)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
            reduction: str = "batchmean", standardize: bool = False) -> torch.Tensor:
    """Hinton's soft-target loss ``T^2 * KL(softmax(z_t/T) || softmax(z_s/T))``.

    ``batchmean`` is the true KL averaged over the batch. ``mean_legacy`` reproduces the TAKD/DGKD
    released code, which used ``nn.KLDivLoss()``'s default ``reduction='mean'``: the KL summed over
    classes and divided by batch * classes. ``standardize``: both logit vectors go through
    :func:`standardize_logits` before the temperature (logit standardization; ``T`` is then its base
    temperature).
    """
    if reduction not in KL_REDUCTIONS:
        raise ConfigError(f"unknown distill.kl_reduction {reduction!r}; known: {', '.join(KL_REDUCTIONS)}")
    z_s, z_t = student_logits.float(), teacher_logits.float()
    if standardize:
        z_s, z_t = standardize_logits(z_s), standardize_logits(z_t)
    log_p_s = F.log_softmax(z_s / temperature, dim=1)
    p_t = F.softmax(z_t / temperature, dim=1)
    torch_reduction = "batchmean" if reduction == "batchmean" else "mean"
    return F.kl_div(log_p_s, p_t, reduction=torch_reduction) * (temperature * temperature)


def kd_loss_sum(student_logits: torch.Tensor, source_logits: list[torch.Tensor], temperature: float,
                reduction: str = "batchmean", standardize: bool = False) -> torch.Tensor:
    """``sum_k kd_loss(student_logits, source_logits[k])`` in one pass: the student's log-softmax once and the
    sources' KL terms as one stacked tensor op (what DGKD and multi-teacher KD do every step).
    ``standardize``: as in :func:`kd_loss`, every logit vector is z-scored before the temperature."""
    if reduction not in KL_REDUCTIONS:
        raise ConfigError(f"unknown distill.kl_reduction {reduction!r}; known: {', '.join(KL_REDUCTIONS)}")
    if len(source_logits) == 1:
        return kd_loss(student_logits, source_logits[0], temperature, reduction, standardize=standardize)
    z_s = student_logits.float()
    z_t = torch.stack([t.float() for t in source_logits])  # (K, B, C)
    if standardize:
        z_s, z_t = standardize_logits(z_s), standardize_logits(z_t)
    log_p_s = F.log_softmax(z_s / temperature, dim=1)
    z_t = z_t / temperature
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
