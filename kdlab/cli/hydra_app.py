"""The Hydra side of ``python -m kdlab``: config registration, the task function, the sweep summary."""
from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from kdlab import config_tree
from kdlab.cli.report import report_error
from kdlab.errors import Interrupted

CONF_DIR = str(config_tree.CONF_DIR)
STATE: dict[str, Any] = {"exit": 0, "sweep": None}  # sweep: (dir, since) once it runs
log = logging.getLogger("kdlab")


def report(message: str, code: int) -> None:
    """The one line a user sees for a failure."""
    report_error("kdlab", message)
    STATE["exit"] = max(STATE["exit"], code)


def report_interrupt(e: Interrupted) -> int:
    """A run (or sweep) stopped by SIGTERM / SIGINT: in a sweep its summary so far, then the last line of
    stderr naming the signal and the stage; returns the exit status, 128 + the signal number."""
    if not e.where and STATE.get("sweep") is not None:
        e.where = "during the sweep"  # e.g. between jobs, or waiting for joblib workers
    if STATE.get("sweep") is not None and _rank_zero():  # this process runs the sweep: its jobs so far
        sweep_dir, since = STATE["sweep"]
        STATE["sweep"] = None
        try:
            SweepStatus.summarize(sweep_dir, since)
        except Exception as err:  # noqa: BLE001 - only a summary; the interruption is what to report
            log.debug("no sweep summary: %s", err)
    if _rank_zero():  # DDP: every rank gets the signal (Lightning passes rank 0's on); one line, from rank 0
        print(f"kdlab: {e}; rerun the same command to resume", file=sys.stderr, flush=True)
    STATE["exit"] = e.exit_code
    return e.exit_code


def _rank_zero() -> bool:
    if "kdlab.store" in sys.modules:  # torch is loaded: the process group, else the environment
        from kdlab.store.ranks import is_rank_zero

        return bool(is_rank_zero())
    return all(os.environ.get(var, "0").strip() in ("", "0") for var in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def register_configs() -> None:
    """``model=<zoo name>`` for every registered architecture, without a YAML file per model, and
    ``model=timm`` / ``model=torchvision`` with ``model.name=<the library's name>`` (docs/models.md)."""
    from kdlab.models import MODELS
    from kdlab.models.library import LIBRARIES
    from kdlab.models.quant import QUANT_DEFAULTS

    def node(arch: str, **extra: Any) -> dict[str, Any]:
        # pretrained / preprocess at their defaults are dropped from the stage spec: zoo keys do not change
        return {**extra, "arch": arch, "on_the_fly": False, "on_the_fly_n": None, "on_the_fly_mode": "row",
                "kwargs": {}, "quant": dict(QUANT_DEFAULTS), "pretrained": None, "preprocess": "auto"}

    cs = ConfigStore.instance()
    for name in MODELS.names():
        cs.store(group="model", name=name, node=node(name))
    for lib in LIBRARIES:  # arch follows model.name (mandatory): model=timm model.name=resnet18
        cs.store(group="model", name=lib, node=node(f"{lib}/${{model.name}}", name="???"))


class SweepStatus(Callback):
    """After a multirun: a summary (one line, plus one per failed or interrupted job with its error) and exit
    status 1 if any job failed or was interrupted (a sweep stopped by a signal in this process exits with
    128 + the signal number instead, see :func:`report_interrupt`).

    It reads the jobs' results.json, so it works the same whichever launcher ran the jobs (in this process,
    joblib workers, submitit/SLURM). A job counts if it wrote its results.json or its ``.hydra/`` during
    this sweep (a reused ``hydra.sweep.dir`` may hold older jobs); a job dir without results.json failed
    before the pipeline started.
    """

    def __init__(self) -> None:
        self.started = 0.0

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        import time

        self.started = time.time() - 1.0  # mtime granularity
        STATE["sweep"] = (Path(str(config.hydra.sweep.dir)), self.started)

    @staticmethod
    def job_statuses(sweep_dir: Path, since: float = 0.0) -> dict[Path, tuple[str, str | None]]:
        """{job dir: (status, error)} for the jobs of a sweep written at or after ``since``."""
        import json

        def fresh(path: Path) -> bool:
            try:
                return path.stat().st_mtime >= since
            except OSError:
                return False

        jobs: dict[Path, tuple[str, str | None]] = {}
        for path in sorted(sweep_dir.glob("**/results.json")):
            if not fresh(path):
                continue
            try:
                data = json.loads(path.read_text())
                jobs[path.parent] = (str(data.get("status", "unknown")), data.get("error"))
            except (OSError, ValueError) as e:
                jobs[path.parent] = ("unreadable", f"results.json: {e}")
        for hydra_dir in sorted(sweep_dir.glob("**/.hydra")):
            job_dir = hydra_dir.parent
            if job_dir not in jobs and job_dir != sweep_dir and fresh(hydra_dir / "config.yaml"):
                jobs[job_dir] = ("failed", "no results.json (the job failed before its pipeline started)")
        return dict(sorted(jobs.items(), key=lambda kv: [(0, int(p), "") if p.isdigit() else (1, 0, p)
                                                          for p in kv[0].relative_to(sweep_dir).parts]))

    @classmethod
    def summarize(cls, sweep_dir: Path, since: float = 0.0) -> dict[Path, tuple[str, str | None]]:
        """Print the summary of a sweep's jobs; returns those not completed."""
        jobs = cls.job_statuses(sweep_dir, since)
        failed = {d: err for d, (status, err) in jobs.items() if status != "completed"}
        interrupted = sum(jobs[d][0] == "interrupted" for d in failed)
        names = ", ".join(str(d.relative_to(sweep_dir)) for d in failed)
        print(f"kdlab: sweep {sweep_dir}: {len(jobs)} job(s), {len(jobs) - len(failed)} completed, "
              f"{len(failed) - interrupted} failed" + (f", {interrupted} interrupted" if interrupted else "")
              + (f" ({names})" if failed else ""), file=sys.stderr, flush=True)
        for d, err in failed.items():
            first = (str(err).strip().splitlines() or ["-"])[0] if err else "no error recorded"
            print(f"kdlab:   job {d.relative_to(sweep_dir)} {jobs[d][0]}: {first}", file=sys.stderr, flush=True)
        return failed

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        STATE["sweep"] = None
        if self.summarize(Path(str(config.hydra.sweep.dir)), self.started):
            STATE["exit"] = 1  # whatever failed inside (config or runtime), the sweep as a whole exits 1


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def hydra_entry(cfg: DictConfig) -> float | None:
    from kdlab.errors import KdlabError

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    if multirun:  # jobs in worker processes (joblib, submitit) start without __main__'s quieting
        from kdlab.cli.logs import quiet_libraries
        from kdlab.cli.resources import for_job

        quiet_libraries()
        # threads and GPU first, before the pipeline's imports (kdlab/cli/resources.py): the job's first line
        for_job({"trainer": OmegaConf.to_container(cfg.trainer, resolve=True),
                 "sweep": OmegaConf.to_container(cfg.sweep, resolve=True) if "sweep" in cfg else {}},
                int(hc.job.num), f"job {hc.job.num}: ")
    from kdlab.pipeline.runner import run_pipeline

    run_dir = Path(hc.runtime.output_dir)
    debug = bool(cfg.get("debug")) or os.environ.get("HYDRA_FULL_ERROR") == "1"
    job = f"job {hc.job.num}: " if multirun else ""
    try:
        results = run_pipeline(cfg, run_dir, list(hc.overrides.task))
    except Interrupted as e:  # SIGTERM / SIGINT: never the next job; __main__ reports it (128 + signum)
        if multirun:
            e.where = f"{e.where or 'before the first stage'} of job {hc.job.num}"
        raise
    except KdlabError as e:
        if debug:
            traceback.print_exc()
        report(f"{job}{e}", e.exit_code)
        if not multirun:
            sys.exit(e.exit_code)
        return None  # a failed job: sweepers record it as failed (Optuna's would crash on NaN)
    except Exception as e:  # noqa: BLE001 - runtime failure: one line, traceback only in debug mode
        if debug:
            traceback.print_exc()
        report(f"{job}{type(e).__name__}: {e}".splitlines()[0] + (" (rerun with debug=true for the traceback)"
                                                                    if not debug else ""), 1)
        if not multirun:
            sys.exit(1)
        return None
    final = results["final"]
    best_on_test = final.get("test_acc_best_on_test")  # no validation split: the best test epoch, named so
    log.info("done: %s test_acc %.4f (last epoch %.4f%s); results in %s", final["stage"], final["test_acc"],
             final["test_acc_last"], "" if best_on_test is None else f", best test epoch {best_on_test:.4f}",
             run_dir / "results.json")
    if not multirun:  # the default run (`make run`): its student against the README's figure for its seed
        from kdlab.cli import expected

        line = expected.compare(results, expected.load())
        if line:
            log.info(line)
    return None if final.get("val_acc") is None else float(final["val_acc"])  # what sweepers optimize
