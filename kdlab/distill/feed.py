"""FEED: feature-level ensemble distillation (Park and Kwak), parallel and sequential.

The student carries one translator per source: three 3x3 convolutions (with bias), each followed by
LeakyReLU(0.1), mapping the student's tapped feature map (``in`` channels) to that source's channel count
(``out``). ``feed.translator`` sets their widths: ``factor_transfer`` (default) is Factor Transfer's
``Translator`` (Jangho-Kim/Factor-Transfer-pytorch, Models/FeatureProjection.py: in -> in -> out -> out), the
code FEED builds on; ``project_first`` (in -> out -> out -> out) is kdlab's earlier translator. They are the same
network when ``in == out``. Spatial sizes are matched by adaptive average pooling (student larger) or bilinear
interpolation (student smaller).

    L = CE + beta * reduce_k L1(normalize(flatten(Tr_k(F_s))), normalize(flatten(F_k)))
          [+ lambda-weighted logit KD from the same sources when ``feed.logit_kd`` is true]

``reduce`` is ``sum`` (default) or ``mean`` over the sources teaching the batch. Translators train with
the student and are dropped when the student is exported.
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from kdlab.distill.base import KD_OPTIONS, STRATEGIES, LossTerms, Strategy
from kdlab.distill.losses import feature_l1, kd_loss
from kdlab.errors import ConfigError

REDUCTIONS = ("sum", "mean")
#: translator -> the widths of its three convolutions' outputs, from ``in`` (the student's) and ``out`` channels
TRANSLATORS = {"factor_transfer": lambda c_in, c_out: (c_in, c_out, c_out),
               "project_first": lambda c_in, c_out: (c_out, c_out, c_out)}


class Translator(nn.Sequential):
    """Three 3x3 convolutions with bias, each + LeakyReLU(0.1): ``in_channels`` -> ``out_channels`` by the
    widths of ``kind`` (:data:`TRANSLATORS`)."""

    def __init__(self, in_channels: int, out_channels: int, kind: str = "factor_transfer"):
        layers: list[nn.Module] = []
        c = in_channels
        for width in TRANSLATORS[kind](in_channels, out_channels):
            layers += [nn.Conv2d(c, width, 3, padding=1), nn.LeakyReLU(0.1)]
            c = width
        super().__init__(*layers)


def match_spatial(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


@STRATEGIES.register("feed")
class FEED(Strategy):
    name = "feed"
    options: ClassVar[dict] = {**KD_OPTIONS,
               "feed": {"beta": 500.0, "reduce": "sum", "student_tap": "prepool", "source_tap": "prepool",
                        "logit_kd": False, "translator": "factor_transfer"}}
    LOGIT_KD_KEYS = ("temperature", "lam", "lam_schedule", "lam_end", "lam_milestones", "kl_reduction")
    read_when: ClassVar[str] = "feed.logit_kd=true"

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        feed = dict(cfg.get("feed") or {})
        self.beta = float(feed.get("beta", 500.0))
        self.reduce = str(feed.get("reduce", "sum"))
        self.logit_kd = bool(feed.get("logit_kd", False))
        self.student_tap = str(feed.get("student_tap", "prepool"))
        self.source_tap = str(feed.get("source_tap", "prepool"))
        kind = str(feed.get("translator", "factor_transfer"))
        s_shape = ctx.student_feature_shapes.get(self.student_tap)
        self.translators = nn.ModuleDict()
        self._target_sizes: dict[str, tuple[int, int]] = {}
        for name in ctx.source_names:
            t_shape = ctx.source_feature_shapes.get(name, {}).get(self.source_tap)
            if s_shape is None or t_shape is None or len(s_shape) != 3 or len(t_shape) != 3:
                raise ConfigError(f"FEED needs 4-d feature maps at tap {self.student_tap!r} (student) and "
                                  f"{self.source_tap!r} (source {name!r}); got {s_shape} and {t_shape}")
            self.translators[name] = Translator(s_shape[0], t_shape[0], kind)
            self._target_sizes[name] = (t_shape[1], t_shape[2])

    @classmethod
    def own_config(cls, cfg):
        """Without ``feed.logit_kd`` the temperature and lambda are never read, so they are not hashed."""
        out = super().own_config(cfg)
        if not out["feed"]["logit_kd"]:
            for key in cls.LOGIT_KD_KEYS:
                out.pop(key)
        return out

    @classmethod
    def check(cls, cfg, where="distill") -> None:
        super().check(cfg, where)
        feed = {**cls.options["feed"], **dict(cfg.get("feed") or {})}
        if str(feed["reduce"]) not in REDUCTIONS:
            raise ConfigError(f"unknown {where}.feed.reduce {feed['reduce']!r}; known: {', '.join(REDUCTIONS)}")
        if str(feed["translator"]) not in TRANSLATORS:
            raise ConfigError(f"unknown {where}.feed.translator {feed['translator']!r}; known: "
                              f"{', '.join(TRANSLATORS)}")
        try:
            beta_ok = float(feed["beta"]) >= 0
        except (TypeError, ValueError):
            beta_ok = False
        if not beta_ok:
            raise ConfigError(f"{where}.feed.beta must be >= 0, got {feed['beta']!r}")

    @classmethod
    def taps(cls, cfg) -> tuple[list[str], list[str]]:
        feed = dict(cfg.get("feed") or {})
        return [str(feed.get("student_tap", "prepool"))], [str(feed.get("source_tap", "prepool"))]

    def student_taps(self) -> list[str]:
        return [self.student_tap]

    def source_taps(self) -> list[str]:
        return [self.source_tap]

    def loss_terms(self, student, sources, y, progress) -> LossTerms:
        ce = F.cross_entropy(student.logits, y, label_smoothing=float(self.cfg.get("label_smoothing", 0.0)))
        f_s = student.features[self.student_tap]
        per_source = [feature_l1(match_spatial(self.translators[name](f_s), self._target_sizes[name]),
                                 out.features[self.source_tap])
                      for name, out in sources.items()]
        if per_source:
            feat = torch.stack(per_source)
            feat = feat.sum() if self.reduce == "sum" else feat.mean()
        else:
            feat = ce.new_zeros(())
        terms = {"ce": ce, "feed": feat}
        weights = {"ce": 1.0, "feed": self.beta}
        if self.logit_kd:
            lam = self.lam_at(progress)
            kd = (torch.stack([kd_loss(student.logits, s.logits, self.temperature, self.kl_reduction)
                               for s in sources.values()]).mean() if sources else ce.new_zeros(()))
            terms["kd"] = kd
            weights["ce"], weights["kd"] = 1.0 - lam, lam
        return terms, weights
