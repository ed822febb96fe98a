"""Training (or importing) one stage, and evaluating it on the validation and test splits."""
from __future__ import annotations

import hashlib
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from lightning_fabric.utilities.exceptions import MisconfigurationException
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn

from kdlab.callbacks import progress_callbacks
from kdlab.distill import STRATEGIES, SourceSelector, build_strategy
from kdlab.distill.base import StrategyContext
from kdlab.errors import ConfigError, StoreError, TrainingError, warn
from kdlab.loggers import build_loggers, finish_loggers
from kdlab.models import build_model, feature_shapes
from kdlab.modules import DistillModule, SourceBank, SupervisedModule
from kdlab.pipeline.spec import StageSpec
from kdlab.store import StageRecord, StageStore, canonical_json, load_weights, sha256_file

log = logging.getLogger(__name__)

# Trainer arguments that do not change what a stage learns (kept out of the store key).
NON_SEMANTIC_TRAINER_KEYS = {
    "accelerator", "devices", "strategy", "num_nodes", "enable_progress_bar", "log_every_n_steps",
    "enable_model_summary", "benchmark", "default_root_dir", "max_epochs", "num_sanity_val_steps",
    "enable_checkpointing", "logger", "callbacks", "sync_batchnorm",
}


@dataclass
class RunContext:
    cfg: dict[str, Any]
    run_dir: Path
    store: StageStore
    dm: Any
    method: str
    dataset: str
    group: str


def build_stage_model(spec: StageSpec, dm: Any) -> nn.Module:
    m = spec.model
    return build_model(m["arch"], num_classes=dm.num_classes, in_channels=dm.in_channels,
                       input_size=dm.image_size, on_the_fly=bool(m.get("on_the_fly")),
                       on_the_fly_n=m.get("on_the_fly_n"), on_the_fly_mode=m.get("on_the_fly_mode", "row"),
                       **dict(m.get("kwargs") or {}))


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


def trainer_kwargs(ctx: RunContext, spec: StageSpec) -> dict[str, Any]:
    kw = {k: v for k, v in (ctx.cfg.get("trainer") or {}).items()}
    kw["max_epochs"] = spec.max_epochs
    kw["precision"] = resolve_precision(kw.get("precision", "auto"), compute_device(ctx))
    kw.setdefault("num_sanity_val_steps", 0)
    kw.setdefault("enable_model_summary", False)
    return kw


def resolve_precision(precision: Any, device: torch.device) -> Any:
    """``auto``: the fastest measured on each accelerator (benchmarks/bench_knobs.py): bf16-mixed on a GPU that
    supports bf16 and on a CPU with bf16 in hardware (AVX512-BF16 / AMX), fp32 elsewhere."""
    if str(precision) != "auto":
        return precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    # On the AMX Xeon of these machines, measured on a quiet machine: bf16-mixed 2.0-2.8x the fp32 samples/s
    # of a student stage with four live sources, 1.2-1.7x of the student alone, `make run` 96 s instead of
    # 159 s with the final student's test accuracy within 0.2 points. Without bf16 hardware it is emulated
    # (slower than fp32), so those CPUs keep fp32.
    if device.type == "cpu" and cpu_has_native_bf16():
        return "bf16-mixed"
    return "32-true"


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls/convolutions in hardware."""
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(torch.cpu, probe, None)
        try:
            if fn is not None and fn():
                return True
        except Exception:  # noqa: BLE001, S112 - a private probe that may change: then fp32 by default
            continue
    return False


def autocast_dtype(ctx: RunContext, device: torch.device) -> torch.dtype | None:
    """The autocast dtype the stage's Trainer uses (None for fp32): the cache is computed the same way."""
    precision = str(resolve_precision((ctx.cfg.get("trainer") or {}).get("precision", "auto"), device))
    if precision in ("bf16", "bf16-mixed") or (precision in ("16", "16-mixed") and device.type == "cpu"):
        return torch.bfloat16  # Lightning runs 16-mixed as bf16-mixed on a CPU
    if precision in ("16", "16-mixed"):
        return torch.float16
    return None


# -- source-output cache -----------------------------------------------------------------------------
def cache_enabled(ctx: RunContext) -> bool:
    mode = str((ctx.cfg.get("distill") or {}).get("cache", "auto"))
    if mode not in ("auto", "on", "off"):
        raise ConfigError(f"unknown distill.cache {mode!r}; known: auto, on, off")
    if mode == "off":
        return False
    if not ctx.dm.deterministic_train:
        if mode == "on":
            log.warning("distill.cache=on needs a deterministic training transform (data.augment=none); "
                        "the sources run live")
        return False
    return True


def compute_device(ctx: RunContext) -> torch.device:
    acc = str((ctx.cfg.get("trainer") or {}).get("accelerator", "auto"))
    if acc in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def source_outputs_cache(ctx: RunContext, record: StageRecord, model: nn.Module, taps: list[str]
                         ) -> dict[str, Any]:
    """Logits (and tapped features) of a frozen source for the training split, computed once, fp16.

    Computed under the same autocast as the live sources of the stage's training steps (bf16-mixed: bf16),
    so that cached and live outputs agree; the autocast dtype is part of the cache's key."""
    device = compute_device(ctx)
    dtype = autocast_dtype(ctx, device)
    ident = {"data": ctx.dm.fingerprint(), "taps": sorted(taps), **({"autocast": str(dtype)} if dtype else {})}
    data_key = hashlib.sha256(canonical_json(ident).encode()).hexdigest()[:16]
    cached = ctx.store.load_cache(record.key, data_key)
    if cached is not None:
        return cached
    from kdlab.models import FeatureTaps

    model = model.to(device).eval()
    hooks = FeatureTaps(model, taps) if taps else None
    logits, feats = [], {t: [] for t in taps}
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        for x, _, _ in ctx.dm.train_eval_dataloader():
            logits.append(model(x.to(device)).half().cpu())
            for t in taps:
                feats[t].append(hooks.features[t].half().cpu())
    if hooks is not None:
        hooks.remove()
    payload = {"logits": torch.cat(logits), "features": {t: torch.cat(v) for t, v in feats.items()}}
    ctx.store.save_cache(record.key, data_key, payload)
    return payload


# -- training ----------------------------------------------------------------------------------------
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
    if not sources:
        return SupervisedModule(model, **common)
    source_models = {name: load_source(s_spec, rec, ctx) for name, (s_spec, rec) in sources.items()}
    strategy, t_taps = stage_strategy(spec, model, source_models, ctx)
    cache = None
    if cache_enabled(ctx):
        cache = {name: source_outputs_cache(ctx, rec, source_models[name], t_taps)
                 for name, (_, rec) in sources.items()}
    bank = SourceBank(source_models, t_taps, cache, channels_last=channels_last)
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
    )
    return build_strategy(spec.distill, sctx), t_taps


def make_trainer(**kwargs: Any) -> pl.Trainer:
    """A Lightning Trainer; arguments it rejects (trainer.* settings) are a config error."""
    try:
        return pl.Trainer(**kwargs)
    except (TypeError, ValueError, ImportError, MisconfigurationException) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"invalid trainer settings: {reason}") from e


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
    if specs:
        make_trainer(**trainer_kwargs(ctx, specs[0]), logger=False, enable_checkpointing=False,
                     enable_progress_bar=False)


def resume_point(work: Path, stage: str) -> str | None:
    """The checkpoint an interrupted stage resumes from (``work/last.ckpt``), or None to start afresh.
    One that cannot be read (e.g. cut short by a full disk) is dropped with a warning."""
    last = work / "last.ckpt"
    if not last.exists():
        return None
    try:
        load_weights(last, f"checkpoint of stage {stage!r}", error=StoreError)
    except StoreError as e:
        warn(f"{e}; training stage {stage!r} from scratch")
        shutil.rmtree(work, ignore_errors=True)
        return None
    return str(last)


def _state_from_lightning(ckpt: dict[str, Any], prefix: str = "model.") -> dict[str, torch.Tensor]:
    sd = ckpt.get("state_dict", ckpt)
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def train_stage(spec: StageSpec, key: str, sources: dict[str, tuple[StageSpec, StageRecord]],
                ctx: RunContext, description: dict[str, Any], resume: str | None = "auto"
                ) -> tuple[StageRecord, dict[str, Any]]:
    """Train one stage (resuming from its last checkpoint if a previous attempt was interrupted).

    ``resume``: "auto" looks for ``work/last.ckpt``; a path or None is rank 0's decision in a DDP run.
    """
    pl.seed_everything(spec.seed, workers=True, verbose=False)
    # the stage's data order and augmentation follow from its own seed (in its key), not the run's: a stage
    # with a pinned seed trains the same whichever run trains it first
    ctx.dm.seed = spec.seed
    model = build_stage_model(spec, ctx.dm)
    params = count_params(model)
    module = build_module(spec, model, sources, ctx)
    speed = ctx.cfg.get("speed") or {}
    if speed.get("compile"):
        module.model.compile()
    work = ctx.store.work_dir(key)
    ckpt = ModelCheckpoint(dirpath=str(work), filename="best", monitor="val/acc", mode="max", save_last=True,
                           save_top_k=1, enable_version_counter=False)
    progress, bar = progress_callbacks(str((ctx.cfg.get("callbacks") or {}).get("progress", "auto"))
                                       if ctx.store.writer else "none", spec.name)  # DDP: rank 0 reports
    stage_info = {"name": spec.name, "role": spec.role, "arch": spec.arch, "method": ctx.method,
                  "dataset": ctx.dataset}
    # trainable parameters outside the exported model (FEED's translators): logged, never saved with it
    extra = module.extra_parameters() if isinstance(module, DistillModule) else 0
    wandb_config = {"stage": {**stage_info, **description, "sources": spec.sources,
                              "source_keys": description.get("sources", []), "store_key": key,
                              "params": params, "extra_params": extra},
                    "pipeline": ctx.cfg}
    loggers = build_loggers(ctx.cfg.get("logger") or {}, ctx.run_dir, stage_info, ctx.group, wandb_config) \
        if ctx.store.writer else []  # DDP: one W&B run / CSV log per stage, from rank 0
    for lg in loggers:  # W&B has them in its config; CSV / TensorBoard write them to hparams
        if type(lg).__name__ != "WandbLogger":
            lg.log_hyperparams({"params": params, "extra_params": extra})
    trainer = make_trainer(**trainer_kwargs(ctx, spec), callbacks=[ckpt, *progress], logger=loggers or False,
                           enable_progress_bar=bar, default_root_dir=str(work))
    if resume == "auto":
        resume = resume_point(work, spec.name)
    if resume:
        log.info("stage %s: resuming from %s", spec.name, resume)
    t0 = time.perf_counter()
    status = "failed"
    try:
        try:
            trainer.fit(module, datamodule=ctx.dm, ckpt_path=resume, weights_only=True)
        except OSError as e:  # e.g. a full disk while writing work/*.ckpt: the stage stays not done
            raise StoreError(f"stage {spec.name!r}: cannot write its checkpoints to {str(work)!r}: "
                             f"{e.strerror or e}") from e
        train_seconds = time.perf_counter() - t0
        if trainer.interrupted:
            raise TrainingError(f"stage {spec.name!r} was interrupted")
        test_last = float(trainer.test(module, datamodule=ctx.dm, verbose=False)[0]["test/acc"])
        if not ckpt.best_model_path:
            raise TrainingError(f"stage {spec.name!r}: no validation accuracy was recorded "
                                f"(is the validation split empty?)")
        best_state = _state_from_lightning(load_weights(ckpt.best_model_path, "stage checkpoint", error=StoreError))
        trainer.strategy.barrier("kdlab-best-read")  # DDP: every rank has read it before rank 0 drops work/
        curve = list(module.val_curve)
        if curve and max(range(len(curve)), key=lambda i: (curve[i], -i)) == len(curve) - 1:
            test_best = test_last  # the best epoch is the last one: same weights, no second test pass
        else:
            module.model.load_state_dict(best_state)
            test_best = float(trainer.test(module, datamodule=ctx.dm, verbose=False)[0]["test/acc"])
        status = "success"
    finally:
        finish_loggers(loggers, status)
        if isinstance(module, DistillModule):
            module.bank.close()
    curve = list(module.val_curve)
    best_epoch = int(max(range(len(curve)), key=lambda i: (curve[i], -i))) if curve else None
    meta = {
        "name": spec.name, "role": spec.role, "arch": spec.arch, "model": spec.model, "sources": spec.sources,
        "params": params, "extra_params": extra, "epochs": spec.max_epochs, "best_epoch": best_epoch,
        "val_acc": float(ckpt.best_model_score) if ckpt.best_model_score is not None else None,
        "test_acc": test_best, "test_acc_last": test_last, "train_seconds": round(train_seconds, 3),
        "samples_per_second": round(module.samples_seen / train_seconds, 1) if train_seconds > 0 else None,
        "val_curve": curve, "description": description,
    }
    record = ctx.store.commit(key, best_state, meta)
    csv_log = ctx.run_dir / "csv" / spec.name / "metrics.csv"
    return record, {"csv_log": str(csv_log) if csv_log.exists() else None}


def import_checkpoint(spec: StageSpec, key: str, ctx: RunContext, description: dict[str, Any]) -> StageRecord:
    """A teacher given as ``pipeline.teacher_checkpoint``: loaded safely, checked, evaluated once, stored."""
    path = Path(str(spec.checkpoint))
    raw = load_weights(path, "teacher checkpoint")
    if not isinstance(raw, dict):
        raise ConfigError(f"teacher checkpoint {str(path)!r} is not a state_dict")
    state = _state_from_lightning(raw) if "state_dict" in raw else raw
    model = build_stage_model(spec, ctx.dm)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ConfigError(f"teacher checkpoint {str(path)!r} does not match architecture {spec.arch!r}: "
                          f"{len(missing)} missing keys (e.g. {missing[:2]}), {len(unexpected)} unexpected "
                          f"keys (e.g. {unexpected[:2]})")
    classifier = [k for k, v in expected.items() if v.ndim == 2][-1:]  # the last Linear's weight
    for name in classifier:
        if state[name].shape[0] != expected[name].shape[0]:
            raise ConfigError(f"teacher checkpoint {str(path)!r} has {state[name].shape[0]} classes; the data set "
                              f"has {ctx.dm.num_classes}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ConfigError(f"teacher checkpoint {str(path)!r} does not match architecture {spec.arch!r}: "
                              f"{name} has shape {tuple(tensor.shape)}, expected {tuple(expected[name].shape)}")
    model.load_state_dict(state)
    module = build_module(spec, model, {}, ctx)
    trainer = make_trainer(**{**trainer_kwargs(ctx, spec), "max_epochs": 1}, logger=False,
                           enable_progress_bar=False, enable_checkpointing=False)
    val = float(trainer.validate(module, datamodule=ctx.dm, verbose=False)[0]["val/acc"])
    test = float(trainer.test(module, datamodule=ctx.dm, verbose=False)[0]["test/acc"])
    meta = {"name": spec.name, "role": spec.role, "arch": spec.arch, "model": spec.model, "sources": [],
            "params": count_params(model), "extra_params": 0, "epochs": 0, "best_epoch": None,
            "val_acc": val, "test_acc": test, "test_acc_last": test, "train_seconds": 0.0,
            "samples_per_second": None, "val_curve": [val], "description": description,
            "imported_from": str(path)}
    return ctx.store.commit(key, model.state_dict(), meta)
