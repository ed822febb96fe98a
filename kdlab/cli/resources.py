"""Per-job resources under a local parallel launcher (``hydra/launcher=joblib`` or ``submitit_local``): each job
gets ``cores / jobs at a time`` CPU threads and, on a machine with GPUs, its own GPU.

The launching process knows how many jobs run at once and what the machine has; :class:`SweepResources` carries
that to the jobs in the environment (``KDLAB_SWEEP_RESOURCES``, set by :mod:`kdlab.cli.sweeps` before any worker
starts). Each job, first thing (:func:`for_job`, called by ``hydra_entry`` before it imports the pipeline), sizes
itself with :func:`assign` and :func:`apply`: torch's intra-op threads and the OpenMP / BLAS pools, and
``CUDA_VISIBLE_DEVICES`` (read once, when CUDA starts in the process; Lightning's ``cuda:0`` is then the job's GPU).

A user's explicit setting wins: ``OMP_NUM_THREADS`` in the launching process's environment sets every job's
threads, and ``trainer.accelerator=cpu``, ``trainer.devices`` other than 1 or a DDP strategy leave the devices as
they are. Several jobs share a GPU only when asked (``sweep.jobs_per_gpu``). SLURM keeps its own placement
(``cpus_per_task``, ``gpus_per_node``): nothing here runs there.

Why a job holds a *pin* for the life of its process (GPU only): joblib's workers are reused from one job to the
next, and a process that has started CUDA keeps the GPU it started with. So each worker takes one of
``GPUs x jobs_per_gpu`` pin locks the first time it runs a job and keeps it (the kernel drops an ``fcntl`` lock
when its process exits); kdlab sizes joblib's ``n_jobs`` to at most that many (:mod:`kdlab.cli.sweeps`), so every
worker has one. A submitit_local job is its own process: a job beyond the pins waits for one to be freed.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kdlab.errors import ConfigError

log = logging.getLogger("kdlab")

ENV = "KDLAB_SWEEP_RESOURCES"
#: the thread pools a job sizes: OpenMP (torch's intra-op pool on Linux), MKL, OpenBLAS, Accelerate, numexpr
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
               "NUMEXPR_NUM_THREADS")
LOCAL_LAUNCHERS = ("joblib", "submitit_local")


@dataclass(frozen=True)
class Assignment:
    """A job's share: ``threads`` for torch and the thread pools; ``device``, the value of CUDA_VISIBLE_DEVICES
    for the job (one entry of the visible devices), or None to leave the devices as they are."""

    threads: int
    device: str | None


def at_once(parallel: int, n_gpus: int, jobs_per_gpu: int = 1) -> int:
    """How many jobs run at the same time: the launcher's parallelism, and on GPUs at most ``jobs_per_gpu`` per
    GPU (``n_gpus`` 0: no GPU, or the user placed the jobs)."""
    return min(parallel, n_gpus * jobs_per_gpu) if n_gpus else parallel


def assign(parallel: int, slot: int, gpus: list[str], cores: int, jobs_per_gpu: int = 1,
           user_threads: int | None = None, own_devices: bool = False) -> Assignment:
    """The threads and device of a job when the launcher runs ``parallel`` jobs at once; ``slot``: the job's place
    among them (on GPUs its pin, 0 .. GPUs x jobs_per_gpu - 1).

    ``gpus``: the visible CUDA devices (CUDA_VISIBLE_DEVICES entries; empty on a CPU machine); ``cores``: the CPU
    cores this process may use; ``user_threads``: the user's OMP_NUM_THREADS, which wins; ``own_devices``: the
    user chose the devices (trainer.accelerator=cpu, trainer.devices other than 1, DDP), so none is assigned.

    Threads: ``cores // jobs at once`` (:func:`at_once`), at least 1, so the jobs never ask for more threads than
    there are cores unless there are more jobs than cores. Device: round-robin over ``gpus`` by slot, so a GPU
    gets a second job only with ``jobs_per_gpu`` >= 2.
    """
    if parallel < 1:
        raise ValueError(f"parallel must be >= 1, got {parallel}")
    if int(jobs_per_gpu) != jobs_per_gpu or jobs_per_gpu < 1:
        raise ConfigError(f"sweep.jobs_per_gpu must be a positive integer, got {jobs_per_gpu!r}")
    if user_threads is not None and user_threads < 1:
        raise ConfigError(f"OMP_NUM_THREADS must be a positive integer, got {user_threads!r}")
    n_gpus = 0 if own_devices else len(gpus)
    if slot < 0 or (n_gpus and slot >= n_gpus * jobs_per_gpu):
        raise ValueError(f"slot {slot} out of range for {n_gpus} GPU(s) x {jobs_per_gpu} job(s)")
    threads = user_threads or max(1, max(1, cores) // at_once(parallel, n_gpus, jobs_per_gpu))
    return Assignment(threads=threads, device=gpus[slot % n_gpus] if n_gpus else None)


def check_parallel(n_jobs: int, n_gpus: int, jobs_per_gpu: int, setting: str) -> None:
    """An explicit number of jobs at once that would put several jobs on a GPU without ``sweep.jobs_per_gpu``."""
    if n_gpus and n_jobs > n_gpus * jobs_per_gpu:
        raise ConfigError(f"{setting}={n_jobs} runs {n_jobs} jobs at once on {n_gpus} GPU(s) with "
                          f"sweep.jobs_per_gpu={jobs_per_gpu}; set {setting}<={n_gpus * jobs_per_gpu}, or "
                          f"sweep.jobs_per_gpu={-(-n_jobs // n_gpus)} to share each GPU between that many jobs")


def check_settings(sweep: dict[str, Any], multirun: bool, given: list[str]) -> None:
    """``sweep.*`` before anything runs: a boolean ``shared_first``, a positive integer ``jobs_per_gpu``, and
    only in a multirun (``given``: the sweep.* keys on the command line; a single run would ignore them)."""
    shared = sweep.get("shared_first", True)
    if not isinstance(shared, bool):
        raise ConfigError(f"sweep.shared_first must be true or false, got {shared!r}")
    k = sweep.get("jobs_per_gpu", 1)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"sweep.jobs_per_gpu must be a positive integer, got {k!r}")
    if given and not multirun:
        raise ConfigError(f"{given[0]} applies to sweeps only (python -m kdlab -m ...): a single run has no jobs "
                          f"to size or share stages between")


def own_devices(trainer: dict[str, Any]) -> bool:
    """Whether the trainer settings place the job themselves: CPU only, several devices, chosen ids, DDP."""
    devices = trainer.get("devices", 1)
    return (str(trainer.get("accelerator", "auto")) == "cpu" or str(devices).strip() not in ("1", "None")
            or str(trainer.get("strategy") or "").startswith("ddp"))


#: jobs at a time on a CPU-only machine at most (each job holds its own copy of the data and the libraries)
MAX_CPU_JOBS = 8


def parallel_jobs(requested: int | None = None) -> int:
    """How many jobs of a sweep to run at once where the machine allows (``python -m kdlab.study`` and ``make
    bench`` use it): ``requested`` if given, else one per GPU, else one per core (at most ``MAX_CPU_JOBS``), each
    then with ``cores / jobs`` threads."""
    if requested is not None:
        if requested < 1:
            raise ConfigError(f"jobs at a time must be a positive integer, got {requested}")
        return requested
    gpus = len(visible_gpus())
    return gpus if gpus else min(usable_cores(), MAX_CPU_JOBS)


def launcher_overrides(jobs: int) -> list[str]:
    """kdlab's command-line overrides that run a sweep ``jobs`` at a time on this machine (none for one: the basic
    launcher, in the launching process)."""
    return [] if jobs <= 1 else ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={jobs}"]


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask: taskset, SLURM, containers' cpusets)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def visible_gpus() -> list[str]:
    """The CUDA devices this process sees, as CUDA_VISIBLE_DEVICES names them (indices, or UUIDs if the user
    gave those); counted without starting CUDA (torch asks NVML)."""
    import torch

    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if given is not None:
        return [d.strip() for d in given.split(",") if d.strip()][:torch.cuda.device_count()]
    return [str(i) for i in range(torch.cuda.device_count())]


def user_threads() -> int | None:
    """OMP_NUM_THREADS as the user set it (an empty value counts as unset)."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    if not value:
        return None
    try:
        n = int(value)
    except ValueError:
        raise ConfigError(f"OMP_NUM_THREADS must be a positive integer, got {value!r}") from None
    if n < 1:
        raise ConfigError(f"OMP_NUM_THREADS must be a positive integer, got {value!r}")
    return n


@dataclass(frozen=True)
class SweepResources:
    """What the launching process tells its jobs (JSON in ``KDLAB_SWEEP_RESOURCES``)."""

    launcher: str  # joblib | submitit_local
    parallel: int  # jobs the launcher runs at once
    cores: int
    gpus: list[str]  # what each job may put in CUDA_VISIBLE_DEVICES
    user_threads: int | None  # OMP_NUM_THREADS in the launching process
    pins: str  # directory of the GPU pin locks (the sweep's)

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> SweepResources | None:
        raw = os.environ.get(ENV)
        return cls(**json.loads(raw)) if raw else None

    def describe(self, a: Assignment, parallel: int | None = None) -> str:
        gpus = f", GPU {a.device}" if a.device is not None else ""
        return (f"{a.threads} thread(s){gpus} ({parallel or self.parallel} job(s) at a time under {self.launcher} on "
                f"{self.cores} core(s){f' and {len(self.gpus)} GPU(s)' if self.gpus else ''})")


_PIN: dict[str, Any] = {}  # this process's GPU pin: {"dir", "slot", "lock"}, kept until it exits


def pin_slot(pins: Path, n: int, label: str = "") -> int:
    """This process's pin among ``n`` (``pins/pin-<i>.lock``), taken once and held until the process exits; waits
    while all are held (a submitit_local job beyond the GPUs waits for one to finish)."""
    from filelock import FileLock, Timeout

    if _PIN.get("dir") == str(pins) and _PIN["slot"] < n:
        return int(_PIN["slot"])
    pins.mkdir(parents=True, exist_ok=True)
    told = False
    while True:
        for slot in range(n):
            lock = FileLock(str(pins / f"pin-{slot}.lock"))
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue
            if _PIN:
                _PIN["lock"].release()
            _PIN.update(dir=str(pins), slot=slot, lock=lock)
            return slot
        if not told:
            log.info("%swaiting for a free GPU (%d job(s) at a time)", label, n)
            told = True
        time.sleep(0.5)


def for_job(cfg: dict[str, Any], job_num: int, label: str = "", width: int | None = None
            ) -> tuple[Assignment, SweepResources] | None:
    """Size this job from the launching process's :class:`SweepResources` (None when there are none: a single
    run, the basic launcher, SLURM), apply it and log it as the job's first line. ``width``: fewer jobs than the
    launcher's parallelism run at once (a wave of shared stages), so each gets more threads."""
    plan = SweepResources.from_env()
    if plan is None:
        return None
    trainer = cfg.get("trainer") or {}
    jobs_per_gpu = (cfg.get("sweep") or {}).get("jobs_per_gpu", 1)
    mine = own_devices(trainer)
    n_gpus = 0 if mine else len(plan.gpus)
    slot = pin_slot(Path(plan.pins), at_once(plan.parallel, n_gpus, jobs_per_gpu), label) if n_gpus \
        else job_num % plan.parallel
    parallel = min(plan.parallel, width) if width else plan.parallel
    a = assign(parallel, slot, plan.gpus, plan.cores, jobs_per_gpu, plan.user_threads, mine)
    apply(a)
    log.info("%s%s", label, plan.describe(a, parallel))
    return a, plan


def apply(a: Assignment) -> None:
    """Give this process ``a``: the thread pools' variables (for anything it starts), torch's intra-op (and,
    while it can still change, inter-op) threads, and CUDA_VISIBLE_DEVICES before CUDA starts."""
    for var in THREAD_VARS:
        os.environ[var] = str(a.threads)
    if a.device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = a.device
    import torch

    if a.device is not None and torch.cuda.is_initialized():  # never with a pin: the pin keeps the process's GPU
        log.warning("CUDA started in this process before its GPU was assigned; it keeps the GPU it has")
    torch.set_num_threads(a.threads)
    try:  # only before the process's first inter-op work (a reused worker keeps its first setting)
        torch.set_num_interop_threads(a.threads)
    except RuntimeError:
        pass
