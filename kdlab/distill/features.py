"""Shared pieces of the feature-based methods (FitNet, AT, SP, PKT, RKD).

:class:`FeatureStrategy` is the part they have in common: the method's options live in one block named after
it (``distill.<name>``) with ``ce_weight``, ``combine`` and the feature points it reads; ``check`` rejects
unknown keys of that block; the loss is

    L = ce_weight * CE + sum_terms weight_term * combine_k loss_term(student, source k)

over the sources that teach the batch (a zero term when none does). A method supplies its block defaults,
the block key of each term's weight (``term_weights``) and :meth:`FeatureStrategy.source_losses`.

Taps left ``null`` are the layers mdistiller reads for the method in the model's family
(:data:`kdlab.models.taps.REFERENCE_TAPS`, ``reference_taps`` names the entry per tap key), resolved per stage by
:func:`resolve_taps` before the stage's store key is computed; a family without a row (plain CNNs, library
models) gets the method's ``fallback_taps``.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from kdlab.distill.base import (
    BlockStrategy,
    LossTerms,
    StrategyContext,
    check_combine,
    check_number,
    combined_terms,
)
from kdlab.errors import ConfigError
from kdlab.models.taps import reference_taps


def tap_list(where: str, value: Any, many: bool) -> list[str]:
    """A feature point (``many``: a non-empty list of them; a single name is a list of one) as a list of names."""
    items = list(value) if many and isinstance(value, Sequence) and not isinstance(value, str) else [value]
    if not items or not all(isinstance(v, str) and v for v in items):
        kind = "a non-empty list of feature points" if many else "a feature point name"
        raise ConfigError(f"{where} must be {kind} (e.g. stage2, prepool, embedding), got {value!r}")
    return items


def unique(names: list[str]) -> list[str]:
    return list(dict.fromkeys(names))


def block_tap(cls: Any, block: dict[str, Any], key: str) -> Any:
    """The block's ``key`` (a tap or a list of taps); ``null`` (not resolved for a model) is the method's fallback."""
    value = block.get(key)
    return cls.fallback_taps[key] if value is None else value


def resolve_taps(cls: Any, cfg: dict[str, Any], student_arch: str, source_archs: list[str]) -> dict[str, Any]:
    """``cfg`` with the block's taps that are ``null`` set for the stage's models: the student's key from the
    student's family, the sources' key from the sources' (which must agree), each the entry ``cls.reference_taps``
    names in :data:`kdlab.models.taps.REFERENCE_TAPS`, or ``cls.fallback_taps`` for a family without a row. Lists
    resolved on both sides are cut to the shorter, as mdistiller pairs them (``zip``)."""
    block = dict(cfg.get(cls.name) or {})
    resolved: dict[str, Any] = {}
    for key, archs in zip(cls.tap_keys, ([student_arch], source_archs)):
        if block.get(key) is not None or key not in cls.reference_taps:
            continue
        where = f"distill.{cls.name}.{key}"
        found: dict[str, Any] = {}
        for arch in archs:
            value = reference_taps(arch, cls.reference_taps[key], where)
            found[arch] = cls.fallback_taps[key] if value is None else value
        values = {repr(v): v for v in found.values()}
        if len(values) > 1:
            raise ConfigError(f"{where} is not set and the sources' reference layers differ "
                              f"({'; '.join(f'{a}: {v}' for a, v in found.items())}); set {where}")
        resolved[key] = next(iter(values.values())) if values else cls.fallback_taps[key]
    s_key, t_key = cls.tap_keys
    if cls.many_taps and s_key in resolved and t_key in resolved:
        n = min(len(resolved[s_key]), len(resolved[t_key]))
        resolved[s_key], resolved[t_key] = resolved[s_key][:n], resolved[t_key][:n]
    if not resolved:
        return cfg
    return {**cfg, cls.name: {**block, **resolved}}


def pool_to_smaller(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both maps at the smaller spatial size: the larger is adaptive-average-pooled down (mdistiller's AT)."""
    size = (min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1]))
    a = a if tuple(a.shape[-2:]) == size else F.adaptive_avg_pool2d(a, size)
    b = b if tuple(b.shape[-2:]) == size else F.adaptive_avg_pool2d(b, size)
    return a, b


def zero_loss(x: torch.Tensor) -> torch.Tensor:
    """A zero that keeps ``x`` in the graph: the relational losses' value for a batch of one sample."""
    return x.sum() * 0.0


class ConvBN(nn.Sequential):
    """A connector: conv (``kernel_size`` 1 or 3, same padding, no bias) + BatchNorm [+ ReLU]."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, relu: bool = False):
        layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2,
                                             bias=False), nn.BatchNorm2d(out_channels)]
        if relu:
            layers.append(nn.ReLU())
        super().__init__(*layers)


class FeatureStrategy(BlockStrategy):
    """A feature-based method: its block ``distill.<name>`` (``ce_weight``, ``combine``, taps, weights, ...)."""

    name = "feature"
    options: ClassVar[dict] = {"label_smoothing": 0.0}
    #: loss term (logged as ``train/loss_<term>``) -> the block key of its weight
    term_weights: ClassVar[dict[str, str]] = {}
    #: the block keys of the student's and the sources' feature points
    tap_keys: ClassVar[tuple[str, str]] = ("student_tap", "source_tap")
    #: the taps are lists (paired by position) rather than one name each
    many_taps: ClassVar[bool] = False
    #: tap key -> its entry of kdlab.models.taps.REFERENCE_TAPS (the layers when the key is null)
    reference_taps: ClassVar[dict[str, str]] = {}
    #: tap key -> the taps of a null key for a model family without reference layers
    fallback_taps: ClassVar[dict[str, Any]] = {}

    def __init__(self, cfg: dict[str, Any], ctx: StrategyContext):
        super().__init__(cfg, ctx)
        self.ce_weight = float(self.opts["ce_weight"])
        s_taps, t_taps = (tap_list("", block_tap(self, self.opts, k), self.many_taps) for k in self.tap_keys)
        #: (student tap, source tap) pairs, in the order of the options
        self.pairs: list[tuple[str, str]] = list(zip(s_taps, t_taps))

    # -- config ------------------------------------------------------------------------------------------
    @classmethod
    def check_options(cls, block: dict[str, Any], where: str) -> None:
        check_combine(where, block)
        check_number(f"{where}.ce_weight", block["ce_weight"], low=0)
        for key in cls.term_weights.values():
            check_number(f"{where}.{key}", block[key], low=0)
        s_taps, t_taps = (tap_list(f"{where}.{k}", block_tap(cls, block, k), cls.many_taps) for k in cls.tap_keys)
        if len(s_taps) != len(t_taps):
            raise ConfigError(f"{where}.{cls.tap_keys[0]} and {where}.{cls.tap_keys[1]} pair up by position and "
                              f"must have the same length, got {s_taps!r} and {t_taps!r}")
        cls.check_block(block, where)

    @classmethod
    def check_block(cls, block: dict[str, Any], where: str) -> None:
        """The method's own options (``where`` is ``distill.<name>``)."""

    # -- feature points ----------------------------------------------------------------------------------
    @classmethod
    def with_model_taps(cls, cfg: dict[str, Any], student_arch: str, source_archs: list[str]) -> dict[str, Any]:
        return resolve_taps(cls, cfg, student_arch, source_archs)

    @classmethod
    def taps(cls, cfg: dict[str, Any]) -> tuple[list[str], list[str]]:
        block = cls.block(cfg)
        s_taps, t_taps = (unique(tap_list(f"distill.{cls.name}.{k}", block_tap(cls, block, k), cls.many_taps))
                          for k in cls.tap_keys)
        return s_taps, t_taps

    def student_taps(self) -> list[str]:
        return unique([s for s, _ in self.pairs])

    def source_taps(self) -> list[str]:
        return unique([t for _, t in self.pairs])

    def require_maps(self, ctx: StrategyContext, known: bool = False) -> None:
        """Every tapped shape given in ``ctx`` (``known``: all of them must be) is a (C, H, W) map."""
        for source in ctx.source_names:
            for s_tap, t_tap in self.pairs:
                s = ctx.student_feature_shapes.get(s_tap)
                t = ctx.source_feature_shapes.get(source, {}).get(t_tap)
                bad = [x for x in (s, t) if (x is None and known) or (x is not None and len(x) != 3)]
                if bad:
                    raise ConfigError(f"{type(self).__name__} needs 4-d feature maps (C, H, W per sample) at tap "
                                      f"{s_tap!r} (student) and {t_tap!r} (source {source!r}); got {s} and {t}")

    # -- the loss ----------------------------------------------------------------------------------------
    def source_losses(self, name: str, student: dict[str, torch.Tensor], source: dict[str, torch.Tensor]
                      ) -> dict[str, torch.Tensor]:
        """Each term's loss against source ``name`` (features by tap, as recorded)."""
        raise NotImplementedError

    def loss_terms(self, student, sources, y, progress) -> LossTerms:
        ce = self.ce_loss(student.logits.float(), y)
        terms = combined_terms(ce, (self.source_losses(name, student.features, out.features)
                                    for name, out in sources.items()), self.term_weights, self.combine)
        weights = {"ce": self.ce_weight, **{term: float(self.opts[key]) for term, key in self.term_weights.items()}}
        return terms, weights
