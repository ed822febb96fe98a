"""DIST: distillation by Pearson correlation of the predictions, between and within classes.

T. Huang, S. You, F. Wang, C. Qian, C. Xu, "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022,
arXiv 2205.10536.

Instead of an exact match of probabilities (KL), the student matches the teacher's predictions up to a
positive affine map, row by row (inter-class relation: how a sample's classes rank) and column by column
(intra-class relation: how the batch's samples rank for a class):

    p = softmax(z / T)                                                (B, C), student and teacher
    inter = 1 - (1/B) sum_i pearson(p_s[i, :], p_t[i, :])
    intra = 1 - (1/C) sum_c pearson(p_s[:, c], p_t[:, c])
    L = CE + beta * T^2 * inter + gamma * T^2 * intra

``pearson(a, b) = <a - mean a, b - mean b> / (|a - mean a| |b - mean b| + 1e-8)`` (as in the official code:
a constant vector, e.g. a column of a batch of one, has correlation 0 with anything). With several sources
each relation term is combined over the sources that teach the batch (``combine``: mean or sum). Reads
source logits only (no feature taps); nothing trains.

Defaults: the official CIFAR-100 recipe (hunto/image_classification_sota,
``configs/strategies/distill/dist_cifar.yaml``: ``kd: dist_t4`` = DIST(beta=1, gamma=1, tau=4) with
``kd_loss_weight: 2`` and ``ori_loss_weight: 1``), i.e. ``beta = gamma = 2``, ``T = 4``. ImageNet uses
beta = gamma = 1, T = 1 (also with kd_loss_weight 2 in ``resnet_dist.yaml``).
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from kdlab.distill.base import STRATEGIES, check_combine, check_number
from kdlab.distill.logit import LogitBlockStrategy

DEFAULTS: dict[str, Any] = {"beta": 2.0, "gamma": 2.0, "temperature": 4.0, "combine": "mean"}
PEARSON_EPS = 1e-8


def pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = PEARSON_EPS) -> torch.Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b`` (cosine of the centred rows)."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
               temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inter, intra)``: one minus the mean Pearson correlation of the softened predictions over the rows
    (samples) and over the columns (classes), in the inputs' dtype (without the ``T^2`` factor)."""
    p_s = F.softmax(student_logits / temperature, dim=1)
    p_t = F.softmax(teacher_logits / temperature, dim=1)
    inter = 1.0 - pearson_rows(p_s, p_t).mean()
    intra = 1.0 - pearson_rows(p_s.t(), p_t.t()).mean()
    return inter, intra


@STRATEGIES.register("dist")
class DIST(LogitBlockStrategy):
    name = "dist"
    options: ClassVar[dict] = {"label_smoothing": 0.0, "dist": DEFAULTS}
    terms: ClassVar[tuple[str, ...]] = ("inter", "intra")

    @classmethod
    def check_options(cls, block, where) -> None:
        check_number(f"{where}.beta", block["beta"], low=0)
        check_number(f"{where}.gamma", block["gamma"], low=0)
        check_number(f"{where}.temperature", block["temperature"], low=0, low_open=True)
        check_combine(where, block)

    def source_terms(self, z_s, z_t, y):
        return dist_terms(z_s, z_t, self.block_temperature)

    def weights_at(self, progress):
        t2 = self.block_temperature ** 2
        return {"ce": 1.0, "inter": float(self.opts["beta"]) * t2, "intra": float(self.opts["gamma"]) * t2}
