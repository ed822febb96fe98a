"""Assembling a stage from its spec: its model, description (the store key's input), Lightning module
(sources, strategy, cache), Trainer; and building every stage once before anything trains."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning_fabric.utilities.exceptions import MisconfigurationException
from torch import nn

from kdlab.callbacks import build_callbacks, has_progress_bar
from kdlab.distill import STRATEGIES, SourceSelector, build_strategy
from kdlab.distill.base import StrategyContext
from kdlab.errors import ConfigError
from kdlab.fileio import sha256_file
from kdlab.loggers import logger_entries
from kdlab.models import build_model, feature_shapes
from kdlab.modules import DistillModule, SourceBank, SupervisedModule
from kdlab.pipeline.context import RunContext
from kdlab.pipeline.runtime import compute_device, resolve_precision
from kdlab.pipeline.source_cache import (
    cache_enabled,
    cache_mode,
    require_view_space,
    source_outputs_cache,
    source_view_cache,
    view_data_key,
    view_shapes,
    views_enabled,
)
from kdlab.pipeline.spec import StageSpec
from kdlab.store import StageRecord, stage_key, view_cache_bytes

# Trainer arguments that do not change what a stage learns (kept out of the store key).
NON_SEMANTIC_TRAINER_KEYS = {
    "accelerator", "devices", "strategy", "num_nodes", "enable_progress_bar", "log_every_n_steps",
    "enable_model_summary", "benchmark", "default_root_dir", "max_epochs", "num_sanity_val_steps",
    "enable_checkpointing", "logger", "callbacks", "sync_batchnorm", "_target_",
}



def model_from_spec(spec: StageSpec, num_classes: int, in_channels: int, input_size: int) -> nn.Module:
    """The stage's model (its ``model`` entry: arch, on-the-fly settings, kwargs) for data of this shape."""
    m = spec.model
    return build_model(m["arch"], num_classes=num_classes, in_channels=in_channels, input_size=input_size,
                       on_the_fly=bool(m.get("on_the_fly")), on_the_fly_n=m.get("on_the_fly_n"),
                       on_the_fly_mode=m.get("on_the_fly_mode", "row"), **dict(m.get("kwargs") or {}))


def build_stage_model(spec: StageSpec, dm: Any) -> nn.Module:
    """The stage's model for the loaded data module ``dm`` (its class count, channels and image size)."""
    return model_from_spec(spec, dm.num_classes, dm.in_channels, dm.image_size)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def stage_description(spec: StageSpec, ctx: RunContext, source_keys: list[str]) -> dict[str, Any]:
    """Everything that determines a stage's weights; its hash is the store key."""
    cfg, dm = ctx.cfg, ctx.dm
    trainer = {k: v for k, v in (cfg.get("trainer") or {}).items() if k not in NON_SEMANTIC_TRAINER_KEYS}
    # the precision the stage really trains at (auto differs per machine), so fp32 and bf16 weights never mix
    trainer["precision"] = str(resolve_precision(trainer.get("precision", "auto"), compute_device(ctx)))
    desc: dict[str, Any] = {
        "model": spec.model, "num_classes": dm.num_classes, "in_channels": dm.in_channels,
        "input_size": dm.image_size, "data": dm.fingerprint(), "batch_size": cfg["data"]["batch_size"],
        "sources": source_keys, "distill": spec.distill, "stochastic": spec.stochastic,
        "optimizer": spec.optimizer, "scheduler": spec.scheduler, "max_epochs": spec.max_epochs,
        "seed": spec.seed, "trainer": trainer,
    }
    tcfg = cfg.get("trainer") or {}
    if str(tcfg.get("strategy") or "").startswith("ddp"):  # the global batch grows with the world size
        devices = tcfg.get("devices", 1)
        world = int(devices) if str(devices).isdigit() else str(devices)
        desc["world_size"] = [world, int(tcfg.get("num_nodes") or 1)]
    if spec.checkpoint:
        desc = {"model": spec.model, "num_classes": dm.num_classes, "in_channels": dm.in_channels,
                "input_size": dm.image_size, "data": dm.fingerprint(),
                "checkpoint_sha256": sha256_file(Path(spec.checkpoint))}
    return desc


def make_trainer(ctx: RunContext, spec: StageSpec, **runtime: Any) -> pl.Trainer:
    """The stage's Trainer, instantiated from ``trainer`` (``_target_``, default pytorch_lightning.Trainer)
    with the stage's epochs and resolved precision; ``runtime`` adds callbacks, loggers and the like.
    Arguments the Trainer rejects (trainer.* settings) are a config error."""
    node = dict(ctx.cfg.get("trainer") or {})
    node.setdefault("_target_", "pytorch_lightning.Trainer")
    node["max_epochs"] = spec.max_epochs
    node["precision"] = resolve_precision(node.get("precision", "auto"), compute_device(ctx))
    node.setdefault("num_sanity_val_steps", 0)
    node.setdefault("enable_model_summary", False)
    try:
        # _partial_: the callbacks and loggers are passed as they are (Hydra would copy them into its config)
        return instantiate(node, _partial_=True)(**runtime)
    except (TypeError, ValueError, ImportError, MisconfigurationException, InstantiationException) as e:
        cause = e.__cause__ if isinstance(e, InstantiationException) and e.__cause__ else e
        reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        raise ConfigError(f"invalid trainer settings: {reason}") from e


def load_source(spec: StageSpec, record: StageRecord, ctx: RunContext) -> nn.Module:
    model = build_stage_model(spec, ctx.dm)
    model.load_state_dict(record.state_dict())
    return model


def build_module(spec: StageSpec, model: nn.Module, sources: dict[str, tuple[StageSpec, StageRecord]],
                 ctx: RunContext) -> SupervisedModule:
    speed = ctx.cfg.get("speed") or {}
    channels_last = bool(speed.get("channels_last", False))
    common = {"num_classes": ctx.dm.num_classes, "optimizer": instantiate(spec.optimizer),
              "scheduler": instantiate(spec.scheduler) if spec.scheduler else None,
              "max_epochs": spec.max_epochs, "stage": spec.name, "channels_last": channels_last,
              "label_smoothing": float(spec.distill.get("label_smoothing", 0.0)),
              "on_nan": str(ctx.cfg.get("on_nan", "stop"))}
    ctx.dm.train_views = False  # training batches carry view ids only for a stage with view-cached sources
    if not sources:
        return SupervisedModule(model, **common)
    source_models = {name: load_source(s_spec, rec, ctx) for name, (s_spec, rec) in sources.items()}
    strategy, t_taps = stage_strategy(spec, model, source_models, ctx)
    cache = views = None
    if views_enabled(ctx):
        views = {name: source_view_cache(ctx, rec, source_models[name], t_taps) for name, (_, rec) in sources.items()}
        ctx.dm.train_views = True
    elif cache_enabled(ctx):
        cache = {name: source_outputs_cache(ctx, rec, source_models[name], t_taps)
                 for name, (_, rec) in sources.items()}
    bank = SourceBank(source_models, t_taps, cache, channels_last=channels_last, views=views)
    selector = None
    if spec.stochastic:
        selector = SourceSelector(list(sources), **spec.stochastic, seed=spec.seed, stage=spec.name)
    return DistillModule(model, sources=bank, strategy=strategy, selector=selector, **common)


def stage_strategy(spec: StageSpec, model: nn.Module, source_models: dict[str, nn.Module], ctx: RunContext
                   ) -> tuple[Any, list[str]]:
    """The stage's strategy (its feature taps resolved on the actual models) and the sources' taps."""
    shape = (ctx.dm.in_channels, ctx.dm.image_size, ctx.dm.image_size)
    s_taps, t_taps = STRATEGIES.get(str(spec.distill.get("strategy", "kd"))).taps(spec.distill)
    sctx = StrategyContext(
        stage=spec.name, source_names=list(source_models), num_classes=ctx.dm.num_classes,
        student_feature_shapes=feature_shapes(model, s_taps, shape) if s_taps else {},
        source_feature_shapes={n: feature_shapes(m, t_taps, shape) for n, m in source_models.items()}
        if t_taps else {},
        num_train=int(ctx.dm.train_size), max_epochs=int(spec.max_epochs),
    )
    return build_strategy(spec.distill, sctx), t_taps


def check_stages(specs: list[StageSpec], ctx: RunContext) -> None:
    """Build every stage's model, strategy (feature taps, translators), optimizer and Trainer once, with
    no weights and no training, so that a bad setting fails before the first stage is trained or stored."""
    by_name = {s.name: s for s in specs}
    for spec in specs:
        model = build_stage_model(spec, ctx.dm)
        for what, node in (("optimizer", spec.optimizer), ("scheduler", spec.scheduler)):
            try:
                if node:
                    instantiate(node)
            except Exception as e:
                reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise ConfigError(f"stage {spec.name!r}: bad {what} config: {reason}") from e
        if spec.sources and not spec.checkpoint:
            stage_strategy(spec, model, {n: build_stage_model(by_name[n], ctx.dm) for n in spec.sources}, ctx)
    check_views(specs, ctx)  # distill.cache=views: enumerable views, and the disk holds them
    logger_entries(ctx.cfg.get("logger"))
    callbacks = build_callbacks(ctx.cfg.get("callbacks"))
    if specs:
        make_trainer(ctx, specs[0], callbacks=callbacks, logger=False, enable_checkpointing=False,
                     enable_progress_bar=has_progress_bar(callbacks))


def check_views(specs: list[Any], ctx: RunContext) -> None:
    """Before anything trains (distill.cache=views): the data must have enumerable views, and the store's disk
    must hold the view caches still to compute (one line naming the size needed and the free space)."""
    if cache_mode(ctx) != "views":
        return
    space = require_view_space(ctx.dm)
    if not ctx.store.writer:
        return
    by_name = {s.name: s for s in specs}
    keys: dict[str, str] = {}
    needed: dict[tuple[str, str], int] = {}
    n = int(ctx.dm.train_size)
    for spec in specs:
        keys[spec.name] = stage_key(stage_description(spec, ctx, [keys[s] for s in spec.sources]))
        if not spec.sources or spec.checkpoint:
            continue
        _, taps = STRATEGIES.get(str(spec.distill.get("strategy", "kd"))).taps(spec.distill)
        data_key = view_data_key(ctx, taps)
        for src in spec.sources:
            item = (keys[src], data_key)
            if item in needed or ctx.store.has_view_cache(*item):
                continue
            shapes = view_shapes(ctx, build_stage_model(by_name[src], ctx.dm), taps)
            needed[item] = view_cache_bytes(n, space.count, shapes)
    total = sum(needed.values())
    if not total:
        return
    where = Path(ctx.store.root)
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    if total > free:
        raise ConfigError(f"distill.cache=views needs {total / 1e9:.2f} GB for {len(needed)} source view cache(s) "
                          f"({n} images x {space.count} views, fp16) but {str(ctx.store.root)!r} has "
                          f"{free / 1e9:.2f} GB free: free space, move paths.store_dir, or use distill.cache=off")
