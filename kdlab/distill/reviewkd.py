"""ReviewKD: knowledge review -- the student's stages fused deep to shallow, matched to the source's stages.

P. Chen, S. Liu, H. Zhao, J. Jia, "Distilling Knowledge via Knowledge Review", CVPR 2021, arXiv 2104.09044.

The student's feature maps ``F_s^1..F_s^n`` (shallow to deep, the ``student_taps``) go through one
attention-based fusion (ABF) stack per source, from the deepest level up. At level i, ``x_i = BN(conv1x1(F_s^i))``
(``mid`` channels); below the deepest level it is fused with the residual ``r_{i+1}`` of the level beneath,
resized to the level's size: ``[a, b] = sigmoid(conv1x1([x_i, r_{i+1}]))``, ``x_i <- a * x_i + b * r_{i+1}``.
``x_i`` is resized to the source's map at that level (``r_i = x_i``) and ``O_i = BN(conv3x3(x_i))`` has the
source's channel count. The hierarchical context loss compares each ``O_i`` with the source's map ``F_t^i``:

    HCL(O, F_t) = sum_i [ MSE(O_i, F_t^i) + sum_{l in 4, 2, 1; l < size_i} w_l MSE(P_l(O_i), P_l(F_t^i)) ]
                        / (1 + sum w_l)                     (w: 1/2, 1/4, 1/8 for the levels used, in order)

with ``P_l`` the adaptive average pooling to l x l. The stage's loss is

    L = ce_weight * CE + feat_weight * min(1, epoch / warmup) * combine_k HCL_k

with the warm-up continuous in the training progress (``progress * max_epochs / warmup``). ``mid`` is
``min(max_mid_channels, channels of the deepest student tap)`` (the reference code's ``min(512, C)``).
Spatial sizes: a map is resized to a smaller size by adaptive average pooling and to a larger one by
interpolation (``upsample``: ``nearest`` as in the reference code, or ``bilinear``). A vector tap (e.g.
``embedding``, the pooled feature) is a 1 x 1 map, as the reference code's last level.

Taps left null are mdistiller's levels (mdistiller/distillers/ReviewKD.py): the student's ``feats[1:]`` and its
pooled feature, the teacher's ``preact_feats[1:]`` (each stage *before* its last ReLU) and its pooled feature,
i.e. the ``review`` / ``review_preact`` entries of :data:`kdlab.models.taps.REFERENCE_TAPS`: for a CIFAR ResNet
``[stage1, stage2, stage3, embedding]`` against ``[preact1, preact2, preact3, embedding]`` (four levels; five for
VGG and a MobileNetV2 student, as the official code's configurations). Families without a row (plain CNNs,
library models) fall back to ``[stage1, stage2, prepool]`` on both sides.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from kdlab.distill.base import (
    STRATEGIES,
    BlockStrategy,
    LossTerms,
    StrategyContext,
    check_choice,
    check_combine,
    check_number,
    combined_terms,
)
from kdlab.distill.features import block_tap, resolve_taps, unique
from kdlab.errors import ConfigError

UPSAMPLE = ("nearest", "bilinear")
HCL_LEVELS = (4, 2, 1)


def hcl_loss(student_maps: Sequence[torch.Tensor], source_maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """The hierarchical context loss of paired (B, C, H, W) maps (same shapes per pair), summed over pairs."""
    total = student_maps[0].new_zeros(())
    for fs, ft in zip(student_maps, source_maps):
        loss, w, norm = F.mse_loss(fs, ft), 1.0, 1.0
        for level in HCL_LEVELS:
            if level >= min(fs.shape[-2], fs.shape[-1]):
                continue
            w /= 2.0
            loss = loss + w * F.mse_loss(F.adaptive_avg_pool2d(fs, level), F.adaptive_avg_pool2d(ft, level))
            norm += w
        total = total + loss / norm
    return total


def resize(x: torch.Tensor, size: tuple[int, int], upsample: str = "nearest") -> torch.Tensor:
    """``x`` at ``size``: adaptive average pooling when it shrinks in both dimensions, else interpolation."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(x, size)
    if upsample == "bilinear":
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return F.interpolate(x, size=size, mode="nearest")


def as_map(x: torch.Tensor) -> torch.Tensor:
    """A (B, C, H, W) map; a (B, C) vector is a 1 x 1 map."""
    return x[:, :, None, None] if x.dim() == 2 else x


class ABF(nn.Module):
    """Attention-based fusion: 1x1 conv + BN to ``mid``, [fusion with the deeper residual], 3x3 conv + BN."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(out_channels))
        self.att_conv = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)  # as the reference code
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, out_size: tuple[int, int],
                upsample: str = "nearest") -> tuple[torch.Tensor, torch.Tensor]:
        """(output at ``out_size`` with the source's channels, the new residual)."""
        x = self.conv1(x)
        if self.att_conv is not None:
            if residual is None:
                raise ValueError("a fusing ABF needs the residual of the level beneath")
            residual = resize(residual, tuple(x.shape[-2:]), upsample)
            z = self.att_conv(torch.cat([x, residual], dim=1))
            x = x * z[:, 0:1] + residual * z[:, 1:2]
        x = resize(x, out_size, upsample)
        return self.conv2(x), x


class ReviewFusion(nn.Module):
    """One source's ABF stack: student maps (shallow to deep) -> outputs shaped like the source's maps."""

    def __init__(self, in_channels: list[int], out_shapes: list[tuple[int, int, int]], max_mid_channels: int,
                 upsample: str = "nearest"):
        super().__init__()
        mid = min(int(max_mid_channels), in_channels[-1])
        n = len(in_channels)
        self.abfs = nn.ModuleList(ABF(c_in, mid, shape[0], fuse=i < n - 1)
                                  for i, (c_in, shape) in enumerate(zip(in_channels, out_shapes)))
        self.out_sizes = [(s[1], s[2]) for s in out_shapes]
        self.mid_channels = mid
        self.upsample = upsample

    def forward(self, maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        outs: list[torch.Tensor] = [maps[0]] * len(maps)
        residual = None
        for i in reversed(range(len(maps))):
            outs[i], residual = self.abfs[i](maps[i], residual, self.out_sizes[i], self.upsample)
        return outs


def _map_shape(shape: tuple[int, ...] | None) -> tuple[int, int, int] | None:
    if shape is None:
        return None
    if len(shape) == 1:
        return (int(shape[0]), 1, 1)
    return tuple(int(s) for s in shape) if len(shape) == 3 else None  # type: ignore[return-value]


def _tap_list(where: str, value: Any) -> list[str]:
    items = [value] if isinstance(value, str) else list(value) if isinstance(value, Sequence) else None
    if not items or not all(isinstance(v, str) and v for v in items):
        raise ConfigError(f"{where} must be a non-empty list of feature points (e.g. [stage1, stage2, prepool]), "
                          f"got {value!r}")
    return items


@STRATEGIES.register("reviewkd")
class ReviewKD(BlockStrategy):
    name = "reviewkd"
    options: ClassVar[dict] = {
        "label_smoothing": 0.0,
        "reviewkd": {"feat_weight": 1.0, "ce_weight": 1.0, "warmup": 20, "student_taps": None, "source_taps": None,
                     "max_mid_channels": 512, "upsample": "nearest", "combine": "mean"},
    }
    tap_keys: ClassVar[tuple[str, str]] = ("student_taps", "source_taps")
    many_taps: ClassVar[bool] = True
    reference_taps: ClassVar[dict[str, str]] = {"student_taps": "review", "source_taps": "review_preact"}
    fallback_taps: ClassVar[dict] = {"student_taps": ["stage1", "stage2", "prepool"],
                                     "source_taps": ["stage1", "stage2", "prepool"]}
    hints: ClassVar[dict[str, str]] = {"lam": "reviewkd.feat_weight"}  # the weight of its distillation term

    def __init__(self, cfg: dict[str, Any], ctx: StrategyContext):
        super().__init__(cfg, ctx)
        o = self.opts
        self.weight, self.ce_weight = float(o["feat_weight"]), float(o["ce_weight"])
        self.warmup_epochs = float(o["warmup"])
        self.s_taps = _tap_list("", block_tap(self, o, "student_taps"))
        self.t_taps = _tap_list("", block_tap(self, o, "source_taps"))
        self.upsample = str(o["upsample"])
        s_shapes = [_map_shape(ctx.student_feature_shapes.get(t)) for t in self.s_taps]
        self.fusions = nn.ModuleDict()
        for name in ctx.source_names:
            t_shapes = [_map_shape(ctx.source_feature_shapes.get(name, {}).get(t)) for t in self.t_taps]
            for s_tap, t_tap, s, t in zip(self.s_taps, self.t_taps, s_shapes, t_shapes):
                if s is None or t is None:
                    raise ConfigError(
                        f"ReviewKD needs feature maps (C, H, W) or vectors (C,) at tap {s_tap!r} (student) and "
                        f"{t_tap!r} (source {name!r}); got {ctx.student_feature_shapes.get(s_tap)} and "
                        f"{ctx.source_feature_shapes.get(name, {}).get(t_tap)}")
            self.fusions[name] = ReviewFusion([s[0] for s in s_shapes], t_shapes, int(o["max_mid_channels"]),
                                              self.upsample)

    # -- config ------------------------------------------------------------------------------------------
    @classmethod
    def check_options(cls, block: dict[str, Any], where: str) -> None:
        check_number(f"{where}.feat_weight", block["feat_weight"], low=0)
        check_number(f"{where}.ce_weight", block["ce_weight"], low=0)
        check_number(f"{where}.warmup", block["warmup"], low=0)
        check_number(f"{where}.max_mid_channels", block["max_mid_channels"], low=1, integer=True)
        check_choice(f"{where}.upsample", block["upsample"], UPSAMPLE)
        check_combine(where, block)
        s_taps = _tap_list(f"{where}.student_taps", block_tap(cls, block, "student_taps"))
        t_taps = _tap_list(f"{where}.source_taps", block_tap(cls, block, "source_taps"))
        if len(s_taps) != len(t_taps):
            raise ConfigError(f"{where}.student_taps and {where}.source_taps pair up by position (shallow to deep) "
                              f"and must have the same length, got {s_taps!r} and {t_taps!r}")

    # -- feature points ----------------------------------------------------------------------------------
    @classmethod
    def with_model_taps(cls, cfg: dict[str, Any], student_arch: str, source_archs: list[str]) -> dict[str, Any]:
        return resolve_taps(cls, cfg, student_arch, source_archs)

    @classmethod
    def taps(cls, cfg: dict[str, Any]) -> tuple[list[str], list[str]]:
        o = cls.block(cfg)
        return (unique(_tap_list("", block_tap(cls, o, "student_taps"))),
                unique(_tap_list("", block_tap(cls, o, "source_taps"))))

    def student_taps(self) -> list[str]:
        return unique(self.s_taps)

    def source_taps(self) -> list[str]:
        return unique(self.t_taps)

    # -- the loss ----------------------------------------------------------------------------------------
    def warmup(self, progress: float) -> float:
        """``min(1, epoch / warmup)`` with the epoch continuous: ``progress * max_epochs``."""
        if self.warmup_epochs <= 0:
            return 1.0
        return min(1.0, max(0.0, float(progress)) * self.ctx.max_epochs / self.warmup_epochs)

    def source_loss(self, name: str, student_maps: list[torch.Tensor], source_feats: dict[str, torch.Tensor]
                    ) -> torch.Tensor:
        outs = self.fusions[name](student_maps)
        targets = [as_map(source_feats[t].float()) for t in self.t_taps]
        return hcl_loss([o.float() for o in outs], targets)

    def loss_terms(self, student, sources, y, progress) -> LossTerms:
        ce = self.ce_loss(student.logits.float(), y)
        per_source = []
        if sources:
            maps = [as_map(student.features[t]) for t in self.s_taps]
            per_source = [{"reviewkd": self.source_loss(name, maps, out.features)} for name, out in sources.items()]
        terms = combined_terms(ce, per_source, ("reviewkd",), self.combine)
        return terms, {"ce": self.ce_weight, "reviewkd": self.weight * self.warmup(progress)}
