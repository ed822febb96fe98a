"""DKD: decoupled knowledge distillation.

B. Zhao, Q. Cui, R. Song, Y. Qiu, J. Liang, "Decoupled Knowledge Distillation", CVPR 2022, arXiv 2203.08679.

Hinton's KD loss splits into a target-class part and a non-target part; DKD weights them separately:

    L = ce_weight * CE + w(progress) * (alpha * TCKD + beta * NCKD)
    TCKD = T^2 * KL(b_t || b_s),    b = (p_y, 1 - p_y),            p = softmax(z / T)
    NCKD = T^2 * KL(p~_t || p~_s),  p~_j = p_j / (1 - p_y), j != y  (softmax over the non-target classes)
    w(progress) = min(1, progress * max_epochs / warmup)           (linear warm-up over ``warmup`` epochs)

Both KLs are averaged over the batch. With several sources each term is combined over the sources that teach
the batch (``combine``: mean or sum). Everything is computed from log-probabilities: ``log(1 - p_y)`` is the
log-sum-exp of the non-target log-probabilities and ``log p~_j = log p_j - log(1 - p_y)``, so a confident
source (p_y within float32 rounding of 1) gives finite, exact terms; the released code instead subtracts 1000
from the target logit and takes ``log`` of probability sums. With 2 classes the non-target distribution has
a single class and NCKD is identically 0, so ``beta > 0`` with fewer than 3 classes is a ConfigError.

``dkd.logit_stand``: logit standardization (Sun et al., CVPR 2024, arXiv 2403.01427): both logit vectors
are z-scored per sample before the temperature. Reads source logits only (no feature taps); nothing trains.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from kdlab.distill.base import STRATEGIES, check_combine, check_flag, check_number
from kdlab.distill.logit import LogitBlockStrategy
from kdlab.distill.losses import standardize_logits
from kdlab.errors import ConfigError

DEFAULTS: dict[str, Any] = {"alpha": 1.0, "beta": 8.0, "temperature": 4.0, "warmup": 20, "ce_weight": 1.0,
                            "combine": "mean", "logit_stand": False}
"""mdistiller's CIFAR-100 defaults (``CFG.DKD``: CE_WEIGHT 1, ALPHA 1, BETA 8, T 4, WARMUP 20)."""


def dkd_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
              temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(TCKD, NCKD)``, each ``T^2`` times the KL averaged over the batch, in the inputs' dtype.

    ``student_logits``, ``teacher_logits``: (B, C) with C >= 2; ``target``: (B,) class indices.
    """
    t2 = temperature * temperature
    batch = student_logits.shape[0]
    gt = F.one_hot(target.long(), student_logits.shape[1]).bool()

    def binary_and_rest(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        log_p = F.log_softmax(z / temperature, dim=1)
        log_target = log_p.gather(1, target.long().view(-1, 1))  # log p_y
        log_rest = torch.logsumexp(log_p.masked_fill(gt, float("-inf")), dim=1, keepdim=True)  # log(1 - p_y)
        # log p~_j over the non-target classes; 0 at j = y, so that its KL summand is exactly 0 (and finite)
        return log_target, log_rest, (log_p - log_rest).masked_fill(gt, 0.0)

    s_target, s_rest, s_tilde = binary_and_rest(student_logits)
    t_target, t_rest, t_tilde = binary_and_rest(teacher_logits)
    tckd = (t_target.exp() * (t_target - s_target) + t_rest.exp() * (t_rest - s_rest)).sum() / batch
    nckd = (t_tilde.exp() * (t_tilde - s_tilde)).sum() / batch
    return tckd * t2, nckd * t2


@STRATEGIES.register("dkd")
class DKD(LogitBlockStrategy):
    name = "dkd"
    options: ClassVar[dict] = {"label_smoothing": 0.0, "dkd": DEFAULTS}
    terms: ClassVar[tuple[str, ...]] = ("tckd", "nckd")

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.alpha, self.beta = float(self.opts["alpha"]), float(self.opts["beta"])
        self.warmup = float(self.opts["warmup"])
        self.ce_weight = float(self.opts["ce_weight"])
        self.logit_stand = bool(self.opts["logit_stand"])
        if self.beta > 0 and ctx.num_classes < 3:
            raise ConfigError(f"distill.dkd.beta={self.opts['beta']!r} needs at least 3 classes, the data has "
                              f"{ctx.num_classes}: with 2 the non-target distribution has one class and NCKD is "
                              f"identically 0; set distill.dkd.beta=0")

    @classmethod
    def check_options(cls, block, where) -> None:
        for key in ("alpha", "beta"):
            check_number(f"{where}.{key}", block[key], low=0)
        check_number(f"{where}.temperature", block["temperature"], low=0, low_open=True)
        for key in ("warmup", "ce_weight"):
            check_number(f"{where}.{key}", block[key], low=0)
        check_combine(where, block)
        check_flag(f"{where}.logit_stand", block["logit_stand"])

    def warmup_factor(self, progress: float) -> float:
        """``min(1, progress * max_epochs / warmup)``; 1 without warm-up."""
        if self.warmup <= 0:
            return 1.0
        return min(1.0, float(progress) * max(self.ctx.max_epochs, 1) / self.warmup)

    def prepare(self, logits):
        return standardize_logits(logits) if self.logit_stand else logits

    def source_terms(self, z_s, z_t, y):
        return dkd_terms(z_s, z_t, y, self.block_temperature)

    def weights_at(self, progress):
        w = self.warmup_factor(progress)
        return {"ce": self.ce_weight, "tckd": w * self.alpha, "nckd": w * self.beta}
