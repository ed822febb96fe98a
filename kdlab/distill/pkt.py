"""PKT: probabilistic knowledge transfer -- match the conditional probabilities of cosine-similarity kernels.

N. Passalis, A. Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer", ECCV 2018,
arXiv 1803.10837. Defaults: mdistiller's CIFAR-100 PKT (the pooled embedding, feature weight 30000,
eps 1e-7), which follows the authors' code.

    K_ij = (1 + cos(x_i, x_j)) / 2,   P_ij = K_ij / sum_j K_ij               (for student and source)
    L = ce_weight * CE + feat_weight * combine_k mean_{i,j} P^k_ij log((P^k_ij + eps) / (P^s_ij + eps))

i.e. the KL divergence KL(P^k_i || P^s_i) of each row, averaged over the b x b entries (1/b times the
mean row KL), as in the authors' code. The feature at ``student_tap`` / ``source_tap`` is flattened per
sample; the student's and the source's dimensions need not agree. Relational: it needs a batch of at least
2 samples (a batch of one gives a zero term). No trainable parts.
"""
from __future__ import annotations

from typing import ClassVar

import torch

from kdlab.distill.base import STRATEGIES, check_number
from kdlab.distill.features import FeatureStrategy, zero_loss


def conditional_probabilities(f: torch.Tensor, eps: float) -> torch.Tensor:
    x = f.flatten(1)
    x = x / (x.pow(2).sum(1, keepdim=True).sqrt() + eps)
    k = (x @ x.t() + 1.0) / 2.0
    return k / k.sum(1, keepdim=True)


def pkt_loss(f_s: torch.Tensor, f_t: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """mean_{i,j} P_t log((P_t + eps) / (P_s + eps)) (any float dtype)."""
    if f_s.shape[0] < 2:
        return zero_loss(f_s)
    p_s, p_t = conditional_probabilities(f_s, eps), conditional_probabilities(f_t, eps)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


@STRATEGIES.register("pkt")
class ProbabilisticKT(FeatureStrategy):
    name = "pkt"
    options: ClassVar[dict] = {"label_smoothing": 0.0,
                               "pkt": {"ce_weight": 1.0, "feat_weight": 30000.0, "eps": 1e-7,
                                       "student_tap": "embedding", "source_tap": "embedding", "combine": "mean"}}
    term_weights: ClassVar[dict[str, str]] = {"pkt": "feat_weight"}
    hints: ClassVar[dict[str, str]] = {"lam": "pkt.feat_weight"}  # the weight of its one distillation term

    @classmethod
    def check_block(cls, block, where) -> None:
        check_number(f"{where}.eps", block["eps"], low=0, low_open=True)

    def source_losses(self, name, student, source):
        (s_tap, t_tap), = self.pairs
        return {"pkt": pkt_loss(student[s_tap].float(), source[t_tap].float(), float(self.opts["eps"]))}
