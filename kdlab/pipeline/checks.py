"""Config checks that run before anything trains: bad values end with one clear line (exit status 2)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kdlab.distill import SourceSelector
from kdlab.distill.base import strategy_class
from kdlab.errors import ConfigError, unknown_name
from kdlab.models.factory import check_model_name
from kdlab.models.released import released_arch
from kdlab.pipeline import cards, protocol
from kdlab.pipeline.loggers import check_loggers
from kdlab.pipeline.runtime import sources_channels_last
from kdlab.pipeline.spec import StageSpec, build_stages, deep_merge


def _positive(value: Any, name: str, integer: bool = False) -> None:
    try:
        ok = float(value) > 0 and (not integer or float(value) == int(value))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        kind = "a positive integer" if integer else "> 0"
        raise ConfigError(f"{name} must be {kind}, got {value!r}")


def validate_distill(d: dict[str, Any], where: str = "distill") -> None:
    """The strategy named by the distill block ``d`` as given checks its own keys (kdlab/distill/<name>.py); a
    stage's checked block is its spec's (``StageSpec.strategy_cls``, :func:`validate_stages`)."""
    strategy_class(d).check(d, where)


def stage_distill_overrides(cfg: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    """{stage name: (where, its distill settings)}: ``pipeline.per_stage.<stage>.distill`` and, in a custom
    pipeline, ``pipeline.stages[i].distill``."""
    p = cfg.get("pipeline") or {}
    out = {name: (f"pipeline.per_stage.{name}.distill", dict(over.get("distill") or {}))
           for name, over in (p.get("per_stage") or {}).items() if (over or {}).get("distill")}
    if p.get("topology") == "custom":
        for i, entry in enumerate(p.get("stages") or []):
            if entry.get("distill"):
                where, given = out.get(entry.get("name"), (f"pipeline.stages[{i}].distill", {}))
                out[entry.get("name")] = (where, deep_merge(dict(entry["distill"]), given))
    return out


def validate_distill_keys(cfg: dict[str, Any], specs: list[StageSpec]) -> None:
    """A key set under ``distill`` (or for one stage) that the strategy it applies to does not read is bad input,
    named with the key probably meant (kdlab.distill.base.Strategy.unread), never silently ignored.

    ``distill``'s keys must be read by its strategy or by a stage's own (``per_stage.<stage>.distill.strategy``);
    a stage's keys by the stage's strategy (``ce`` for a stage without sources). A key a strategy reads only
    under some setting (FEED's temperature with ``feed.logit_kd``), or only in stages with sources, set away
    from its default where no stage reads it, is bad input too."""
    top = cfg.get("distill") or {}
    chosen = strategy_class(top)
    used = {s.name: s.strategy_cls for s in specs}
    for key in top:
        if not any(key in c.accepted_keys() for c in (chosen, *used.values())):
            raise ConfigError(chosen.unread(key))
    per_stage = stage_distill_overrides(cfg)
    for s in specs:
        where, given = per_stage.get(s.name, ("", {}))
        for key in given:
            if key not in used[s.name].accepted_keys():
                alone = "" if s.sources else f" (stage {s.name!r} has no sources: it learns from the labels)"
                raise ConfigError(used[s.name].unread(key, where) + alone)
    _read_somewhere(top, "distill", chosen, specs)
    for s in specs:
        where, given = per_stage.get(s.name, ("", {}))
        _read_somewhere(given, where, used[s.name], [s])


def _read_somewhere(given: dict[str, Any], where: str, strategy: type, specs: list[StageSpec]) -> None:
    """Each key of ``given`` that ``strategy`` reads only sometimes, set away from its default, is in the own
    config (what a stage reads) of one of ``specs``."""
    defaults = {**strategy.options, **strategy.late_options}
    for key, value in given.items():
        if key in defaults and not isinstance(value, dict) and value != defaults[key] \
                and not any(key in s.distill for s in specs):
            unless = (f"{strategy.name} reads it only with {where}.{strategy.read_when}" if strategy.read_when
                      and any(s.strategy_cls is strategy for s in specs)
                      else "no stage of this pipeline reads it (a stage without sources learns from the labels)")
            raise ConfigError(f"{where}.{key}={value!r} is not read: {unless}")


ON_NAN = ("stop", "rollback")


def validate_run_settings(cfg: dict[str, Any]) -> None:
    """Top-level settings checked before the stage list is built from them."""
    trainer = cfg.get("trainer") or {}
    if "max_epochs" in trainer:
        _positive(trainer["max_epochs"], "trainer.max_epochs", integer=True)
    on_nan = cfg.get("on_nan", "stop")
    if on_nan not in ON_NAN:
        raise unknown_name("on_nan", on_nan, ON_NAN)
    sources_channels_last(cfg, torch.device("cpu"))  # speed.sources_channels_last: auto | true | false
    check_loggers(cfg.get("logger"))  # before any data loads: a logger is built only when its stage starts
    ckpt = (cfg.get("pipeline") or {}).get("teacher_checkpoint")
    if ckpt is not None and not Path(str(ckpt)).is_file():
        raise ConfigError(f"pipeline.teacher_checkpoint {str(ckpt)!r} does not exist or is not a file")


def validate_taps(stage: StageSpec, specs: list[StageSpec]) -> None:
    """Feature points a strategy records (FEED's taps) must exist in the models, before anything trains."""
    from kdlab.models import resolve_point
    from kdlab.pipeline.assemble import model_from_spec

    s_taps, t_taps = stage.strategy_cls.taps(stage.distill)
    if not (s_taps or t_taps):
        return
    by_name = {s.name: s for s in specs}

    def probe(spec: StageSpec):  # the feature points do not depend on the data's shape or class count
        return model_from_spec(spec, num_classes=10, in_channels=3, input_size=32)  # (no data loaded yet)

    student = probe(stage)
    for tap in s_taps:
        resolve_point(student, tap)
    for src in {by_name[n].model["arch"]: by_name[n] for n in stage.sources}.values():
        model = probe(src)
        for tap in t_taps:
            resolve_point(model, tap)


RELEASED_HINT = ("the released teachers are mdistiller's cifar_teachers.tar (github.com/megvii-research/mdistiller/"
                 "releases/tag/checkpoints), unpacked into paths.teachers_dir")


def validate_stages(specs: list[StageSpec], cfg: dict[str, Any]) -> None:
    """Checks that need the stage list: model names, epochs, learning rates, strategies, stochastic settings."""
    validate_run_settings(cfg)
    data = cfg.get("data") or {}
    _positive(data.get("batch_size"), "data.batch_size", integer=True)
    if (cfg.get("pipeline") or {}).get("data_free") and specs and not specs[-1].strategy_cls.data_free:
        raise ConfigError(f"pipeline=data_free needs a data-free strategy for its student (distill=dafl), got "
                          f"distill.strategy={specs[-1].distill.get('strategy')!r}")
    protocol.check(cfg, specs)  # the protocol, each stage's keep (kdlab/pipeline/protocol.py)
    cards.reference_report(cfg, specs)  # protocol=reference: the recipe has a card and every field names a value
    for s in specs:
        check_model_name(s.arch)  # zoo names, generic patterns (wrn_22_8) and library models (timm/<name>)
        if isinstance(s.pretrained, str) and not Path(s.pretrained).expanduser().is_file():
            hint = f"; {RELEASED_HINT}" if released_arch(s.pretrained) else ""
            raise ConfigError(f"model.pretrained {s.pretrained!r} (stage {s.name}) does not exist or is not a file"
                              f"{hint}")
        _positive(s.max_epochs, f"trainer.max_epochs (stage {s.name})", integer=True)
        lr = s.optimizer.get("lr")
        if lr is not None:
            _positive(lr, f"optimizer.lr (stage {s.name})")
        n = s.model.get("on_the_fly_n")
        if n is not None:
            _positive(n, f"on_the_fly_n (stage {s.name})", integer=True)
        if s.sources:
            s.strategy_cls.check(s.distill, "distill")  # the strategy checks its own keys (kdlab/distill/<name>.py)
            validate_taps(s, specs)
        if s.stochastic:
            SourceSelector(s.sources, **s.stochastic, stage=s.name)


def validate_config(cfg: dict[str, Any]) -> list[StageSpec]:
    """Everything that can be checked from the config alone (no data, no models built)."""
    validate_run_settings(cfg)
    specs = build_stages(cfg)
    validate_distill_keys(cfg, specs)
    validate_stages(specs, cfg)
    top = cfg.get("distill") or {}
    if top:
        validate_distill(top)
    return specs
