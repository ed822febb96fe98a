"""FitNet: hints from a teacher's intermediate feature map through a trainable regressor.

A. Romero, N. Ballas, S. E. Kahou, A. Chassang, C. Gatta, Y. Bengio, "FitNets: Hints for Thin Deep Nets",
ICLR 2015, arXiv 1412.6550. Defaults: mdistiller's CIFAR-100 FitNet (hint at the middle stage, CE weight 1,
feature weight 100, a conv + BN regressor).

    L = ce_weight * CE + feat_weight * combine_k MSE(match_k(r_k(F_s)), F_k)

``F_s`` is the student's map at ``student_tap``, ``F_k`` source k's at ``source_tap``, ``r_k`` a regressor
per source (conv ``kernel_size`` x ``kernel_size`` from the student's to the source's channels, BatchNorm,
ReLU with ``relu: true``), MSE the mean over batch and elements. Where the spatial sizes differ, ``match_k``
brings the regressed map to the source's size: adaptive average pooling when it is larger, bilinear
interpolation when it is smaller (``feed.match_spatial``). The regressors train with the student and are
dropped at export. FitNet's two-stage schedule (hints first, then KD) is not reproduced: like mdistiller,
one stage with both terms.
"""
from __future__ import annotations

from typing import ClassVar

import torch.nn.functional as F
from torch import nn

from kdlab.distill.base import STRATEGIES, check_flag
from kdlab.distill.features import ConvBN, FeatureStrategy
from kdlab.distill.feed import match_spatial
from kdlab.errors import ConfigError

KERNEL_SIZES = (1, 3)


@STRATEGIES.register("fitnet")
class FitNet(FeatureStrategy):
    name = "fitnet"
    options: ClassVar[dict] = {"label_smoothing": 0.0,
                               "fitnet": {"ce_weight": 1.0, "feat_weight": 100.0, "student_tap": "stage2",
                                          "source_tap": "stage2", "kernel_size": 1, "relu": False,
                                          "combine": "mean"}}
    term_weights: ClassVar[dict[str, str]] = {"fitnet": "feat_weight"}
    hints: ClassVar[dict[str, str]] = {"lam": "fitnet.feat_weight"}  # the weight of its one distillation term

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.require_maps(ctx, known=True)
        (s_tap, t_tap), = self.pairs
        c_s = ctx.student_feature_shapes[s_tap][0]
        self.regressors = nn.ModuleDict()
        self._target_sizes: dict[str, tuple[int, int]] = {}
        for name in ctx.source_names:
            c_t, h_t, w_t = ctx.source_feature_shapes[name][t_tap]
            self.regressors[name] = ConvBN(c_s, c_t, int(self.opts["kernel_size"]), bool(self.opts["relu"]))
            self._target_sizes[name] = (h_t, w_t)

    @classmethod
    def check_block(cls, block, where) -> None:
        k = block["kernel_size"]
        if isinstance(k, bool) or k not in KERNEL_SIZES:
            raise ConfigError(f"{where}.kernel_size must be 1 or 3, got {k!r}")
        check_flag(f"{where}.relu", block["relu"])

    def source_losses(self, name, student, source):
        (s_tap, t_tap), = self.pairs
        hint = match_spatial(self.regressors[name](student[s_tap]), self._target_sizes[name])
        return {"fitnet": F.mse_loss(hint.float(), source[t_tap].float())}
