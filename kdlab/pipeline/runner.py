"""Walks a pipeline's stages in order: reuses finished stages from the store, trains the missing ones,
and writes the run's ``results.json``."""
from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Collection
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

import kdlab
from kdlab.data import build_datamodule
from kdlab.errors import (
    KdlabError,
    install_interrupt_handlers,
    interruption,
    restore_interrupt_handlers,
    warn,
)
from kdlab.models.quant import quant_report
from kdlab.pipeline import protocol
from kdlab.pipeline.assemble import build_stage_model, check_stages, count_params, stage_description
from kdlab.pipeline.cards import reference_report, summary_line
from kdlab.pipeline.checks import validate_stages
from kdlab.pipeline.context import RunContext
from kdlab.pipeline.environment import describe_environment
from kdlab.pipeline.fidelity import stage_fidelity
from kdlab.pipeline.lr_scaling import describe
from kdlab.pipeline.spec import StageSpec, build_stages
from kdlab.pipeline.train import import_checkpoint, import_pretrained, resume_point, train_stage
from kdlab.pipeline.view_plan import plan_views
from kdlab.store import StageRecord, StageStore, stage_key
from kdlab.store.fileio import atomic_write_json
from kdlab.store.ranks import RankSync

log = logging.getLogger(__name__)

RESULTS_SCHEMA = 1
STAGE_FIELDS = ("params", "epochs", "best_epoch", "val_acc", "test_acc", "test_acc_last", "train_seconds",
                "samples_per_second", "val_curve", "train_curve", "train_loss_curve", "extra_params", "stage_seconds")
# data-free stages (DAFL): test_acc is the last epoch's, the best-on-val epoch's numbers are labelled;
# pretrained: an imported library (or weights-file) stage, evaluated as it is, never trained; without a
# validation split (protocol=reference) the per-epoch test curve, its best epoch and accuracy (named so: chosen on
# the test split, choosing nothing else)
OPTIONAL_STAGE_FIELDS = ("data_free", "test_acc_best_val", "val_acc_best", "pretrained", "test_acc_best_on_test",
                         "best_epoch_on_test", "test_curve", "kept_epoch")


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = d
    return out


def new_results(cfg: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    return {
        "schema": RESULTS_SCHEMA, "kdlab_version": kdlab.__version__,
        "environment": describe_environment(cfg.get("trainer")),
        "experiment": cfg.get("experiment_name") or "default", "method": cfg.get("method"),
        "protocol": protocol.protocol_name(cfg), "reference": None,
        "dataset": (cfg.get("data") or {}).get("name"), "seed": cfg.get("seed"), "overrides": overrides,
        "status": "running", "stages": [], "final": None, "wall_seconds": None,
        "config": {k: v for k, v in flatten({k: cfg[k] for k in cfg if k not in ("hydra", "paths")}).items()
                   if not isinstance(v, list) or len(v) < 20},
    }


def warn_if_growing(specs: list[StageSpec], dm: Any) -> None:
    """A teacher is normally larger than its students: say so when a chain grows instead of shrinking."""
    sizes = {}
    for s in specs:
        sizes[s.name] = count_params(build_stage_model(s, dm))
    for s in specs:
        for src in s.sources:
            if sizes[src] < sizes[s.name]:
                warn(f"pipeline grows: {src} ({next(x.arch for x in specs if x.name == src)}, {sizes[src]} "
                     f"params) teaches the larger {s.name} ({s.arch}, {sizes[s.name]} params)")


def run_summary(cfg: dict[str, Any], dm: Any, specs: list[StageSpec]) -> str:
    """One line at the start of every run: the resolved data size, preset, epochs and learning rates."""
    preset = cfg.get("preset_name")
    if preset and not str(preset).startswith(str(dm.name)):
        warn(f"preset {preset} is sized for another data set than data={dm.name}; preset=none uses the "
             f"data set's own defaults")

    def per_stage(values: dict[str, Any]) -> str:
        distinct = set(map(str, values.values()))
        return str(next(iter(values.values()))) if len(distinct) == 1 else \
            ", ".join(f"{k} {v}" for k, v in values.items())

    epochs = per_stage({s.name: s.max_epochs for s in specs})
    lrs = per_stage({s.name: s.optimizer.get("lr") for s in specs})
    scaled = [s.extra["lr_scaling"] for s in specs if s.extra.get("lr_scaling")]  # optimizer.lr_scaling
    scaling = f"; {describe(scaled[-1])}" if scaled else ""
    return (f"data {dm.name}: {dm.train_size:,} train / {dm.val_size:,} val / {dm.test_size:,} test images "
            f"(preset {preset or 'none'}), batch {dm.batch_size}; {len(specs)} stage(s) "
            f"({', '.join(s.name for s in specs)}): epochs {epochs}, lr {lrs}{scaling}")


def stage_result(spec: StageSpec, record: StageRecord, cached: bool, extra: dict[str, Any], dm: Any
                 ) -> dict[str, Any]:
    meta = record.meta
    out = {"name": spec.name, "role": spec.role, "arch": spec.arch, "sources": spec.sources,
           "on_the_fly": bool(spec.model.get("on_the_fly")), "store_key": record.key, "cached": cached}
    out.update({k: meta.get(k) for k in STAGE_FIELDS})
    out["quant"] = spec.model.get("quant")  # the model.quant block; null for a float stage
    out.update(quant_report(build_stage_model(spec, dm)))  # weight_bits, act_bits, size_bytes at those bits
    out.update({k: meta[k] for k in OPTIONAL_STAGE_FIELDS if k in meta})  # where they apply
    out["kept"] = protocol.kept_of(meta)  # the checkpoint it stored and passed on (null: imported as it is)
    out["checkpoint"] = str(record.weights_path)
    out["csv_log"] = extra.get("csv_log")
    return out


def run_pipeline(cfg: DictConfig | dict[str, Any], run_dir: Path, overrides: list[str] | None = None, *,
                 only: Collection[str] | None = None, results_name: str = "results.json") -> dict[str, Any]:
    """Run every stage of the configured pipeline; always leaves a results.json (completed, failed or
    interrupted: SIGTERM / SIGINT raise :class:`kdlab.errors.Interrupted` while it runs).

    ``only``: just these stages (names closed under their sources; a sweep's shared stages trained before its
    jobs, :mod:`kdlab.cli.sweeps`), the record written as ``results_name``."""
    plain = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    results = new_results(plain, list(overrides or []))
    results_path = run_dir / results_name
    t0 = time.perf_counter()
    sync = RankSync()  # DDP: rank 0 decides, looks up and writes; the other ranks follow (kdlab/store/stage_store.py)
    where = "before the first stage"  # named by a SIGTERM / SIGINT (Interrupted) and in results.json
    handlers = install_interrupt_handlers()  # SIGTERM / SIGINT raise Interrupted (this process only)
    try:
        specs, ctx = start_run(plain, run_dir, results, sync)
        done: dict[str, tuple[StageSpec, StageRecord]] = {}
        for spec in specs:
            if only is not None and spec.name not in only:
                continue  # planned with the others by start_run: the same keys as the whole pipeline's
            where = f"during stage {spec.name}"
            record, entry = run_stage(spec, done, ctx, sync)
            done[spec.name] = (spec, record)
            results["stages"].append(entry)
            if sync.leader:
                atomic_write_json(results_path, results)  # progress, still status "running"
        last = results["stages"][-1]
        results["final"] = {"stage": last["name"], "test_acc": last["test_acc"],
                            "test_acc_last": last["test_acc_last"], "val_acc": last["val_acc"],
                            **{k: last[k] for k in ("test_acc_best_on_test",) if k in last}}
        results["status"] = "completed"
    except BaseException as e:  # record every failure, then let the caller report it
        stop = record_failure(results, e, where)
        if stop is None or stop is e:
            raise
        raise stop from e
    finally:
        results["wall_seconds"] = round(time.perf_counter() - t0, 3)
        try:
            if sync.leader:  # one results.json per run, from rank 0
                atomic_write_json(results_path, results)
        except OSError as write_error:
            log.error("cannot write %s: %s", results_path, write_error)
        finally:
            restore_interrupt_handlers(handlers)
    return results


def record_failure(results: dict[str, Any], e: BaseException, where: str) -> BaseException | None:
    """``results`` marked failed (or interrupted) by ``e``, raised ``where``; returns the Interrupted to raise
    for a SIGTERM / SIGINT (finished stages stay committed, the rerun resumes), else None."""
    stop = interruption(e)
    if stop is not None:
        stop.where = stop.where or where
        results["status"] = "interrupted"
        results["error"] = str(stop)
        return stop
    results["status"] = "failed"
    results["error"] = (str(e) if isinstance(e, KdlabError) else f"{type(e).__name__}: {e}").strip() or \
        type(e).__name__
    if not isinstance(e, KdlabError):
        results["traceback"] = traceback.format_exc()
    return None


def start_run(plain: dict[str, Any], run_dir: Path, results: dict[str, Any], sync: RankSync
              ) -> tuple[list[StageSpec], RunContext]:
    """Before the first stage: the checked stage specs, the store, the data loaded once (missing data fails
    here), every stage built once without training (:func:`check_stages`) and the view caches planned."""
    specs = build_stages(plain)
    validate_stages(specs, plain)
    results["reference"] = reference_report(plain, specs)  # protocol=reference: the recipe's card vs this run
    store = StageStore(plain["paths"]["store_dir"], on_corrupt=str((plain.get("store") or {})
                                                                    .get("on_corrupt", "retrain")),
                       writer=sync.leader)
    data_cfg = {k: v for k, v in plain["data"].items() if k != "batch_size"}
    dm = build_datamodule(data_cfg, batch_size=int(plain["data"]["batch_size"]), seed=int(plain["seed"]))
    results["dataset"] = getattr(dm, "name", results["dataset"])
    if sync.leader:
        log.info("%s", run_summary(plain, dm, specs))
        if results["reference"] is not None:  # changed fields: this run is not the reference run
            (warn if results["reference"]["changed"] else log.info)(summary_line(results["reference"]))
        warn_if_growing(specs, dm)
    ctx = RunContext(cfg=plain, run_dir=run_dir, store=store, dm=dm, method=str(plain.get("method")),
                     dataset=str(results["dataset"]), group=run_group(plain, run_dir))
    check_stages(specs, ctx)  # every config error surfaces before the first stage is trained
    ctx.view_plan = plan_views(specs, ctx)  # which sources teach from view caches; the disk holds them
    return specs, ctx


def run_stage(spec: StageSpec, done: dict[str, tuple[StageSpec, StageRecord]], ctx: RunContext, sync: RankSync
              ) -> tuple[StageRecord, dict[str, Any]]:
    """One stage, its sources in ``done``: its store key; then, under the key's lock, the store's copy, or the
    stage imported or trained and committed. Returns its record and its results.json entry."""
    sources = {name: done[name] for name in spec.sources}
    description = stage_description(spec, ctx, [rec.key for _, rec in sources.values()])
    key = stage_key(description)
    extra: dict[str, Any] = {}
    with ctx.store.lock(key, spec.name) as waited:  # held while training: parallel runs wait, then reuse it
        if sync.leader:
            record = ctx.store.lookup(key, spec.name)
            resume = None if record or spec.imported else resume_point(ctx.store.work_dir(key), spec.name)
            plan = sync.share({"key": key, "train": record is None, "resume": resume})
        else:
            plan = sync.receive(key, ctx.store)
            record = None if plan["train"] else ctx.store.read(key, spec.name)
        cached = record is not None
        if cached:
            log.info("stage %s (%s): reused from the store (%s)", spec.name, spec.arch, key)
        else:
            log.info("stage %s (%s): %s, store key %s", spec.name, spec.arch,
                     "importing" if spec.imported else "training", key)
            if spec.checkpoint:
                record = import_checkpoint(spec, key, ctx, description)
            elif spec.pretrained is not None:
                record = import_pretrained(spec, key, ctx, description)
            else:
                record, extra = train_stage(spec, key, sources, ctx, description, resume=plan["resume"])
    entry = {**stage_result(spec, record, cached, extra, ctx.dm), "lock_wait_seconds": round(waited.seconds, 3)}
    if sync.leader:  # agreement with its sources and teacher, KL, ECE: from stored test-split outputs
        entry.update(stage_fidelity(ctx, spec, record, done))
    return record, entry


def run_group(cfg: dict[str, Any], run_dir: Path) -> str:
    """The W&B group of a run: experiment name plus the run directory's tail (unique per run)."""
    name = cfg.get("experiment_name") or "default"
    tail = "-".join(run_dir.resolve().parts[-3:])
    return f"{name}-{tail}"


__all__ = ["build_stage_model", "run_pipeline"]
