"""AT: attention transfer -- the student matches the teacher's spatial attention maps at several layers.

S. Zagoruyko, N. Komodakis, "Paying More Attention to Attention: Improving the Performance of Convolutional
Neural Networks via Attention Transfer", ICLR 2017, arXiv 1612.03928. Defaults: mdistiller's CIFAR-100 AT
(p = 2, feature weight 1000, every stage after the stem).

    Q(F) = normalize(flatten(mean_c |F_c|^p))                     (per sample, L2)
    L = ce_weight * CE + feat_weight * combine_k sum_l mean_{batch, positions} (Q(F_s^l) - Q(F_k^l))^2

The layers are ``student_taps[l]`` paired with ``source_taps[l]``; the channel counts may differ. Where the
spatial sizes differ, the larger map is adaptive-average-pooled to the smaller one before its attention is
taken (as mdistiller does). The squared difference is averaged over batch and positions, as in mdistiller
and RepDistiller with weight 1000; the authors' code writes ``beta / 2 * sum_l`` of the same mean with
beta = 1000, i.e. an effective weight of 500 (set ``feat_weight: 500`` for it). No trainable parts.
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from kdlab.distill.base import STRATEGIES, check_number
from kdlab.distill.features import FeatureStrategy, pool_to_smaller


def attention(f: torch.Tensor, p: float) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W): the channel mean of |F|^p, L2-normalized per sample."""
    return F.normalize(f.abs().pow(p).mean(1).flatten(1), dim=1)


def at_loss(f_s: torch.Tensor, f_t: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """One layer's attention-transfer loss (any float dtype; maps pooled to the smaller spatial size)."""
    f_s, f_t = pool_to_smaller(f_s, f_t)
    return (attention(f_s, p) - attention(f_t, p)).pow(2).mean()


@STRATEGIES.register("at")
class AttentionTransfer(FeatureStrategy):
    name = "at"
    options: ClassVar[dict] = {"label_smoothing": 0.0,
                               "at": {"ce_weight": 1.0, "feat_weight": 1000.0, "p": 2.0,
                                      "student_taps": ["stage1", "stage2", "prepool"],
                                      "source_taps": ["stage1", "stage2", "prepool"], "combine": "mean"}}
    term_weights: ClassVar[dict[str, str]] = {"at": "feat_weight"}
    hints: ClassVar[dict[str, str]] = {"lam": "at.feat_weight"}  # the weight of its one distillation term
    tap_keys: ClassVar[tuple[str, str]] = ("student_taps", "source_taps")
    many_taps: ClassVar[bool] = True

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.p = float(self.opts["p"])
        self.require_maps(ctx)

    @classmethod
    def check_block(cls, block, where) -> None:
        check_number(f"{where}.p", block["p"], low=0, low_open=True)

    def source_losses(self, name, student, source):
        return {"at": torch.stack([at_loss(student[s].float(), source[t].float(), self.p)
                                   for s, t in self.pairs]).sum()}
