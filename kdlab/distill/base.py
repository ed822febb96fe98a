"""The strategy contract shared by every distillation method.

A strategy is plain PyTorch. Given the student's outputs, the outputs of the sources that teach this
batch, and the labels, it returns named loss terms and their weights; the module logs every term as
``train/loss_<name>`` and optimizes the weighted sum. Strategies with trainable parts (FEED's
translators) are ``nn.Module``s whose parameters train with the student but are never exported with it.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from kdlab.distill.losses import KL_REDUCTIONS
from kdlab.distill.schedules import SCHEDULES, build_schedule
from kdlab.errors import ConfigError
from kdlab.registry import Registry

STRATEGIES = Registry("distill strategy")


@dataclass
class StudentOutput:
    logits: torch.Tensor
    features: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class SourceOutput:
    logits: torch.Tensor
    features: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class StrategyContext:
    """What a strategy may need to know about its stage when it is built."""

    stage: str
    source_names: list[str]
    num_classes: int
    student_feature_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    source_feature_shapes: dict[str, dict[str, tuple[int, ...]]] = field(default_factory=dict)


LossTerms = tuple[dict[str, torch.Tensor], dict[str, float]]


SHARED_OPTIONS: dict[str, Any] = {
    "temperature": 4.0, "lam": 0.5, "lam_schedule": "constant", "lam_end": None, "lam_milestones": [0.5],
    "kl_reduction": "batchmean", "label_smoothing": 0.0,
}
"""The logit-KD keys of ``conf/distill/kd.yaml`` that the KD-family strategies read."""


def _in_unit_interval(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= float(value) <= 1.0


class Strategy(nn.Module):
    """Base class. Subclasses set ``name`` and ``options`` and implement :meth:`loss_terms`.

    A strategy owns its config: ``options`` are the keys of ``distill`` it reads, with their defaults;
    :meth:`own_config` picks exactly those (what a stage's store key hashes, so that a key another method
    reads never retrains this one's stages) and :meth:`check` validates them before any data loads.
    """

    name = "base"
    #: True when the strategy needs source logits (False for labels-only training).
    uses_sources = True
    #: the keys of ``distill`` this strategy reads, with their defaults
    options: ClassVar[dict[str, Any]] = SHARED_OPTIONS

    def __init__(self, cfg: dict[str, Any], ctx: StrategyContext):
        super().__init__()
        self.check(cfg)
        self.cfg = cfg
        self.ctx = ctx
        self.temperature = float(cfg.get("temperature", 4.0))
        self.kl_reduction = str(cfg.get("kl_reduction", "batchmean"))
        lam_end = cfg.get("lam_end")
        self.lam_at = build_schedule(str(cfg.get("lam_schedule", "constant")), float(cfg.get("lam", 0.5)),
                                     None if lam_end is None else float(lam_end),
                                     cfg.get("lam_milestones") or (0.5,))

    # -- its config ----------------------------------------------------------------------------
    @classmethod
    def own_config(cls, cfg: dict[str, Any]) -> dict[str, Any]:
        """``{"strategy": name, key: value for every key in options}``, defaults filled in (a nested
        mapping such as ``feed`` is merged over its defaults, keeping only the keys it declares)."""
        out: dict[str, Any] = {"strategy": cls.name}
        for key, default in cls.options.items():
            value = cfg.get(key, default)
            if isinstance(default, dict):
                given = dict(value or {})
                value = {k: given.get(k, v) for k, v in default.items()}
            out[key] = copy.deepcopy(value)
        return out

    @classmethod
    def check(cls, cfg: dict[str, Any], where: str = "distill") -> None:
        """Raise a ConfigError naming the bad value and the accepted ones; runs before any data loads."""
        opts = cls.options
        if "temperature" in opts:
            t = cfg.get("temperature", opts["temperature"])
            try:
                t_ok = float(t) > 0 and not isinstance(t, bool)
            except (TypeError, ValueError):
                t_ok = False
            if not t_ok:
                raise ConfigError(f"{where}.temperature must be > 0, got {t!r}")
        for key in ("lam", "lam_end"):
            v = cfg.get(key)
            if key in opts and v is not None and not _in_unit_interval(v):
                raise ConfigError(f"{where}.{key} (lambda) must be in [0, 1], got {v!r}")
        if "lam_schedule" in opts:
            SCHEDULES.get(str(cfg.get("lam_schedule", "constant")))
        if "kl_reduction" in opts and str(cfg.get("kl_reduction", "batchmean")) not in KL_REDUCTIONS:
            raise ConfigError(f"unknown {where}.kl_reduction {cfg.get('kl_reduction')!r}; known: "
                              f"{', '.join(KL_REDUCTIONS)}")
        ls = cfg.get("label_smoothing", 0.0)
        try:
            ls_ok = 0.0 <= float(ls) < 1.0
        except (TypeError, ValueError):
            ls_ok = False
        if not ls_ok:
            raise ConfigError(f"{where}.label_smoothing must be in [0, 1), got {ls!r}")

    # -- what the stage must record -------------------------------------------------------------
    @classmethod
    def taps(cls, cfg: dict[str, Any]) -> tuple[list[str], list[str]]:
        """Feature points (student, sources) this strategy records, known before it is built."""
        return [], []

    def student_taps(self) -> list[str]:
        return []

    def source_taps(self) -> list[str]:
        return []

    def loss_terms(self, student: StudentOutput, sources: dict[str, SourceOutput], y: torch.Tensor,
                   progress: float) -> LossTerms:
        raise NotImplementedError

    def extra_parameters(self) -> int:
        """Trainable parameters that live in the strategy (discarded after training)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def strategy_class(cfg: dict[str, Any]) -> type[Strategy]:
    """The registered class of ``cfg["strategy"]`` (an unknown name is a ConfigError listing the known)."""
    return STRATEGIES.get(str(cfg.get("strategy", "kd")))


def build_strategy(cfg: dict[str, Any], ctx: StrategyContext) -> Strategy:
    return strategy_class(cfg)(cfg, ctx)
