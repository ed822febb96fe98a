"""RKD: relational KD -- the student matches the distances and angles among the teacher's embeddings.

W. Park, D. Kim, Y. Lu, M. Cho, "Relational Knowledge Distillation", CVPR 2019, arXiv 1904.05068. Defaults:
the paper's and mdistiller's weights (distance 25, angle 50) on the pooled embedding, Euclidean (not
squared) distances, Huber = smooth-L1 with delta 1.

    psi_D(i, j)    = ||e_i - e_j|| / mu,   mu = mean_{i != j} ||e_i - e_j||
    psi_A(i, j, k) = < (e_j - e_i) / ||e_j - e_i||, (e_k - e_i) / ||e_k - e_i|| >
    L = ce_weight * CE + distance_weight * combine_k mean_{i,j} huber(psi_D^s, psi_D^k)
                       + angle_weight    * combine_k mean_{i,j,k} huber(psi_A^s, psi_A^k)

Both means run over all b^2 pairs / b^3 triplets, the degenerate ones included (they are 0 on both sides),
as in the authors' and mdistiller's code; distances are clamped at ``1e-12`` before the square root. The two
terms are logged as ``train/loss_rkd_dist`` and ``train/loss_rkd_angle``. Only relations are compared, so the
student's and the source's embedding dimensions need not agree. Relational: it needs a batch of at least 2
samples (a batch of one gives zero terms). No trainable parts.
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from kdlab.distill.base import STRATEGIES, check_flag
from kdlab.distill.features import FeatureStrategy, zero_loss

PDIST_EPS = 1e-12


def normalized_distances(e: torch.Tensor, squared: bool = False) -> torch.Tensor:
    """(b, d) -> (b, b) pairwise (squared) Euclidean distances over their off-diagonal mean, 0 on the diagonal."""
    sq = e.pow(2).sum(1)
    d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2.0 * e @ e.t()).clamp(min=PDIST_EPS)
    if not squared:
        d = d.sqrt()
    d = d * (1.0 - torch.eye(len(e), dtype=d.dtype, device=d.device))
    b = len(e)
    return d / (d.sum() / (b * (b - 1)))


def angles(e: torch.Tensor) -> torch.Tensor:
    """(b, d) -> (b, b, b): cos of the angle at vertex i between e_j and e_k."""
    u = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), dim=2)  # u[i, j] = unit(e_j - e_i)
    return u @ u.transpose(1, 2)


def rkd_losses(f_s: torch.Tensor, f_t: torch.Tensor, squared: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(distance-wise, angle-wise) RKD losses of flattened features (any float dtype)."""
    if f_s.shape[0] < 2:
        return zero_loss(f_s), zero_loss(f_s)
    s, t = f_s.flatten(1), f_t.flatten(1)
    dist = F.smooth_l1_loss(normalized_distances(s, squared), normalized_distances(t, squared))
    angle = F.smooth_l1_loss(angles(s), angles(t))
    return dist, angle


@STRATEGIES.register("rkd")
class RelationalKD(FeatureStrategy):
    name = "rkd"
    options: ClassVar[dict] = {"label_smoothing": 0.0,
                               "rkd": {"ce_weight": 1.0, "distance_weight": 25.0, "angle_weight": 50.0,
                                       "squared": False, "student_tap": "embedding", "source_tap": "embedding",
                                       "combine": "mean"}}
    term_weights: ClassVar[dict[str, str]] = {"rkd_dist": "distance_weight", "rkd_angle": "angle_weight"}

    @classmethod
    def check_block(cls, block, where) -> None:
        check_flag(f"{where}.squared", block["squared"])

    def source_losses(self, name, student, source):
        (s_tap, t_tap), = self.pairs
        dist, angle = rkd_losses(student[s_tap].float(), source[t_tap].float(), bool(self.opts["squared"]))
        return {"rkd_dist": dist, "rkd_angle": angle}
