"""A sweep's shared stages, known before any of its jobs runs: every job's stage keys (computed as the runner
computes them, with the real data fingerprint), the stages that two or more jobs need and the store does not hold
yet, and the waves they train in (a stage after the shared stages it learns from).

The data module is built once per distinct data config (its fingerprint is part of every key; building it loads
the data, as each job would). A job whose stages cannot be planned (a bad value that only its own job reports) is
left out: it runs as it would without a plan. :mod:`kdlab.cli.sweeps` trains the waves before the jobs start.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdlab.data import build_datamodule
from kdlab.pipeline.assemble import stage_description
from kdlab.pipeline.checks import validate_stages
from kdlab.pipeline.context import RunContext
from kdlab.pipeline.spec import build_stages
from kdlab.pipeline.view_plan import plan_views
from kdlab.store import StageStore, stage_key

log = logging.getLogger(__name__)


@dataclass
class JobStages:
    """One job's stages in training order: (name, store key, source names), and the store they go to."""

    index: int
    store_dir: str
    stages: list[tuple[str, str, list[str]]] = field(default_factory=list)
    error: str | None = None  # why the job could not be planned (it runs unplanned)


@dataclass
class SharedStage:
    """A stage two or more jobs need and the store lacks: trained once, by ``job``'s config, before the jobs."""

    key: str
    name: str  # its name in ``job``
    job: int  # the first job that needs it: its config trains it
    jobs: list[int]  # every job that needs it
    wave: int  # 0: learns from no shared stage still to train; n: after wave n - 1
    stages: list[str]  # what ``job`` runs: the stage and its sources, transitively (those come from the store)
    store_dir: str


def job_stages(cfgs: list[dict[str, Any]]) -> list[JobStages]:
    """Every job's stage keys, from its resolved config; the data module built once per distinct data config."""
    modules: dict[str, Any] = {}
    out = []
    for i, cfg in enumerate(cfgs):
        job = JobStages(index=i, store_dir=str((cfg.get("paths") or {}).get("store_dir", "")))
        try:
            specs = build_stages(cfg)
            validate_stages(specs, cfg)
            data_cfg = {k: v for k, v in cfg["data"].items() if k != "batch_size"}
            which = json.dumps([data_cfg, cfg["data"]["batch_size"]], sort_keys=True, default=str)
            if which not in modules:  # the data's fingerprint does not depend on the run's seed (data order only)
                modules[which] = build_datamodule(data_cfg, batch_size=int(cfg["data"]["batch_size"]),
                                                  seed=int(cfg["seed"]))
            ctx = RunContext(cfg=cfg, run_dir=Path("."), store=StageStore(job.store_dir, writer=False),
                             dm=modules[which], method=str(cfg.get("method")), dataset="", group="")
            ctx.view_plan = plan_views(specs, ctx)  # as the runner plans it: a top-k student's key reads it
            keys: dict[str, str] = {}
            for spec in specs:
                keys[spec.name] = stage_key(stage_description(spec, ctx, [keys[s] for s in spec.sources]))
                job.stages.append((spec.name, keys[spec.name], list(spec.sources)))
        except Exception as e:  # noqa: BLE001 - the job reports its own error when it runs
            job.stages, job.error = [], f"{type(e).__name__}: {e}".splitlines()[0]
            log.debug("job %d not planned: %s", i, job.error)
        out.append(job)
    return out


def stored(store_dir: str, key: str) -> bool:
    """Whether the store holds the stage (its completion marker; the job verifies it when it reuses it)."""
    return (Path(store_dir) / key / "DONE").exists()


def shared_stages(jobs: list[JobStages], is_stored: Callable[[str, str], bool] = stored) -> list[SharedStage]:
    """The stages (a store and a key) that two or more jobs need and ``is_stored`` says the store lacks, each
    with its wave: a shared stage's sources are needed by the same jobs, so they are shared stages too (or
    stored), and each wave's stages learn only from stored stages or earlier waves."""
    users: dict[tuple[str, str], list[int]] = {}
    for job in jobs:
        for _, key, _ in job.stages:
            users.setdefault((job.store_dir, key), [])
            if job.index not in users[(job.store_dir, key)]:
                users[(job.store_dir, key)].append(job.index)
    todo = {sk for sk, js in users.items() if len(js) >= 2 and not is_stored(*sk)}
    by_index = {job.index: job for job in jobs}
    waves: dict[tuple[str, str], int] = {}
    out = []

    def wave(store_dir: str, job: JobStages, name: str) -> int:
        names = {n: (k, srcs) for n, k, srcs in job.stages}
        key, srcs = names[name]
        if (store_dir, key) not in waves:
            deps = [wave(store_dir, job, s) for s in srcs if (store_dir, names[s][0]) in todo]
            waves[(store_dir, key)] = 1 + max(deps) if deps else 0
        return waves[(store_dir, key)]

    for (store_dir, key), js in sorted(users.items(), key=lambda kv: (kv[1][0], kv[0])):
        if (store_dir, key) not in todo:
            continue
        job = by_index[js[0]]
        names = {n: (k, srcs) for n, k, srcs in job.stages}
        name = next(n for n, k, _ in job.stages if k == key)
        closure, stack = [], [name]
        while stack:
            n = stack.pop()
            if n not in closure:
                closure.append(n)
                stack.extend(names[n][1])
        order = [n for n, _, _ in job.stages if n in closure]  # training order
        out.append(SharedStage(key=key, name=name, job=job.index, jobs=sorted(js), wave=wave(store_dir, job, name),
                               stages=order, store_dir=store_dir))
    return sorted(out, key=lambda s: (s.wave, s.job, order_in(by_index[s.job], s.name)))


def order_in(job: JobStages, name: str) -> int:
    return next(i for i, (n, _, _) in enumerate(job.stages) if n == name)


def waves(shared: list[SharedStage]) -> list[list[SharedStage]]:
    """The shared stages grouped by wave, in order: the stages of one wave are independent of each other."""
    out: list[list[SharedStage]] = []
    for s in shared:
        while len(out) <= s.wave:
            out.append([])
        out[s.wave].append(s)
    return out
