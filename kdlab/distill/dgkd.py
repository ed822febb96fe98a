"""DGKD: densely guided KD -- every earlier stage teaches, and the KD terms are summed.

    paper: L = (n+1)(1 - lambda) * CE + lambda * sum_sources T^2 KL(p_src || p_s)
    code:  L =       (1 - lambda) * CE + lambda * sum_sources T^2 KL(p_src || p_s)

``n + 1`` is the number of sources of the stage (teacher plus TAs). ``ce_weight`` picks the form.
Stochastic teaching removes terms of dropped sources (the module never runs them); the sum is over the
sources that teach the batch. ``distill.logit_stand`` (late option, default false): logit standardization of
every logit vector before the temperature, as in ``kd`` (see kdlab/distill/kd.py).
"""
from __future__ import annotations

from typing import ClassVar

from kdlab.distill.base import KD_OPTIONS, STRATEGIES, LossTerms
from kdlab.distill.kd import LogitKD
from kdlab.errors import ConfigError

CE_WEIGHTS = ("paper", "code")


@STRATEGIES.register("dgkd")
class DenselyGuidedKD(LogitKD):
    name = "dgkd"
    options: ClassVar[dict] = {**KD_OPTIONS, "ce_weight": "code"}

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.ce_weight = str(cfg.get("ce_weight", "code"))

    @classmethod
    def check_own(cls, cfg, where) -> None:
        if str(cfg.get("ce_weight", "code")) not in CE_WEIGHTS:
            raise ConfigError(f"unknown {where}.ce_weight {cfg.get('ce_weight')!r}; known: {', '.join(CE_WEIGHTS)}")

    def loss_terms(self, student, sources, y, progress) -> LossTerms:
        lam = self.lam_at(progress)
        ce = self.ce_loss(student.logits, y)
        kd = self.kd_sum(student, sources) if sources else ce.new_zeros(())
        n_sources = max(len(self.ctx.source_names), 1)
        ce_w = (1.0 - lam) * (n_sources if self.ce_weight == "paper" else 1.0)
        return {"ce": ce, "kd": kd}, {"ce": ce_w, "kd": lam}
