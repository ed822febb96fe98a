"""Assembling a stage from its spec: its model, description (the store key's input), Lightning module
(sources, strategy, cache), Trainer; and building every stage once before anything trains."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning_fabric.utilities.exceptions import MisconfigurationException
from torch import nn

from kdlab.distill import SourceSelector
from kdlab.distill.base import Strategy, StrategyContext
from kdlab.errors import ConfigError
from kdlab.models import build_model, feature_shapes
from kdlab.models.library import attach_preprocess, is_library_arch
from kdlab.models.weights import pretrained_sha256
from kdlab.modules import DistillModule, SourceBank, SupervisedModule
from kdlab.modules.datafree import DataFreeModule
from kdlab.modules.selfdistill import SelfDistillModule, self_teaching_layers
from kdlab.pipeline.callbacks import build_callbacks, has_progress_bar
from kdlab.pipeline.context import RunContext
from kdlab.pipeline.loggers import logger_entries
from kdlab.pipeline.protocol import key_fields
from kdlab.pipeline.runtime import compute_device, resolve_precision, sources_channels_last
from kdlab.pipeline.source_cache import cache_enabled, source_outputs_cache, stage_view_caches, view_data_key
from kdlab.pipeline.spec import StageSpec
from kdlab.store import StageRecord
from kdlab.store.fileio import sha256_file

# Trainer arguments that do not change what a stage learns (kept out of the store key).
NON_SEMANTIC_TRAINER_KEYS = {
    "accelerator", "devices", "strategy", "num_nodes", "enable_progress_bar", "log_every_n_steps",
    "enable_model_summary", "benchmark", "default_root_dir", "max_epochs", "num_sanity_val_steps",
    "enable_checkpointing", "logger", "callbacks", "sync_batchnorm", "_target_",
}



def model_from_spec(spec: StageSpec, num_classes: int, in_channels: int, input_size: int,
                    data_stats: tuple[Any, Any] | None = None) -> nn.Module:
    """The stage's model (its ``model`` entry: arch, on-the-fly settings, kwargs) for data of this shape."""
    return model_from_entry(spec.model, num_classes, in_channels, input_size, data_stats)


def model_from_entry(m: dict[str, Any], num_classes: int, in_channels: int, input_size: int,
                     data_stats: tuple[Any, Any] | None = None) -> nn.Module:
    """A model from a stage's ``model`` entry (arch, on-the-fly settings, quant, kwargs; as a stored stage's
    meta.json holds it) for data of this shape: the one place a stage's model is built from its spec.

    Never loads weights (``model.pretrained`` is imported once, :func:`kdlab.pipeline.train.import_pretrained`).
    ``data_stats`` (the data's mean, std): with them a library model gets the input adapter of
    ``model.preprocess`` (:func:`kdlab.models.library.attach_preprocess`)."""
    kwargs = dict(m.get("kwargs") or {})
    library = is_library_arch(m["arch"])
    if library and m.get("pretrained") is not None:
        kwargs["pretrained"] = True  # built as the weights' architecture (e.g. a ViT at the weights' grid)
    model = build_model(m["arch"], num_classes=num_classes, in_channels=in_channels, input_size=input_size,
                        on_the_fly=bool(m.get("on_the_fly")), on_the_fly_n=m.get("on_the_fly_n"),
                        on_the_fly_mode=m.get("on_the_fly_mode", "row"), quant=m.get("quant"), **kwargs)
    setting = m.get("preprocess", "auto")
    # auto: only weights trained elsewhere expect another input; a model trained here learns the data's own
    if data_stats is not None and (isinstance(setting, dict) or (setting == "auto" and library
                                                                  and m.get("pretrained") is not None)):
        attach_preprocess(model, m["arch"], setting, data_stats[0], data_stats[1], input_size)
    return model


def build_stage_model(spec: StageSpec, dm: Any) -> nn.Module:
    """The stage's model for the loaded data module ``dm`` (its class count, channels, image size and
    normalization)."""
    stats = (tuple(getattr(dm, "mean", ()) or ()), tuple(getattr(dm, "std", ()) or ()))
    return model_from_spec(spec, dm.num_classes, dm.in_channels, dm.image_size, stats if stats[0] else None)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def stage_data(spec: StageSpec, ctx: RunContext, source_keys: list[str]) -> Any:
    """The stage's view of the run's data (:meth:`kdlab.data.base.KdDataModule.for_stage`): its own seed (data
    order and augmentation draws), its training augmentation (``pipeline.per_stage.<name>.augment``), and view ids
    on its training batches where a source teaches it from a view cache. ``ctx.dm`` itself is never changed."""
    return ctx.dm.for_stage(seed=spec.seed, augment=spec.augment,
                            views=teaches_from_views(spec, ctx, source_keys))


def stage_description(spec: StageSpec, ctx: RunContext, source_keys: list[str]) -> dict[str, Any]:
    """Everything that determines a stage's weights; its hash is the store key."""
    cfg, dm = ctx.cfg, ctx.dm
    data = stage_data(spec, ctx, source_keys)  # a stage with its own augmentation: its own data fingerprint
    trainer = {k: v for k, v in (cfg.get("trainer") or {}).items() if k not in NON_SEMANTIC_TRAINER_KEYS}
    # the precision the stage really trains at (auto differs per machine), so fp32 and bf16 weights never mix
    trainer["precision"] = str(resolve_precision(trainer.get("precision", "auto"), compute_device(ctx)))
    desc: dict[str, Any] = {
        "model": spec.model, "num_classes": dm.num_classes, "in_channels": dm.in_channels,
        "input_size": dm.image_size, "data": data.fingerprint(), "batch_size": cfg["data"]["batch_size"],
        "sources": source_keys, "distill": spec.distill, "stochastic": spec.stochastic,
        "optimizer": spec.optimizer, "scheduler": spec.scheduler, "max_epochs": spec.max_epochs,
        "seed": spec.seed, "trainer": trainer,
        **key_fields(cfg, spec),  # the checkpoint it keeps, where not its best-on-validation epoch (protocols)
    }
    k = (cfg.get("distill") or {}).get("view_topk")
    if k is not None and data.train_views:  # taught from top-k logits: another student
        desc["source_logits"] = f"top{k}"
    tcfg = cfg.get("trainer") or {}
    if str(tcfg.get("strategy") or "").startswith("ddp"):  # the global batch grows with the world size
        devices = tcfg.get("devices", 1)
        world = int(devices) if str(devices).isdigit() else str(devices)
        desc["world_size"] = [world, int(tcfg.get("num_nodes") or 1)]
    if spec.checkpoint:
        desc = {"model": spec.model, "num_classes": dm.num_classes, "in_channels": dm.in_channels,
                "input_size": dm.image_size, "data": dm.fingerprint(),
                "checkpoint_sha256": sha256_file(Path(spec.checkpoint))}
    elif spec.pretrained is not None:  # imported as it is: its weights and the data it is evaluated on
        desc = {"model": spec.model, "num_classes": dm.num_classes, "in_channels": dm.in_channels,
                "input_size": dm.image_size, "data": dm.fingerprint(),
                "pretrained_sha256": pretrained_sha256(spec.arch, spec.pretrained, dm.in_channels)}
    return desc


def source_taps(spec: StageSpec) -> list[str]:
    """The feature taps the stage's strategy records from its sources."""
    return list(spec.strategy_cls.taps(spec.distill)[1])


def reads_training_views(spec: StageSpec) -> bool:
    """Whether the stage's sources see its training batches (and so could teach from view caches): not for a
    stage without sources, nor for a data-free one (its sources see generated images)."""
    # a stage with its own augmentation (pipeline.per_stage.<name>.augment) is not planned on the data's views
    return bool(spec.sources) and not spec.strategy_cls.data_free and spec.augment is None


def uses_views(ctx: RunContext, source_key: str, taps: list[str]) -> bool:
    """Whether the stored source ``source_key`` teaches a stage with these taps from its view cache (the run's
    plan, :func:`kdlab.pipeline.view_plan.plan_views`)."""
    return bool(ctx.view_plan) and (source_key, view_data_key(ctx, taps)) in ctx.view_plan


def teaches_from_views(spec: StageSpec, ctx: RunContext, source_keys: list[str]) -> bool:
    """Whether some source (by its store key) teaches the stage from a view cache: then the stage's training
    batches carry the view id of each sample, and a top-k plan (``distill.view_topk``) is in its key."""
    if not reads_training_views(spec):
        return False
    taps = source_taps(spec)
    return any(uses_views(ctx, key, taps) for key in source_keys)


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
                 ctx: RunContext, data: Any = None, frozen: bool = False) -> SupervisedModule:
    """The stage's LightningModule; ``data``: the stage's view of the data (:func:`stage_data`), which a stage with
    sources needs for their caches; ``frozen``: a model that is only evaluated (an imported teacher), which runs
    in the sources' memory format (``speed.sources_channels_last``)."""
    speed = ctx.cfg.get("speed") or {}
    channels_last = bool(speed.get("channels_last", False))
    if frozen:
        channels_last = channels_last or sources_channels_last(ctx.cfg, compute_device(ctx))
    common = {"num_classes": ctx.dm.num_classes, "optimizer": instantiate(spec.optimizer),
              "scheduler": instantiate(spec.scheduler) if spec.scheduler else None,
              "max_epochs": spec.max_epochs, "stage": spec.name, "channels_last": channels_last,
              "label_smoothing": float(spec.distill.get("label_smoothing", 0.0)),
              "on_nan": str(ctx.cfg.get("on_nan", "stop"))}
    if not sources:
        if getattr(spec.strategy_cls, "self_distill", False):  # SPEQ: the network teaches itself
            return SelfDistillModule(model, strategy=stage_strategy(spec, model, {}, ctx), seed=spec.seed, **common)
        return SupervisedModule(model, **common)
    source_models = {name: load_source(s_spec, rec, ctx) for name, (s_spec, rec) in sources.items()}
    strategy = stage_strategy(spec, model, source_models, ctx)
    if strategy.data_free:  # DAFL: generated images only, so no source caches (they would read the training split)
        return DataFreeModule(model, teacher=next(iter(source_models.values())), strategy=strategy,
                              generator=strategy.make_generator((ctx.dm.in_channels, ctx.dm.image_size,
                                                                 ctx.dm.image_size)),
                              image_dir=ctx.run_dir / "generated" / spec.name, seed=spec.seed, **common)
    frozen_cl = channels_last or sources_channels_last(ctx.cfg, compute_device(ctx))
    bank = source_bank(spec, sources, source_models, ctx, data, frozen_cl)
    selector = None
    if spec.stochastic:
        selector = SourceSelector(list(sources), **spec.stochastic, seed=spec.seed, stage=spec.name)
    return DistillModule(model, sources=bank, strategy=strategy, selector=selector, **common)


def source_bank(spec: StageSpec, sources: dict[str, tuple[StageSpec, StageRecord]],
                source_models: dict[str, nn.Module], ctx: RunContext, data: Any, channels_last: bool) -> SourceBank:
    """The stage's frozen sources and where their outputs come from: the view caches of the sources the run's plan
    names (when ``data`` gives the batches' view ids), else the per-image cache of an unaugmented training split
    (``distill.cache``), else live forward passes."""
    taps = source_taps(spec)
    viewed = [name for name, (_, rec) in sources.items() if uses_views(ctx, rec.key, taps)] \
        if data.train_views else []  # the sources not in the plan (distill.cache=auto) run live
    views = stage_view_caches(ctx, {name: (sources[name][1], source_models[name]) for name in viewed}, taps) \
        if viewed else {}
    cache = None
    if not views and cache_enabled(ctx, data):
        cache = {name: source_outputs_cache(ctx, data, rec, source_models[name], taps)
                 for name, (_, rec) in sources.items()}
    return SourceBank(source_models, taps, cache, channels_last=channels_last, views=views)


def stage_strategy(spec: StageSpec, model: nn.Module, source_models: dict[str, nn.Module], ctx: RunContext
                   ) -> Strategy:
    """The stage's strategy, its feature taps resolved on ``model`` and ``source_models``: the one place a stage's
    strategy is built, by :func:`check_stages` (a check: models without weights, the instance dropped) and by
    :func:`build_module` (the one that trains). It is built again for training, not kept from the check, because
    its trainable parts (FEED's translators, CRD's embeddings, ...) draw their initial weights from the stage's
    seeded RNG, after the student and its sources are built: a kept instance would carry draws from the run's RNG
    at check time, and a stage's weights would depend on the run that trained it."""
    return spec.strategy_cls(spec.distill, stage_context(spec, model, source_models, ctx))


def stage_context(spec: StageSpec, model: nn.Module, source_models: dict[str, nn.Module], ctx: RunContext
                  ) -> StrategyContext:
    """What the stage's strategy is told when it is built: the feature shapes of its taps, the data size."""
    shape = (ctx.dm.in_channels, ctx.dm.image_size, ctx.dm.image_size)
    s_taps, t_taps = spec.strategy_cls.taps(spec.distill)
    return StrategyContext(
        stage=spec.name, source_names=list(source_models), num_classes=ctx.dm.num_classes,
        student_feature_shapes=feature_shapes(model, s_taps, shape) if s_taps else {},
        source_feature_shapes={n: feature_shapes(m, t_taps, shape) for n, m in source_models.items()}
        if t_taps else {},
        num_train=int(ctx.dm.train_size), max_epochs=int(spec.max_epochs),
    )


def check_stages(specs: list[StageSpec], ctx: RunContext) -> None:
    """Build every stage's model, strategy (feature taps, translators), optimizer and Trainer once, with
    no weights and no training, so that a bad setting fails before the first stage is trained or stored
    (the runner then plans the view caches: :func:`kdlab.pipeline.view_plan.plan_views`)."""
    by_name = {s.name: s for s in specs}
    for spec in specs:
        if spec.augment is not None:
            if spec.imported:
                raise ConfigError(f"stage {spec.name!r} is imported (evaluated, never trained), so "
                                  f"pipeline.per_stage.{spec.name}.augment does not apply to it")
            ctx.dm.check_augment(spec.augment, f"pipeline.per_stage.{spec.name}.augment")
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
        elif getattr(spec.strategy_cls, "self_distill", False):
            stage_strategy(spec, model, {}, ctx)
            self_teaching_layers(model, spec.name)  # SPEQ needs quantized activations to switch
    logger_entries(ctx.cfg.get("logger"))
    callbacks = build_callbacks(ctx.cfg.get("callbacks"))
    if specs:
        make_trainer(ctx, specs[0], callbacks=callbacks, logger=False, enable_checkpointing=False,
                     enable_progress_bar=has_progress_bar(callbacks))
