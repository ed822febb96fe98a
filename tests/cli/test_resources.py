"""Per-job resources under a local parallel launcher (kdlab/cli/resources.py): the pure assignment of threads and
GPUs for n jobs at once on m GPUs and c cores, every edge; the settings' checks; the GPU pins a process keeps; a
job sizing itself from the launching process's plan."""
from __future__ import annotations

import itertools
import threading
import time

import pytest
import torch
from filelock import FileLock

from kdlab.cli import resources
from kdlab.cli.resources import Assignment, assign, at_once, check_parallel, check_settings, own_devices
from kdlab.errors import ConfigError

GPUS8 = [str(i) for i in range(8)]


def test_no_gpu_splits_the_cores():
    assert [assign(2, s, [], 2) for s in range(2)] == [Assignment(1, None)] * 2  # this machine, 2 at a time
    assert assign(1, 0, [], 16) == Assignment(16, None)  # one job at a time keeps every core
    assert assign(4, 0, [], 16) == Assignment(4, None)
    assert assign(3, 2, [], 8) == Assignment(2, None)  # 8 // 3: never more threads than cores in total


def test_one_core_and_more_jobs_than_cores_get_one_thread_each():
    assert {assign(4, s, [], 1).threads for s in range(4)} == {1}
    assert {assign(8, s, [], 2).threads for s in range(8)} == {1}
    assert assign(2, 0, [], 0) == Assignment(1, None)  # a machine that reports no cores still gets 1


def test_one_gpu_per_job_round_robin():
    assert [assign(8, s, GPUS8, 16).device for s in range(8)] == GPUS8  # the 8-GPU node: every GPU busy
    assert {assign(8, s, GPUS8, 16).threads for s in range(8)} == {2}
    # fewer jobs than GPUs: each still one GPU, the cores split between the jobs that run
    assert [assign(2, s, GPUS8, 16) for s in range(2)] == [Assignment(8, "0"), Assignment(8, "1")]
    # the visible devices as CUDA_VISIBLE_DEVICES names them (a user's subset, or UUIDs)
    assert assign(2, 1, ["4", "6"], 4).device == "6"
    assert assign(2, 1, ["GPU-aa", "GPU-bb"], 4).device == "GPU-bb"


def test_more_jobs_than_gpus_share_a_gpu_only_when_asked():
    # 4 at a time on 2 GPUs: without jobs_per_gpu only 2 run at once (2 slots), each with a GPU of its own
    assert at_once(4, 2, 1) == 2
    assert [assign(4, s, ["0", "1"], 8).device for s in range(2)] == ["0", "1"]
    assert assign(4, 0, ["0", "1"], 8).threads == 4  # 8 cores over the 2 jobs that run
    with pytest.raises(ValueError, match="out of range"):
        assign(4, 2, ["0", "1"], 8)  # a third job on 2 GPUs would share one
    with pytest.raises(ConfigError, match=r"hydra.launcher.n_jobs=4 runs 4 jobs at once on 2 GPU\(s\).*"
                                          r"sweep.jobs_per_gpu=2"):
        check_parallel(4, 2, 1, "hydra.launcher.n_jobs")
    check_parallel(4, 2, 2, "hydra.launcher.n_jobs")  # asked for: fine
    check_parallel(8, 0, 1, "hydra.launcher.n_jobs")  # no GPU: nothing to share
    assert [assign(4, s, ["0", "1"], 8, jobs_per_gpu=2).device for s in range(4)] == ["0", "1", "0", "1"]
    assert assign(4, 3, ["0", "1"], 8, jobs_per_gpu=2).threads == 2


def test_no_gpu_gets_more_than_asked_and_the_cores_are_never_oversubscribed():
    """Every (jobs at once, GPUs, cores, jobs_per_gpu) up to small sizes, checked against the rules directly."""
    for parallel, n_gpus, cores, k in itertools.product(range(1, 7), range(4), range(1, 9), range(1, 3)):
        gpus = [str(g) for g in range(n_gpus)]
        running = min(parallel, n_gpus * k) if n_gpus else parallel
        got = [assign(parallel, s, gpus, cores, k) for s in range(running)]
        per_gpu = {g: sum(a.device == g for a in got) for g in gpus}
        assert all(n <= k for n in per_gpu.values()), (parallel, n_gpus, cores, k, got)
        if n_gpus:  # every GPU in use before any gets a second job
            assert min(per_gpu.values()) >= min(k, running // n_gpus), (parallel, n_gpus, k, got)
        else:
            assert all(a.device is None for a in got)
        threads = sum(a.threads for a in got)
        assert threads <= max(cores, running) and all(a.threads >= 1 for a in got), (parallel, cores, got)
        assert threads > cores - running, (parallel, cores, got)  # at most running - 1 cores left idle


def test_the_users_settings_win():
    assert assign(2, 0, [], 2, user_threads=4) == Assignment(4, None)  # OMP_NUM_THREADS=4 in the launcher
    assert assign(2, 1, GPUS8, 16, own_devices=True) == Assignment(8, None)  # trainer.devices chosen: no GPU set
    assert not own_devices({"accelerator": "auto", "devices": 1})
    assert not own_devices({"accelerator": "gpu", "devices": "1"})
    for trainer in ({"accelerator": "cpu", "devices": 1}, {"accelerator": "gpu", "devices": 2},
                    {"accelerator": "gpu", "devices": [3]}, {"accelerator": "auto", "devices": "auto"},
                    {"accelerator": "gpu", "devices": 1, "strategy": "ddp"}):
        assert own_devices(trainer), trainer
    with pytest.raises(ConfigError, match="OMP_NUM_THREADS must be a positive integer, got 0"):
        assign(2, 0, [], 2, user_threads=0)
    with pytest.raises(ConfigError, match="sweep.jobs_per_gpu must be a positive integer, got 0"):
        assign(2, 0, [], 2, jobs_per_gpu=0)


def test_user_threads_reads_omp_num_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert resources.user_threads() is None
    monkeypatch.setenv("OMP_NUM_THREADS", "")
    assert resources.user_threads() is None
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert resources.user_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "many")
    with pytest.raises(ConfigError, match="OMP_NUM_THREADS must be a positive integer, got 'many'"):
        resources.user_threads()


def test_sweep_settings_are_checked():
    check_settings({"shared_first": True, "jobs_per_gpu": 2}, multirun=True, given=["sweep.jobs_per_gpu"])
    with pytest.raises(ConfigError, match="sweep.shared_first must be true or false, got 'yes'"):
        check_settings({"shared_first": "yes"}, multirun=True, given=[])
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="sweep.jobs_per_gpu must be a positive integer"):
            check_settings({"jobs_per_gpu": bad}, multirun=True, given=[])
    with pytest.raises(ConfigError, match=r"sweep.shared_first applies to sweeps only \(python -m kdlab -m"):
        check_settings({"shared_first": False}, multirun=False, given=["sweep.shared_first"])
    check_settings({"shared_first": True, "jobs_per_gpu": 1}, multirun=False, given=[])  # the defaults


@pytest.fixture
def no_pin(monkeypatch):
    monkeypatch.setattr(resources, "_PIN", {})
    yield
    if resources._PIN:
        resources._PIN["lock"].release()


def test_a_process_keeps_its_gpu_pin(tmp_path, no_pin):
    other = FileLock(str(tmp_path / "pin-0.lock"))  # another worker holds pin 0 (flock: per open file)
    other.acquire(timeout=0)
    try:
        assert resources.pin_slot(tmp_path, 2) == 1
        assert resources.pin_slot(tmp_path, 2) == 1  # kept from job to job: CUDA keeps the GPU it started on
    finally:
        other.release()
    assert resources.pin_slot(tmp_path, 2) == 1  # even once pin 0 is free


def test_a_job_beyond_the_gpus_waits_for_a_pin(tmp_path, no_pin):
    other = FileLock(str(tmp_path / "pin-0.lock"), thread_local=False)  # released by the timer's thread
    other.acquire(timeout=0)
    timer = threading.Timer(1.0, other.release)  # that job ends in 1 s
    timer.start()
    t0 = time.perf_counter()
    assert resources.pin_slot(tmp_path, 1) == 0
    assert time.perf_counter() - t0 >= 0.9
    timer.join()


@pytest.fixture
def torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_a_job_sizes_itself_from_the_launchers_plan(tmp_path, monkeypatch, no_pin, torch_threads):
    for var in (*resources.THREAD_VARS, "CUDA_VISIBLE_DEVICES"):
        monkeypatch.setenv(var, "x")  # restored after the test
    monkeypatch.delenv(resources.ENV, raising=False)
    assert resources.for_job({"trainer": {}}, 0) is None  # no plan: a single run, the basic launcher, SLURM
    plan = resources.SweepResources(launcher="joblib", parallel=2, cores=2, gpus=[], user_threads=None,
                                    pins=str(tmp_path / "pins"))
    monkeypatch.setenv(resources.ENV, plan.to_env())
    a, got = resources.for_job({"trainer": {"accelerator": "auto", "devices": 1}}, 3, "job 3: ")
    assert got == plan and a == Assignment(1, None)
    assert torch.get_num_threads() == 1
    assert all(resources.os.environ[v] == "1" for v in resources.THREAD_VARS)
    assert resources.os.environ["CUDA_VISIBLE_DEVICES"] == "x"  # no GPU: left as it was
    # a wave of one shared stage: the only job at a time, so it gets both cores
    a, _ = resources.for_job({"trainer": {}}, 0, width=1)
    assert a.threads == 2 and torch.get_num_threads() == 2
    # on GPUs: the job's own GPU through CUDA_VISIBLE_DEVICES, before CUDA starts in the process
    plan = resources.SweepResources(launcher="joblib", parallel=2, cores=8, gpus=["3", "5"], user_threads=None,
                                    pins=str(tmp_path / "pins"))
    monkeypatch.setenv(resources.ENV, plan.to_env())
    a, _ = resources.for_job({"trainer": {"accelerator": "auto", "devices": 1}}, 1)
    assert a == Assignment(4, "3") and resources.os.environ["CUDA_VISIBLE_DEVICES"] == "3"
    assert "4 thread(s), GPU 3 (2 job(s) at a time under joblib on 8 core(s) and 2 GPU(s))" == plan.describe(a)
