"""AT: attention transfer -- the student matches the teacher's spatial attention maps at several layers.

S. Zagoruyko, N. Komodakis, "Paying More Attention to Attention: Improving the Performance of Convolutional
Neural Networks via Attention Transfer", ICLR 2017, arXiv 1612.03928. Defaults: mdistiller's CIFAR-100 AT
(p = 2, feature weight 1000, every stage after the stem: the family's ``feats`` entry of
:data:`kdlab.models.taps.REFERENCE_TAPS` when the taps are null).

    Q(F) = normalize(flatten(mean_c F_c^p))                       (per sample, L2; ``abs: true``: |F_c|^p)
    L = ce_weight * CE + feat_weight * combine_k sum_l mean_{batch, positions} (Q(F_s^l) - Q(F_k^l))^2

``F^p`` is what mdistiller (``feat.pow(p)``), RepDistiller and the authors' code compute; it equals ``|F|^p`` for
an even ``p`` or a map without negative values (after a ReLU), and differs for an odd ``p`` on a signed map (a WRN's
raw block outputs): there ``F^3`` keeps the sign, ``|F|^3`` does not. ``abs: true`` selects ``|F|^p`` (kdlab's
form before it followed the references); with ``abs: false`` a non-integer ``p`` is rejected (``F^p`` of a
negative value is undefined). ``abs`` is hashed into the store key only where it can change the loss (``p`` not
an even integer).

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

from kdlab.distill.base import STRATEGIES, check_flag, check_number
from kdlab.distill.features import FeatureStrategy, pool_to_smaller
from kdlab.errors import ConfigError


def attention(f: torch.Tensor, p: float, absolute: bool = False) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W): the channel mean of F^p (``absolute``: |F|^p), L2-normalized per sample."""
    return F.normalize((f.abs() if absolute else f).pow(p).mean(1).flatten(1), dim=1)


def at_loss(f_s: torch.Tensor, f_t: torch.Tensor, p: float = 2.0, absolute: bool = False) -> torch.Tensor:
    """One layer's attention-transfer loss (any float dtype; maps pooled to the smaller spatial size)."""
    f_s, f_t = pool_to_smaller(f_s, f_t)
    return (attention(f_s, p, absolute) - attention(f_t, p, absolute)).pow(2).mean()


def even_integer(p: object) -> bool:
    """``p`` is a number with an even integer value (where F^p = |F|^p)."""
    return isinstance(p, (int, float)) and not isinstance(p, bool) and float(p).is_integer() and int(p) % 2 == 0


@STRATEGIES.register("at")
class AttentionTransfer(FeatureStrategy):
    name = "at"
    options: ClassVar[dict] = {"label_smoothing": 0.0,
                               "at": {"ce_weight": 1.0, "feat_weight": 1000.0, "p": 2.0, "abs": False,
                                      "student_taps": None, "source_taps": None, "combine": "mean"}}
    term_weights: ClassVar[dict[str, str]] = {"at": "feat_weight"}
    hints: ClassVar[dict[str, str]] = {"lam": "at.feat_weight"}  # the weight of its one distillation term
    tap_keys: ClassVar[tuple[str, str]] = ("student_taps", "source_taps")
    many_taps: ClassVar[bool] = True
    reference_taps: ClassVar[dict[str, str]] = {"student_taps": "feats", "source_taps": "feats"}
    fallback_taps: ClassVar[dict] = {"student_taps": ["stage1", "stage2", "prepool"],
                                     "source_taps": ["stage1", "stage2", "prepool"]}

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.p = float(self.opts["p"])
        self.absolute = bool(self.opts["abs"])
        self.require_maps(ctx)

    @classmethod
    def check_block(cls, block, where) -> None:
        p = check_number(f"{where}.p", block["p"], low=0, low_open=True)
        if not check_flag(f"{where}.abs", block["abs"]) and not p.is_integer():
            raise ConfigError(f"{where}.p={block['p']!r} is not an integer: F^p of a negative value is undefined; "
                              f"set {where}.abs=true (|F|^p) or an integer p")

    @classmethod
    def own_config(cls, cfg):
        """``abs`` is hashed only where it can change the loss: ``p`` not an even integer."""
        out = super().own_config(cfg)
        if even_integer(out["at"]["p"]):
            out["at"].pop("abs")
        return out

    def source_losses(self, name, student, source):
        return {"at": torch.stack([at_loss(student[s].float(), source[t].float(), self.p, self.absolute)
                                   for s, t in self.pairs]).sum()}
