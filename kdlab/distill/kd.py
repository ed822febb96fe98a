"""Hinton KD (and TAKD, which is Hinton KD along a sequential chain).

    L = (1 - lambda) * CE(z_s, y) + lambda * T^2 * KL(p_t || p_s)

With several sources (e.g. logit KD from an ensemble of teachers) the KD term is the mean over the
sources that teach the batch.

``distill.logit_stand`` (default false): logit standardization (Sun, Ren, Li, Wang, Cao, "Logit
Standardization in Knowledge Distillation", CVPR 2024, arXiv 2403.01427) z-scores each sample's student and
source logits, ``(z - mean) / std``, before the temperature (then the *base* temperature), in
``p = softmax(standardize(z) / T)``. It is a late option: hashed into the store key only when true, so that
every stage trained before it existed keeps its key.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch

from kdlab.distill.base import (
    KD_OPTIONS,
    STRATEGIES,
    LossTerms,
    SourceOutput,
    Strategy,
    StudentOutput,
    check_flag,
)
from kdlab.distill.losses import kd_loss_sum

LOGIT_STAND = {"logit_stand": False}
"""The late option of ``kd`` and ``dgkd`` (``conf/distill/kd.yaml``)."""


class LogitKD(Strategy):
    """What ``kd`` and ``dgkd`` share: the late option ``logit_stand`` and the KD terms summed over the sources."""

    options: ClassVar[dict[str, Any]] = KD_OPTIONS
    late_options: ClassVar[dict[str, Any]] = LOGIT_STAND

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.logit_stand = bool(cfg.get("logit_stand", False))

    @classmethod
    def check(cls, cfg, where="distill") -> None:
        super().check(cfg, where)
        cls.check_own(cfg, where)
        check_flag(f"{where}.logit_stand", cfg.get("logit_stand", False))

    @classmethod
    def check_own(cls, cfg, where) -> None:
        """The method's own keys, checked before ``logit_stand``."""

    def kd_sum(self, student: StudentOutput, sources: dict[str, SourceOutput]) -> torch.Tensor:
        """``sum_sources T^2 KL(p_src || p_s)`` (``logit_stand``: of the standardized logits)."""
        return kd_loss_sum(student.logits, [s.logits for s in sources.values()], self.temperature,
                           self.kl_reduction, standardize=self.logit_stand)


@STRATEGIES.register("kd")
class HintonKD(LogitKD):
    name = "kd"

    def loss_terms(self, student, sources, y, progress) -> LossTerms:
        lam = self.lam_at(progress)
        ce = self.ce_loss(student.logits, y)
        kd = self.kd_sum(student, sources) / len(sources) if sources else ce.new_zeros(())
        return {"ce": ce, "kd": kd}, {"ce": 1.0 - lam, "kd": lam}
