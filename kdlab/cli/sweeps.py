"""A sweep that uses the whole machine: ``SweepPlan``, a Hydra callback (``conf/hydra/default.yaml``), runs in the
launching process before the launcher starts any job and

1. **sizes the jobs** of a local parallel launcher (joblib, submitit_local): how many run at once, the cores and
   GPUs they share (:class:`kdlab.cli.resources.SweepResources`, handed to the jobs in their environment; each job
   takes its threads and GPU from it, :func:`kdlab.cli.resources.for_job`). On GPUs it keeps joblib to at most
   GPUs x ``sweep.jobs_per_gpu`` jobs at once (an explicit ``hydra.launcher.n_jobs`` above that is bad input);
2. **trains the shared stages first** (``sweep.shared_first``, default true): it composes every job's config,
   computes every job's stage keys (:mod:`kdlab.pipeline.sweep_plan`), and trains the stages that two or more
   jobs need and the store lacks, wave by wave (a stage after the shared stages it learns from; the stages of a
   wave in parallel, through the sweep's own launcher and within the same per-job limits). The jobs then find them
   in the store: none waits on a lock and none trains a stage another job needs. Under SLURM each wave is a job
   array the launching process submits and waits for before the sweep's own array is submitted.

The plan and what came of it are written to ``<sweep dir>/sweep_plan.json``; each shared stage's run (its log and
its record, ``shared.json``) to ``<sweep dir>/shared/<wave>-<stage>-<key>/``. Only the basic sweeper's jobs are
known in advance: with Optuna the jobs are sized, and their shared stages meet in the store as before.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from kdlab.cli import resources
from kdlab.errors import KdlabError, warn

log = logging.getLogger("kdlab")
PLAN_FILE = "sweep_plan.json"
SHARED_DIR = "shared"
SHARED_RECORD = "shared.json"
LAUNCHERS = {"JoblibLauncher": "joblib", "LocalLauncher": "submitit_local", "SlurmLauncher": "submitit_slurm",
             "BasicLauncher": "basic"}


def launcher_kind(config: DictConfig) -> str:
    """joblib | submitit_local | submitit_slurm | basic | other, from the launcher's ``_target_``."""
    target = str(OmegaConf.select(config, "hydra.launcher._target_", default="") or "")
    return LAUNCHERS.get(target.rsplit(".", 1)[-1], "other")


def sweep_jobs(config: DictConfig) -> list[list[list[str]]] | None:
    """The basic sweeper's batches of jobs (each job its override strings), as it will make them; None for another
    sweeper (Optuna draws its jobs as it goes)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    sweeper = config.hydra.sweeper
    if not str(sweeper.get("_target_", "")).endswith(".BasicSweeper"):
        return None
    params = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
    args = params + list(OmegaConf.to_container(config.hydra.overrides.task, resolve=False))
    parser = OverridesParser.create(config_loader=GlobalHydra.instance().hydra.config_loader)
    return BasicSweeper.split_arguments(parser.parse_overrides(args), sweeper.get("max_batch_size"))


def explicit(config: DictConfig, key: str) -> bool:
    """Whether the command line sets ``key`` (a hydra.* setting)."""
    return any(str(o).lstrip("+~").split("=", 1)[0] == key for o in config.hydra.overrides.hydra)


def job_config(config: DictConfig, overrides: list[str]) -> dict[str, Any]:
    """The resolved config (without ``hydra``) that a job with these overrides runs, composed as the launcher
    composes it."""
    from hydra.core.global_hydra import GlobalHydra

    cfg = GlobalHydra.instance().hydra.config_loader.load_sweep_config(config, list(overrides))
    return OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)


def plan_resources(config: DictConfig, kind: str, batch: int) -> resources.SweepResources | None:
    """How many jobs run at once and what they share, for a local parallel launcher; caps joblib's n_jobs at
    GPUs x jobs_per_gpu on a GPU machine (joblib's workers keep their GPU from one job to the next)."""
    if kind not in resources.LOCAL_LAUNCHERS:
        return None
    trainer = OmegaConf.to_container(config.trainer, resolve=True)
    jobs_per_gpu = int(OmegaConf.select(config, "sweep.jobs_per_gpu", default=1))
    if kind == "joblib":
        from joblib import effective_n_jobs

        gpus = resources.visible_gpus()
        n_jobs = effective_n_jobs(config.hydra.launcher.get("n_jobs"))
        limit = len(gpus) * jobs_per_gpu if gpus and not resources.own_devices(trainer) else None
        if limit is not None and n_jobs > limit:
            if explicit(config, "hydra.launcher.n_jobs"):
                resources.check_parallel(n_jobs, len(gpus), jobs_per_gpu, "hydra.launcher.n_jobs")
            with read_write(config.hydra), open_dict(config.hydra.launcher):
                config.hydra.launcher.n_jobs = n_jobs = limit  # the default (one per core) on fewer GPUs
        parallel = min(n_jobs, batch)
    else:  # submitit's local executor starts every job at once, each seeing the first gpus_per_node GPUs
        gpus = [str(i) for i in range(int(config.hydra.launcher.get("gpus_per_node") or 0))]
        parallel = batch
    cores = int(config.hydra.launcher.get("cpus_per_task") or 0) * parallel if kind == "submitit_local" else 0
    pins = Path(str(config.hydra.sweep.dir)) / ".kdlab" / "pins"
    return resources.SweepResources(launcher=kind, parallel=max(1, parallel),
                                    cores=min(cores, resources.usable_cores()) or resources.usable_cores(),
                                    gpus=gpus, user_threads=resources.user_threads(), pins=str(pins))


class SweepPlan(Callback):
    """Sizes a sweep's jobs and trains its shared stages before they start (this module's docstring)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from kdlab.cli.hydra_app import report

        os.environ.pop(resources.ENV, None)  # never an outer sweep's
        try:
            plan_sweep(config)
        except KdlabError as e:
            report(str(e), e.exit_code)
            sys.exit(e.exit_code)
        except Exception as e:  # an optimization: the jobs still run and report their own errors (a signal, an
            # Interrupted, is a BaseException and stops the sweep)
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            warn(f"sweep plan: {type(e).__name__}: {e}".splitlines()[0] + "; the jobs run without it")


def plan_sweep(config: DictConfig) -> dict[str, Any]:
    """Size the jobs, then train the shared stages (with ``sweep.shared_first``); returns the plan's record."""
    t0 = time.perf_counter()
    kind = launcher_kind(config)
    batches = sweep_jobs(config)
    jobs = [job for batch in batches for job in batch] if batches is not None else None
    batch = max(len(b) for b in batches) if batches else int(config.hydra.sweeper.get("n_jobs") or 1)
    plan = plan_resources(config, kind, batch)
    record: dict[str, Any] = {"launcher": kind, "jobs": len(jobs) if jobs is not None else None,
                              "parallel": plan.parallel if plan else (1 if kind == "basic" else None),
                              "cores": plan.cores if plan else None, "gpus": plan.gpus if plan else None,
                              "threads_per_job": None, "shared_first": False, "shared": []}
    if plan is not None:
        os.environ[resources.ENV] = plan.to_env()  # before the launcher starts any worker: they inherit it
        trainer = OmegaConf.to_container(config.trainer, resolve=True)
        jobs_per_gpu = int(OmegaConf.select(config, "sweep.jobs_per_gpu", default=1))
        a = resources.assign(plan.parallel, 0, plan.gpus, plan.cores, jobs_per_gpu, plan.user_threads,
                             resources.own_devices(trainer))
        record["threads_per_job"] = a.threads
        gpus = f", a GPU each of {len(plan.gpus)}" if a.device is not None else ""
        print(f"kdlab: sweep: {record['jobs'] or 'its'} job(s), {plan.parallel} at a time under {kind}, "
              f"{a.threads} thread(s) each{gpus}", file=sys.stderr, flush=True)
    sweep_dir = Path(str(config.hydra.sweep.dir))
    shared_first = bool(OmegaConf.select(config, "sweep.shared_first", default=True))
    if shared_first and jobs is not None and len(jobs) >= 2 and kind in ("joblib", "submitit_local",
                                                                         "submitit_slurm"):
        record["shared_first"] = True
        record["shared"] = train_shared_first(config, kind, jobs, plan, sweep_dir)
    record["seconds"] = round(time.perf_counter() - t0, 3)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / PLAN_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record


def train_shared_first(config: DictConfig, kind: str, jobs: list[list[str]],
                       plan: resources.SweepResources | None, sweep_dir: Path) -> list[dict[str, Any]]:
    """Plan every job's stages, then train the shared ones wave by wave through the sweep's launcher."""
    from kdlab.pipeline.sweep_plan import job_stages, shared_stages, waves

    t0 = time.perf_counter()
    cfgs = [job_config(config, ov) for ov in jobs]
    planned = job_stages(cfgs)
    shared = shared_stages(planned)
    skipped = [j.index for j in planned if j.error]
    note = f"; job(s) {', '.join(map(str, skipped))} not planned (they run as they are)" if skipped else ""
    if not shared:
        print(f"kdlab: sweep: no stage shared by two jobs still to train ({time.perf_counter() - t0:.1f} s to "
              f"plan){note}", file=sys.stderr, flush=True)
        return []
    steps = waves(shared)
    names = "; ".join(f"wave {i + 1}: " + ", ".join(f"{s.name} (jobs {','.join(map(str, s.jobs))})" for s in w)
                      for i, w in enumerate(steps))
    print(f"kdlab: sweep: training {len(shared)} shared stage(s) first, {len(steps)} wave(s): {names}{note}",
          file=sys.stderr, flush=True)
    out: list[dict[str, Any]] = []
    for w, wave in enumerate(steps):
        tasks = [{"cfg": cfgs[s.job], "overrides": list(jobs[s.job]), "stages": s.stages, "stage": s.name,
                  "key": s.key, "jobs": s.jobs, "wave": w, "width": len(wave), "job": s.job,
                  "run_dir": str(sweep_dir / SHARED_DIR / f"{w}-{s.name}-{s.key[:8]}")} for s in wave]
        done = run_wave(config, kind, tasks, plan)
        for task, res in zip(tasks, done):
            out.append({k: task[k] for k in ("stage", "key", "jobs", "wave", "job", "stages", "run_dir")} | res)
            if res["status"] != "completed":
                warn(f"shared stage {task['stage']} ({task['key']}): {res.get('error')}; the jobs that need it "
                     f"train it themselves")
    print(f"kdlab: sweep: shared stages done in {time.perf_counter() - t0:.1f} s; starting the jobs",
          file=sys.stderr, flush=True)
    return out


def run_wave(config: DictConfig, kind: str, tasks: list[dict[str, Any]],
             plan: resources.SweepResources | None) -> list[dict[str, Any]]:
    """One wave's stages at once, through the sweep's launcher: joblib's workers (the same pool the jobs then
    use), or a submitit job array (local processes, or SLURM), waited for."""
    if kind == "joblib":
        from hydra_plugins.hydra_joblib_launcher._core import process_joblib_cfg
        from joblib import Parallel, delayed

        params = {k: v for k, v in OmegaConf.to_container(config.hydra.launcher, resolve=True).items()
                  if k != "_target_"}
        params["backend"] = "loky"  # as Hydra's launcher: its workers are reused by the jobs
        process_joblib_cfg(params)
        if len(tasks) == 1 and plan is not None:
            # one stage: here, where the libraries are loaded, with every core; meanwhile the jobs' workers start
            # and import them (tens of seconds on a loaded machine, otherwise on the sweep's path)
            Path(plan.pins).parent.mkdir(parents=True, exist_ok=True)
            folder = Path(tempfile.mkdtemp(prefix="warm-", dir=Path(plan.pins).parent))
            sizing = {k: tasks[0]["cfg"].get(k) or {} for k in ("trainer", "sweep")}
            warm = threading.Thread(target=warm_workers, args=(params, plan.parallel, folder, sizing), daemon=True)
            warm.start()
            try:
                done = train_shared(tasks[0], here=True)
            except BaseException:
                (folder / "stop").touch()  # a signal: the workers stop waiting for each other
                raise
            warm.join()
            shutil.rmtree(folder, ignore_errors=True)
            return [done]
        return list(Parallel(**params)(delayed(train_shared)(t) for t in tasks))
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    cluster = "local" if kind == "submitit_local" else "slurm"
    params = {k: v for k, v in OmegaConf.to_container(config.hydra.launcher, resolve=True).items()
              if k != "_target_"}
    init = {"folder": params.pop("submitit_folder")}
    if "max_num_timeout" in params:
        init[f"{cluster}_max_num_timeout"] = params.pop("max_num_timeout")
    executor = submitit.AutoExecutor(cluster=cluster, **init)
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    params["name"] = f"{params.get('name') or 'kdlab'}-shared"
    executor.update_parameters(**{k if k in base else f"{cluster}_{k}": v for k, v in params.items()})
    jobs = executor.map_array(train_shared, tasks)
    out = []
    for job in jobs:
        try:
            out.append(job.result())
        except Exception as e:  # noqa: BLE001 - a lost job: the jobs that need its stage train it themselves
            out.append({"status": "failed", "error": f"{type(e).__name__}: {e}".splitlines()[0]})
    return out


def warm_workers(params: dict[str, Any], n: int, folder: Path, sizing: dict[str, Any]) -> None:
    """Start joblib's pool (the one Hydra's launcher then reuses: same arguments) and import the pipeline in ``n``
    of its workers, each held until all ``n`` have (so that no worker takes two and leaves another cold)."""
    from joblib import Parallel, delayed

    try:
        Parallel(**params)(delayed(_warm)(str(folder), n, sizing) for _ in range(n))
    except Exception as e:  # noqa: BLE001 - only a head start: the jobs import what they need themselves
        log.debug("warming joblib's workers: %s", e)


def _warm(folder: str, n: int, sizing: dict[str, Any]) -> int:
    # the worker's threads and GPU first, as a job would take them: CUDA reads CUDA_VISIBLE_DEVICES once, the first
    # time anything asks it about devices, and a library may ask when it is imported
    resources.for_job(sizing, 0, "worker: ")
    import kdlab.pipeline.runner  # noqa: F401 - torch, Lightning and the pipeline: what every job imports first

    here = Path(folder)
    (here / str(os.getpid())).touch()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (here / "stop").exists() and \
            sum(1 for p in here.iterdir() if p.name != "stop") < n:
        time.sleep(0.1)
    return os.getpid()


def train_shared(task: dict[str, Any], here: bool = False) -> dict[str, Any]:
    """In a worker (joblib) or a submitit job: size this process as a job, then run ``task['stages']`` of
    ``task['job']``'s pipeline (the shared stage, its sources from the store); returns what happened.

    ``here``: in the launching process, which only sets torch's threads for the stage (and puts them back): its
    environment (threads, CUDA_VISIBLE_DEVICES) is what the launcher's workers inherit."""
    from kdlab.cli.logs import quiet_libraries

    run_dir = Path(task["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    handlers = [logging.FileHandler(run_dir / "shared.log")] + ([] if here else [logging.StreamHandler(sys.stderr)])
    kdlab_log = logging.getLogger("kdlab")
    for h in handlers:
        h.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
        kdlab_log.addHandler(h)
    level = kdlab_log.level
    kdlab_log.setLevel(logging.INFO)
    t0 = time.perf_counter()
    out: dict[str, Any] = {"status": "failed", "error": None, "trained": [], "pid": os.getpid()}
    threads_before = None
    try:
        quiet_libraries()
        if here:
            import torch

            plan = resources.SweepResources.from_env()
            threads_before = torch.get_num_threads()
            threads = plan.user_threads or plan.cores if plan else threads_before
            torch.set_num_threads(threads)
            log.info("shared stage %s: %d thread(s), in the launching process", task["stage"], threads)
            device = None
        else:  # a worker: sized as a job before anything imports torch
            sized = resources.for_job(task["cfg"], task["job"], f"shared stage {task['stage']}: ", task["width"])
            device = sized[0].device if sized else None
        import torch

        from kdlab.pipeline.runner import run_pipeline

        try:
            results = run_pipeline(task["cfg"], run_dir, task["overrides"], only=task["stages"],
                                   results_name=SHARED_RECORD)
            out["status"] = "completed"
            out["trained"] = [s["name"] for s in results["stages"] if not s["cached"]]
        except KdlabError as e:
            out["error"] = str(e)
        except Exception as e:  # noqa: BLE001 - reported, and the jobs train it themselves
            out["error"] = f"{type(e).__name__}: {e}".splitlines()[0]
        out["threads"] = torch.get_num_threads()
        out["device"] = device
        out["in_launching_process"] = here
    finally:
        out["seconds"] = round(time.perf_counter() - t0, 3)
        for h in handlers:
            kdlab_log.removeHandler(h)
            h.close()
        kdlab_log.setLevel(level)
        if threads_before is not None:
            torch.set_num_threads(threads_before)
    return out
