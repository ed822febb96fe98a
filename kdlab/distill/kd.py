"""Hinton KD (and TAKD, which is Hinton KD along a sequential chain).

    L = (1 - lambda) * CE(z_s, y) + lambda * T^2 * KL(p_t || p_s)

With several sources (e.g. logit KD from an ensemble of teachers) the KD term is the mean over the
sources that teach the batch.
"""
from __future__ import annotations

import torch.nn.functional as F

from kdlab.distill.base import STRATEGIES, LossTerms, Strategy
from kdlab.distill.losses import kd_loss_sum


@STRATEGIES.register("kd")
class HintonKD(Strategy):
    name = "kd"

    def loss_terms(self, student, sources, y, progress) -> LossTerms:
        lam = self.lam_at(progress)
        ce = F.cross_entropy(student.logits, y, label_smoothing=float(self.cfg.get("label_smoothing", 0.0)))
        if sources:
            kd = kd_loss_sum(student.logits, [s.logits for s in sources.values()], self.temperature,
                             self.kl_reduction) / len(sources)
        else:
            kd = ce.new_zeros(())
        return {"ce": ce, "kd": kd}, {"ce": 1.0 - lam, "kd": lam}
