"""The strategy contract shared by every distillation method.

A strategy is plain PyTorch. Given the student's outputs, the outputs of the sources that teach this
batch, and the labels, it returns named loss terms and their weights; the module logs every term as
``train/loss_<name>`` and optimizes the weighted sum. Strategies with trainable parts (FEED's
translators) are ``nn.Module``s whose parameters train with the student but are never exported with it.
"""
from __future__ import annotations

import copy
import difflib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
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
    #: each sample's position in the training split (CRD's memory is indexed by it); None outside training
    index: torch.Tensor | None = None


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
    #: samples in the training split (the range of ``StudentOutput.index``); 0 when unknown
    num_train: int = 0
    #: the stage's epochs (a warm-up given in epochs becomes a fraction of ``progress``)
    max_epochs: int = 1


LossTerms = tuple[dict[str, torch.Tensor], dict[str, float]]


SHARED_KEYS: tuple[str, ...] = ("strategy", "label_smoothing", "cache", "view_topk", "stochastic")
"""The keys of ``conf/distill_base.yaml``, accepted whatever the strategy: ``label_smoothing`` is read by
every stage's cross-entropy with the labels (a stage without sources, too: strategy ``ce``); the source-output
cache, its views' top-k and stochastic teaching are the pipeline's, for any method."""

KD_OPTIONS: dict[str, Any] = {
    "temperature": 4.0, "lam": 0.5, "lam_schedule": "constant", "lam_end": None, "lam_milestones": [0.5],
    "kl_reduction": "batchmean", "label_smoothing": 0.0,
}
"""The logit-KD keys (``conf/distill/kd.yaml``) and ``label_smoothing``: what ``kd``, ``dgkd`` and (with
``feed.logit_kd``) ``feed`` read."""


def check_choice(where: str, value: Any, choices: tuple[str, ...] | list[str]) -> str:
    """``value`` as a string if it is one of ``choices``, else a ConfigError listing them."""
    if str(value) not in choices:
        raise ConfigError(f"unknown {where} {value!r}; known: {', '.join(choices)}")
    return str(value)


def check_number(where: str, value: Any, low: float | None = None, high: float | None = None,
                 low_open: bool = False, integer: bool = False) -> float:
    """``value`` as a float if it is a number in [low, high] (``low_open``: (low, high]), else a ConfigError
    naming the value and the accepted range."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    if ok and integer:
        ok = float(value).is_integer()
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        lo = "" if low is None else (f"> {low:g}" if low_open else f">= {low:g}")
        hi = "" if high is None else f"<= {high:g}"
        bound = " and ".join(b for b in (lo, hi) if b)
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{where} must be {kind}{' ' + bound if bound else ''}, got {value!r}")
    return float(value)


def combine_sources(values: list[torch.Tensor], how: str) -> torch.Tensor | None:
    """One loss from the per-source losses of the sources teaching the batch: their ``sum`` (DGKD's dense
    guidance) or ``mean``; None when no source teaches it (the caller adds no term)."""
    if not values:
        return None
    total = torch.stack([v.float() for v in values]).sum()
    return total if how == "sum" else total / len(values)


COMBINE = ("mean", "sum")


def check_combine(where: str, block: Mapping[str, Any]) -> str:
    """The block's ``combine`` (how the per-source losses combine: ``mean`` or ``sum``), else a ConfigError
    naming ``<where>.combine`` and the known ways."""
    return check_choice(f"{where}.combine", block["combine"], COMBINE)


def check_flag(where: str, value: Any) -> bool:
    """``value`` if it is a boolean (YAML ``true`` / ``false``), else a ConfigError naming it."""
    if not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    return value


def check_block_keys(where: str, given: Any, known: Mapping[str, Any]) -> None:
    """A ConfigError unless the block ``where`` (``given``) is a mapping whose keys are all in ``known``
    (every unknown key named, then the known ones)."""
    if not isinstance(given, Mapping):
        raise ConfigError(f"{where} must be a mapping of options, got {given!r}")
    unknown = [k for k in given if k not in known]
    if unknown:
        raise ConfigError(f"unknown {where} key(s) {', '.join(map(repr, unknown))}; known: {', '.join(known)}")


def combined_terms(ce: torch.Tensor, per_source: Iterable[dict[str, torch.Tensor]], names: Iterable[str],
                   how: str) -> dict[str, torch.Tensor]:
    """``{"ce": ce, name: combine_sources(the name's loss of every source, how)}`` for each of ``names``, in
    order (a zero where no source teaches the batch); ``per_source``: each source's losses by name."""
    per_term: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    for losses in per_source:
        for name, value in losses.items():
            per_term[name].append(value)
    terms = {"ce": ce}
    for name, values in per_term.items():
        value = combine_sources(values, how)
        terms[name] = ce.new_zeros(()) if value is None else value
    return terms


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
    #: True for a stage that learns from generated images only (DAFL: a DataFreeModule, no training split)
    data_free = False
    #: the keys of ``distill`` this strategy reads, with their defaults
    options: ClassVar[dict[str, Any]] = {}
    #: keys added after stages were stored: hashed only when set away from their default, so that the
    #: store keys of stages trained before the key existed stay valid
    late_options: ClassVar[dict[str, Any]] = {}
    #: a key of another method that a user may set for this one -> the key of its own meant instead (dotted,
    #: under ``distill``), for the message naming a key it does not read; keys of its blocks need no entry
    hints: ClassVar[dict[str, str]] = {}
    #: the setting under which the keys of ``options`` that :meth:`own_config` drops otherwise are read (FEED's
    #: and CRD's logit-KD keys), relative to ``distill``; "" when it reads all of them always
    read_when: ClassVar[str] = ""

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
    def accepted_keys(cls) -> list[str]:
        """Every key of ``distill`` this strategy accepts: the shared ones, ``options`` and ``late_options``."""
        return list(dict.fromkeys([*SHARED_KEYS, *cls.options, *cls.late_options]))

    @classmethod
    def meant(cls, key: str) -> str | None:
        """The key of this strategy (dotted, under ``distill``) that a user who set ``key``, which it does not
        read, most likely meant: ``hints[key]``; else the key of that name in one of its blocks
        (``temperature`` -> ``dkd.temperature``); else, for a key that no strategy reads (a typo), the closest
        of its own; None when none fits."""
        if key in cls.hints:
            return cls.hints[key]
        nested = [f"{block}.{k}" for block, default in cls.options.items() if isinstance(default, dict)
                  for k in default]
        same = [k for k in nested if k.rpartition(".")[2] == key]
        if same:
            return same[0]
        if any(key in STRATEGIES.get(name).accepted_keys() for name in STRATEGIES.names()):
            return None  # another method's key: no look-alike of this one's is what the user meant
        by_leaf = {k.rpartition(".")[2]: k for k in [*nested, *cls.accepted_keys()] if k != "strategy"}
        close = difflib.get_close_matches(key, list(by_leaf), n=1)
        return by_leaf[close[0]] if close else None

    @classmethod
    def unread(cls, key: str, where: str = "distill") -> str:
        """The one line for ``<where>.<key>``, a key this strategy does not read, naming the key meant."""
        hint = cls.meant(key)
        return f"{where}.{key} is not read by {cls.name}" + (f"; did you mean {where}.{hint}?" if hint else "")

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
        for key, default in cls.late_options.items():
            value = cfg.get(key, default)
            if value != default:
                out[key] = copy.deepcopy(value)
        return out

    @classmethod
    def check(cls, cfg: dict[str, Any], where: str = "distill") -> None:
        """Raise a ConfigError naming the bad value and the accepted ones; runs before any data loads."""
        opts = cls.options
        if "temperature" in opts:
            t = cfg.get("temperature", opts["temperature"])
            if isinstance(t, bool) or not isinstance(t, (int, float)):
                raise ConfigError(f"{where}.temperature must be a number > 0, got {t!r}, which is not a number")
            if not t > 0:
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
    def with_model_taps(cls, cfg: dict[str, Any], student_arch: str, source_archs: list[str]) -> dict[str, Any]:
        """``cfg`` with the feature points left ``null`` set for the stage's student and sources (their zoo
        families' reference layers); called per stage before :meth:`own_config`. Methods without taps: ``cfg``."""
        return cfg

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

    def ce_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of ``logits`` (in their dtype) with the labels, ``distill.label_smoothing`` applied."""
        return F.cross_entropy(logits, y, label_smoothing=float(self.cfg.get("label_smoothing", 0.0)))


class BlockStrategy(Strategy):
    """A method whose own options live in one block named after it, ``distill.<name>``, with the defaults
    ``options[name]``. :meth:`check` runs the shared checks, rejects keys the block does not declare
    (:meth:`check_keys`), then checks the block's values (:meth:`check_options`)."""

    name = "block"

    def __init__(self, cfg: dict[str, Any], ctx: StrategyContext):
        super().__init__(cfg, ctx)
        #: the block, defaults filled in
        self.opts = self.block(cfg)
        self.combine = str(self.opts["combine"])

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return cls.options[cls.name]

    @classmethod
    def block(cls, cfg: dict[str, Any]) -> dict[str, Any]:
        """The method's block, defaults filled in."""
        return {**cls.defaults(), **dict(cfg.get(cls.name) or {})}

    @classmethod
    def check(cls, cfg: dict[str, Any], where: str = "distill") -> None:
        super().check(cfg, where)
        w = f"{where}.{cls.name}"
        cls.check_keys(cfg.get(cls.name) or {}, w)
        cls.check_options(cls.block(cfg), w)

    @classmethod
    def check_keys(cls, given: Any, where: str) -> None:
        """The block ``where`` as given is a mapping of declared keys."""
        check_block_keys(where, given, cls.defaults())

    @classmethod
    def check_options(cls, block: dict[str, Any], where: str) -> None:
        """The values of the block (``where`` is ``distill.<name>``), defaults filled in."""


def strategy_class(cfg: dict[str, Any]) -> type[Strategy]:
    """The registered class of ``cfg["strategy"]`` (an unknown name is a ConfigError listing the known)."""
    if cfg.get("strategy") == "???":  # a distill config that names no strategy (conf/distill_base.yaml's)
        raise ConfigError(f"distill.strategy is not set (a distill config names its strategy); choose one: "
                          f"distill=<name>, {', '.join(STRATEGIES.names())} (ce: distill=none)")
    return STRATEGIES.get(str(cfg.get("strategy", "kd")))


def build_strategy(cfg: dict[str, Any], ctx: StrategyContext) -> Strategy:
    return strategy_class(cfg)(cfg, ctx)
