"""Labels only: the teacher, and any student trained alone."""
from __future__ import annotations

from typing import ClassVar

import torch.nn.functional as F

from kdlab.distill.base import STRATEGIES, LossTerms, Strategy


@STRATEGIES.register("ce")
class CrossEntropy(Strategy):
    name = "ce"
    uses_sources = False
    options: ClassVar[dict] = {"label_smoothing": 0.0}

    def loss_terms(self, student, sources, y, progress) -> LossTerms:
        ls = float(self.cfg.get("label_smoothing", 0.0))
        return {"ce": F.cross_entropy(student.logits, y, label_smoothing=ls)}, {"ce": 1.0}
