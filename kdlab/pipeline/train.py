"""Training (or importing) one stage, and evaluating it on the validation and test splits."""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, WandbLogger

from kdlab.errors import ConfigError, StoreError, TrainingError, warn
from kdlab.models.library import load_pretrained
from kdlab.models.released import accuracy_warning
from kdlab.models.weights import pretrained_state
from kdlab.modules import DistillModule
from kdlab.modules.datafree import DataFreeModule
from kdlab.pipeline.assemble import (
    build_module,
    build_stage_model,
    count_params,
    make_trainer,
    stage_data,
)
from kdlab.pipeline.callbacks import build_callbacks, has_progress_bar
from kdlab.pipeline.context import RunContext
from kdlab.pipeline.fidelity import keep_test_outputs
from kdlab.pipeline.loggers import build_loggers, finish_loggers
from kdlab.pipeline.protocol import accuracy_fields, eval_names, evaluates_on_test, fit_data, stage_keep
from kdlab.pipeline.spec import StageSpec
from kdlab.store import StageRecord
from kdlab.store.fileio import load_weights

log = logging.getLogger(__name__)


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


@dataclass
class StageOutcome:
    """What training (or importing) a stage measured: with the stage's spec and description, its ``meta.json``."""

    params: int
    val_acc: float | None
    test_acc: float
    test_acc_last: float
    val_curve: list[float] | None  # None without a validation split (its test_curve is in extra)
    epochs: int = 0
    best_epoch: int | None = None
    extra_params: int = 0
    train_seconds: float = 0.0
    samples_per_second: float | None = None
    #: per-epoch train/acc and train/loss (epoch means over the training batches, augmented as trained); None
    #: for a stage not trained here (imported) or a module that logs no train/acc (data-free)
    train_curve: list[float] | None = None
    train_loss_curve: list[float] | None = None
    #: what applies to some stages only (data_free, test_acc_best_val, val_acc_best; pretrained, imported_from)
    extra: dict[str, Any] = field(default_factory=dict)

    def meta(self, spec: StageSpec, description: dict[str, Any], stage_seconds: float) -> dict[str, Any]:
        """The stage's ``meta.json``; ``stage_seconds``: the whole stage (model and sources built, caches loaded,
        fit, test passes), not the commit."""
        return {
            "name": spec.name, "role": spec.role, "arch": spec.arch, "model": spec.model, "sources": spec.sources,
            "params": self.params, "extra_params": self.extra_params, "epochs": self.epochs,
            "best_epoch": self.best_epoch, "val_acc": self.val_acc, "test_acc": self.test_acc,
            "test_acc_last": self.test_acc_last, "train_seconds": self.train_seconds,
            "samples_per_second": self.samples_per_second, "val_curve": self.val_curve, "train_curve": self.train_curve,
            "train_loss_curve": self.train_loss_curve, "description": description,
            "stage_seconds": round(stage_seconds, 3), **self.extra,
        }


def commit_stage(spec: StageSpec, key: str, ctx: RunContext, description: dict[str, Any], state: dict[str, Any],
                 outcome: StageOutcome, t_stage: float, test_outputs: dict[str, torch.Tensor] | None
                 ) -> StageRecord:
    """Store a finished stage (trained or imported): its test-split outputs (for fidelity), its weights ``state``
    and its meta; ``t_stage``: when it began (``time.perf_counter()``)."""
    meta = outcome.meta(spec, description, time.perf_counter() - t_stage)
    keep_test_outputs(ctx, key, test_outputs)  # before the marker: a done stage's outputs are its weights'
    return ctx.store.commit(key, state, meta)


def best_epoch_of(curve: list[float]) -> int | None:
    """The epoch of the best validation accuracy (the first of equals), None without one."""
    return int(max(range(len(curve)), key=lambda i: (curve[i], -i))) if curve else None


def train_stage(spec: StageSpec, key: str, sources: dict[str, tuple[StageSpec, StageRecord]],
                ctx: RunContext, description: dict[str, Any], resume: str | None = "auto"
                ) -> tuple[StageRecord, dict[str, Any]]:
    """Train one stage (resuming from its last checkpoint if a previous attempt was interrupted).

    ``resume``: "auto" looks for ``work/last.ckpt``; a path or None is rank 0's decision in a DDP run.
    """
    t_stage = time.perf_counter()
    pl.seed_everything(spec.seed, workers=True, verbose=False)
    # the stage's view of the data: its data order and augmentation follow from its own seed (in its key), not
    # the run's, so a stage with a pinned seed trains the same whichever run trains it first
    data = stage_data(spec, ctx, [rec.key for _, rec in sources.values()])
    model = build_stage_model(spec, ctx.dm)
    params = count_params(model)
    module = build_module(spec, model, sources, ctx, data)
    speed = ctx.cfg.get("speed") or {}
    if speed.get("compile"):
        module.model.compile()
    work = ctx.store.work_dir(key)
    # the per-epoch evaluation: on the validation split, or on the test split without one (kdlab/pipeline/protocol.py)
    module.eval_names, on_test, keep = eval_names(data), evaluates_on_test(data), stage_keep(ctx.cfg, spec)
    ckpt = ModelCheckpoint(dirpath=str(work), filename="best", monitor=module.eval_names["acc"], mode="max",
                           save_last=True, save_top_k=1, enable_version_counter=False)
    callbacks = [ckpt, *build_callbacks(ctx.cfg.get("callbacks"))]  # progress: Lightning's bar is rank 0's
    stage_info = {"name": spec.name, "role": spec.role, "arch": spec.arch, "method": ctx.method,
                  "dataset": ctx.dataset}
    # trainable parameters outside the exported model (FEED's translators): logged, never saved with it
    data_free = isinstance(module, DataFreeModule)  # DAFL: generated images only, its generator is extra
    extra = module.extra_parameters() if isinstance(module, (DistillModule, DataFreeModule)) else 0
    wandb_config = {"stage": {**stage_info, **description, "sources": spec.sources,
                              "source_keys": description.get("sources", []), "store_key": key,
                              "params": params, "extra_params": extra},
                    "pipeline": ctx.cfg}
    loggers = build_loggers(ctx.cfg.get("logger") or {}, ctx.run_dir, stage_info, ctx.group, wandb_config) \
        if ctx.store.writer else []  # DDP: one W&B run / CSV log per stage, from rank 0
    for lg in loggers:  # W&B has them in its config; CSV / TensorBoard write them to hparams
        if not isinstance(lg, WandbLogger):
            lg.log_hyperparams({"params": params, "extra_params": extra})
    trainer = make_trainer(ctx, spec, callbacks=callbacks, logger=loggers or False,
                           enable_progress_bar=has_progress_bar(callbacks), default_root_dir=str(work))
    if resume == "auto":
        resume = resume_point(work, spec.name)
    if resume:
        log.info("stage %s: resuming from %s", spec.name, resume)
    t0 = time.perf_counter()
    status = "failed"
    try:
        try:
            fitted = fit_data(data)  # without a validation split its per-epoch evaluation reads the test split
            trainer.fit(module, datamodule=module.fit_data(fitted) if data_free else fitted, ckpt_path=resume,
                        weights_only=True)
        except OSError as e:  # e.g. a full disk while writing work/*.ckpt: the stage stays not done
            raise StoreError(f"stage {spec.name!r}: cannot write its checkpoints to {str(work)!r}: "
                             f"{e.strerror or e}") from e
        train_seconds = time.perf_counter() - t0
        if trainer.interrupted:
            raise TrainingError(f"stage {spec.name!r} was interrupted")
        test_last = float(trainer.test(module, datamodule=data, verbose=False)[0]["test/acc"])
        test_outputs = module.test_outputs  # the last epoch's; the kept best epoch's replace them below
        if not ckpt.best_model_path:
            raise TrainingError(f"stage {spec.name!r}: no per-epoch accuracy ({module.eval_names['acc']}) was "
                                f"recorded")
        best_state = _state_from_lightning(load_weights(ckpt.best_model_path, "stage checkpoint", error=StoreError))
        trainer.strategy.barrier("kdlab-best-read")  # DDP: every rank has read it before rank 0 drops work/
        # the last epoch's weights, taken before the best checkpoint's are loaded (kept with keep=last)
        last_state = {k: v.detach().cpu().clone() for k, v in module.model.state_dict().items()} \
            if keep == "last" else None
        curve = list(module.val_curve)
        if (curve and best_epoch_of(curve) == len(curve) - 1) or (on_test and keep == "last"):
            test_best = test_last  # the same weights, or (on the test split) nothing chosen: no second test pass
        else:
            module.model.load_state_dict(best_state)
            test_best = float(trainer.test(module, datamodule=data, verbose=False)[0]["test/acc"])
            if keep != "last":
                test_outputs = module.test_outputs  # those of the stored weights
        status = "success"
    finally:
        finish_loggers(loggers, status)
        if isinstance(module, DistillModule):
            module.bank.close()
        if data_free:
            module.close()
    curve = list(module.val_curve)
    val_best = float(ckpt.best_model_score) if ckpt.best_model_score is not None else None
    # what the stage reports and keeps under its protocol (kdlab/pipeline/protocol.py): best_epoch, val_acc,
    # test_acc, test_acc_last, the curve; data-free, best-on-test and kept fields as extras
    acc = accuracy_fields(curve, on_test, keep, data_free, val_best, test_best, test_last)
    outcome = StageOutcome(
        params=params, extra_params=extra, epochs=spec.max_epochs, best_epoch=acc.pop("best_epoch"),
        val_acc=acc.pop("val_acc"), test_acc=acc.pop("test_acc"), test_acc_last=acc.pop("test_acc_last"),
        train_seconds=round(train_seconds, 3),
        samples_per_second=round(module.samples_seen / train_seconds, 1) if train_seconds > 0 else None,
        val_curve=acc.pop("val_curve"), train_curve=list(module.train_curve) or None,
        train_loss_curve=list(module.train_loss_curve) or None, extra=acc)
    record = commit_stage(spec, key, ctx, description, last_state if keep == "last" else best_state, outcome,
                          t_stage, test_outputs)
    csv_log = next((Path(lg.log_dir) / "metrics.csv" for lg in loggers if isinstance(lg, CSVLogger)), None)
    return record, {"csv_log": str(csv_log) if csv_log is not None and csv_log.exists() else None}


def import_checkpoint(spec: StageSpec, key: str, ctx: RunContext, description: dict[str, Any]) -> StageRecord:
    """A teacher given as ``pipeline.teacher_checkpoint``: loaded safely, checked, evaluated once, stored."""
    path = Path(str(spec.checkpoint))
    raw = load_weights(path, "teacher checkpoint")
    if not isinstance(raw, dict):
        raise ConfigError(f"teacher checkpoint {str(path)!r} is not a state_dict")
    state = _state_from_lightning(raw) if "state_dict" in raw else raw
    model = build_stage_model(spec, ctx.dm)
    load_pretrained(model, state, spec.arch, str(path), ctx.dm.num_classes, what="teacher checkpoint")
    return evaluate_and_commit(spec, key, ctx, description, model, {"imported_from": str(path)})


def import_pretrained(spec: StageSpec, key: str, ctx: RunContext, description: dict[str, Any]) -> StageRecord:
    """A stage with ``model.pretrained`` (true: the library's weights; a path: a local weights file): built,
    loaded (checked key by key), evaluated once and stored under the hash of its weights; never trained."""
    state, _, where = pretrained_state(spec.arch, spec.pretrained, ctx.dm.in_channels)
    model = build_stage_model(spec, ctx.dm)
    load_pretrained(model, state, spec.arch, where, ctx.dm.num_classes)
    record = evaluate_and_commit(spec, key, ctx, description, model, {"pretrained": True, "imported_from": where})
    note = accuracy_warning(spec.arch, where, record.meta["test_acc"], ctx.dm.name, ctx.dm.test_size,
                            ctx.dm.num_classes)  # a released teacher off its published accuracy
    if note:
        warn(note)
    return record


def evaluate_and_commit(spec: StageSpec, key: str, ctx: RunContext, description: dict[str, Any],
                        model: torch.nn.Module, extra_meta: dict[str, Any]) -> StageRecord:
    """An imported stage (its weights loaded into ``model``): evaluated once on val and test, stored."""
    t_stage = time.perf_counter()
    module = build_module(spec, model, {}, ctx, frozen=True)
    trainer = make_trainer(ctx, spec, max_epochs=1, logger=False, enable_progress_bar=False,
                           enable_checkpointing=False)
    val = None if evaluates_on_test(ctx.dm) else \
        float(trainer.validate(module, datamodule=ctx.dm, verbose=False)[0]["val/acc"])
    test = float(trainer.test(module, datamodule=ctx.dm, verbose=False)[0]["test/acc"])
    model.to(memory_format=torch.contiguous_format)  # stored in the default format, however it was evaluated
    outcome = StageOutcome(params=count_params(model), val_acc=val, test_acc=test, test_acc_last=test,
                           val_curve=None if val is None else [val], extra=extra_meta)
    return commit_stage(spec, key, ctx, description, model.state_dict(), outcome, t_stage, module.test_outputs)
