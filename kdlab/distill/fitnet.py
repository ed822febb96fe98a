"""FitNet: hints from a teacher's intermediate feature map through a trainable regressor.

A. Romero, N. Ballas, S. E. Kahou, A. Chassang, C. Gatta, Y. Bengio, "FitNets: Hints for Thin Deep Nets",
ICLR 2015, arXiv 1412.6550. Defaults: mdistiller's CIFAR-100 FitNet (hint at ``feats[2]``, the family's ``hint``
entry of :data:`kdlab.models.taps.REFERENCE_TAPS` when the taps are null; CE weight 1, feature weight 100;
mdistiller's ``ConvReg`` regressor with its ReLU).

    L = ce_weight * CE + feat_weight * combine_k MSE(r_k(F_s), F_k)

``F_s`` is the student's map at ``student_tap``, ``F_k`` source k's at ``source_tap``, ``r_k`` a regressor per
source, MSE the mean over batch and elements. ``kernel_size: auto`` is mdistiller's / RepDistiller's ``ConvReg``
(mdistiller/distillers/_common.py, RepDistiller models/util.py): a convolution with bias chosen by the heights
(student twice the source's: 3x3 stride 2; half: 4x4 transposed stride 2; otherwise, student not smaller: a valid
convolution of (1 + H_s - H_t) x (1 + W_s - W_t), 1x1 at equal sizes), BatchNorm, ReLU (``relu: true``). Where
``ConvReg`` has no case (a student map smaller than the source's, not by half) it is a 1x1 convolution followed by
bilinear interpolation. ``kernel_size: 1 | 3`` is a same-padded convolution without bias + BatchNorm [+ ReLU],
its output brought to the source's size by adaptive average pooling (larger) or bilinear interpolation (smaller).
``relu: false`` drops the ReLU, for hints taken before an activation (a signed map a ReLU output cannot match).
The regressors train with the student and are dropped at export. FitNet's two-stage schedule (hints first,
then KD) is not reproduced: like mdistiller, one stage with both terms.
"""
from __future__ import annotations

from typing import ClassVar

import torch.nn.functional as F
from torch import nn

from kdlab.distill.base import STRATEGIES, check_flag
from kdlab.distill.features import ConvBN, FeatureStrategy
from kdlab.distill.feed import match_spatial
from kdlab.errors import ConfigError

KERNEL_SIZES = ("auto", 1, 3)


class ConvReg(nn.Sequential):
    """mdistiller's / RepDistiller's FitNet regressor ``ConvReg`` for (C, H, W) shapes ``s_shape`` -> ``t_shape``:
    ``conv`` (chosen by the sizes, with bias), ``bn``, ``relu`` (an Identity without ``relu``)."""

    def __init__(self, s_shape: tuple[int, int, int], t_shape: tuple[int, int, int], relu: bool = True):
        (c_s, h_s, w_s), (c_t, h_t, w_t) = s_shape, t_shape
        if h_s == 2 * h_t:
            conv: nn.Module = nn.Conv2d(c_s, c_t, kernel_size=3, stride=2, padding=1)
        elif 2 * h_s == h_t:
            conv = nn.ConvTranspose2d(c_s, c_t, kernel_size=4, stride=2, padding=1)
        elif h_s >= h_t and w_s >= w_t:
            conv = nn.Conv2d(c_s, c_t, kernel_size=(1 + h_s - h_t, 1 + w_s - w_t))
        else:  # no case in ConvReg (it raises): kdlab's 1x1 convolution, the size matched afterwards
            conv = nn.Conv2d(c_s, c_t, kernel_size=1)
        super().__init__()
        self.conv = conv
        self.bn = nn.BatchNorm2d(c_t)
        self.relu = nn.ReLU() if relu else nn.Identity()


@STRATEGIES.register("fitnet")
class FitNet(FeatureStrategy):
    name = "fitnet"
    options: ClassVar[dict] = {"label_smoothing": 0.0,
                               "fitnet": {"ce_weight": 1.0, "feat_weight": 100.0, "student_tap": None,
                                          "source_tap": None, "kernel_size": "auto", "relu": True,
                                          "combine": "mean"}}
    term_weights: ClassVar[dict[str, str]] = {"fitnet": "feat_weight"}
    reference_taps: ClassVar[dict[str, str]] = {"student_tap": "hint", "source_tap": "hint"}
    fallback_taps: ClassVar[dict] = {"student_tap": "stage2", "source_tap": "stage2"}
    hints: ClassVar[dict[str, str]] = {"lam": "fitnet.feat_weight"}  # the weight of its one distillation term

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.require_maps(ctx, known=True)
        (s_tap, t_tap), = self.pairs
        s_shape = ctx.student_feature_shapes[s_tap]
        kernel, relu = self.opts["kernel_size"], bool(self.opts["relu"])
        self.regressors = nn.ModuleDict()
        self._target_sizes: dict[str, tuple[int, int]] = {}
        for name in ctx.source_names:
            t_shape = ctx.source_feature_shapes[name][t_tap]
            self.regressors[name] = ConvReg(s_shape, t_shape, relu) if kernel == "auto" \
                else ConvBN(s_shape[0], t_shape[0], int(kernel), relu)
            self._target_sizes[name] = (t_shape[1], t_shape[2])

    @classmethod
    def check_block(cls, block, where) -> None:
        k = block["kernel_size"]
        if isinstance(k, bool) or k not in KERNEL_SIZES:
            raise ConfigError(f"{where}.kernel_size must be auto (mdistiller's ConvReg), 1 or 3, got {k!r}")
        check_flag(f"{where}.relu", block["relu"])

    def source_losses(self, name, student, source):
        (s_tap, t_tap), = self.pairs
        hint = match_spatial(self.regressors[name](student[s_tap]), self._target_sizes[name])
        return {"fitnet": F.mse_loss(hint.float(), source[t_tap].float())}
