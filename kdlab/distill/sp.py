"""SP: similarity-preserving KD -- the student matches the teacher's batch similarity matrix.

F. Tung, G. Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019, arXiv 1907.09682. Defaults:
mdistiller's CIFAR-100 SP (the last stage's map, gamma 3000; null taps: the family's ``last`` entry of
:data:`kdlab.models.taps.REFERENCE_TAPS`, else ``prepool``).

    G(F) = normalize_rows(A A^T),  A = flatten(F) in R^{b x d}     (row-wise L2 normalization)
    L = ce_weight * CE + gamma * combine_k ||G(F_s) - G(F_k)||_F^2 / b^2

``A`` is the batch's feature at ``student_tap`` / ``source_tap`` flattened per sample, so the student's and
the source's shapes need not agree (only the batch does); no spatial matching is needed. Relational: it
needs a batch of at least 2 samples (a batch of one gives a zero term). No trainable parts.
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from kdlab.distill.base import STRATEGIES
from kdlab.distill.features import FeatureStrategy, zero_loss


def similarity(f: torch.Tensor) -> torch.Tensor:
    a = f.flatten(1)
    return F.normalize(a @ a.t(), dim=1)


def sp_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """||G_s - G_t||_F^2 / b^2 (any float dtype)."""
    b = f_s.shape[0]
    if b < 2:
        return zero_loss(f_s)
    return (similarity(f_s) - similarity(f_t)).pow(2).sum() / (b * b)


@STRATEGIES.register("sp")
class SimilarityPreserving(FeatureStrategy):
    name = "sp"
    options: ClassVar[dict] = {"label_smoothing": 0.0,
                               "sp": {"ce_weight": 1.0, "gamma": 3000.0, "student_tap": None,
                                      "source_tap": None, "combine": "mean"}}
    term_weights: ClassVar[dict[str, str]] = {"sp": "gamma"}
    reference_taps: ClassVar[dict[str, str]] = {"student_tap": "last", "source_tap": "last"}
    fallback_taps: ClassVar[dict] = {"student_tap": "prepool", "source_tap": "prepool"}
    hints: ClassVar[dict[str, str]] = {"lam": "sp.gamma"}  # the weight of its one distillation term

    def source_losses(self, name, student, source) -> dict[str, torch.Tensor]:
        (s_tap, t_tap), = self.pairs
        return {"sp": sp_loss(student[s_tap].float(), source[t_tap].float())}
