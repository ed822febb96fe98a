"""Sweeps of whole pipelines through the real CLI and the real Hydra plugins, on tiny synthetic data:
the joblib launcher with a shared teacher, failing jobs, submitit (local, and our SLURM preset on a stand-in
cluster), the Optuna sweeper, and kdlab.compare on the sweeps' real output."""
from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers.cli import ROOT, SYNTH, kdlab_env, run_kdlab
from tests.helpers.config import compose_dictconfig

# Seconds per job: 1 epoch on 320 images; the time goes into process start-up, not training. On the CPU even where
# there is a GPU: these sweeps check CPU threads (2 jobs at a time on one GPU would be bad input without
# sweep.jobs_per_gpu=2; the GPU sweep is make check-gpu's).
TINY = ["+experiment=dgkd_synthetic_test", "data.n_train=320", "data.n_test=100", "trainer.max_epochs=1",
        "trainer.accelerator=cpu"]
TWO_STAGES = ["pipeline=direct", "pipeline.chain=[plain4,plain2]", "distill.stochastic.mode=none"]


def sweep_cli(args: list[str], out: Path, sweep: Path | None = None, **kw) -> subprocess.CompletedProcess:
    """``run_kdlab`` on the shared synthetic settings, each key given once (ours win)."""
    ours = {a.split("=", 1)[0].lstrip("+~") for a in args}
    base = [a for a in SYNTH if a.split("=", 1)[0] not in ours]
    return run_kdlab(base + list(args), out, sweep, synth=False, **kw)


def job_results(sweep: Path) -> dict[str, dict]:
    """{job dir name: results.json} for every job of a sweep."""
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(sweep.glob("*/results.json"))}


def stage(results: dict, name: str) -> dict:
    return next(s for s in results["stages"] if s["name"] == name)


def compare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdlab.compare", *map(str, args)], check=False, cwd=ROOT,
                          env=kdlab_env(), capture_output=True, text=True, timeout=300)


# -- joblib: 2 x 2 parallel jobs share one teacher -----------------------------------------------------
@pytest.fixture(scope="module")
def joblib_sweep(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    tmp = tmp_path_factory.mktemp("joblib")
    # T and lambda only change the TAs and the student: the teacher (labels only) is the same stage in all 4.
    # No OMP_NUM_THREADS: kdlab sizes the jobs' threads itself (the tests' default of 1 would be the user's).
    r = sweep_cli([*TINY, "distill.temperature=2,4", "distill.lam=0.3,0.7", "hydra/launcher=joblib",
                   "hydra.launcher.n_jobs=2"], tmp / "out", tmp / "sweep", multirun=True,
                  env={"OMP_NUM_THREADS": None})
    return tmp / "sweep", r


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@pytest.mark.slow  # a long CLI run: in make test-slow (CI runs both)
def test_joblib_sweep_trains_the_shared_teacher_once(joblib_sweep):
    sweep, r = joblib_sweep
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in r.stdout + r.stderr  # really the parallel launcher
    jobs = job_results(sweep)
    assert sorted(jobs) == ["0", "1", "2", "3"]
    for res in jobs.values():
        assert res["status"] == "completed"
        assert [s["name"] for s in res["stages"]] == ["teacher", "ta1", "student"]  # a full cascade per job
    teachers = [stage(res, "teacher") for res in jobs.values()]
    assert len({t["store_key"] for t in teachers}) == 1
    assert len({t["test_acc"] for t in teachers}) == 1
    # the swept settings reach the distilled stages: 4 different students, each trained by its own job
    assert {(res["config"]["distill.temperature"], res["config"]["distill.lam"]) for res in jobs.values()} == \
        {(2, 0.3), (2, 0.7), (4, 0.3), (4, 0.7)}
    students = [stage(res, "student") for res in jobs.values()]
    assert len({s["store_key"] for s in students}) == 4 and not any(s["cached"] for s in students)
    assert "4 job(s), 4 completed, 0 failed" in r.stderr


def test_joblib_jobs_get_their_share_of_the_cores(joblib_sweep):
    """2 jobs at a time: each job runs with cores // 2 threads (1 on a 2-core machine), says so in its first
    line and records it in results.json; the launching process announced the same."""
    sweep, r = joblib_sweep
    threads = max(1, usable_cores() // 2)
    jobs = job_results(sweep)
    assert {res["environment"]["threads"] for res in jobs.values()} == {threads}
    assert {res["environment"]["device"] for res in jobs.values()} == {"cpu"}
    for n in jobs:
        assert f"job {n}: {threads} thread(s) (2 job(s) at a time under joblib" in r.stdout, n
    assert f"kdlab: sweep: 4 job(s), 2 at a time under joblib, {threads} thread(s) each" in r.stderr
    plan = json.loads((sweep / "sweep_plan.json").read_text())
    assert (plan["launcher"], plan["jobs"], plan["parallel"], plan["threads_per_job"]) == ("joblib", 4, 2, threads)


def test_the_shared_teacher_trains_first_once_and_no_job_waits(joblib_sweep):
    """sweep.shared_first (the default): the teacher all 4 jobs need is trained before they start, once; every
    job then finds it in the store and no job waits on any stage's lock (the store's records: lock_wait_seconds
    of every stage of every job is 0.0, the lock was free)."""
    sweep, r = joblib_sweep
    plan = json.loads((sweep / "sweep_plan.json").read_text())
    jobs = job_results(sweep)
    teacher_key = stage(jobs["0"], "teacher")["store_key"]
    assert plan["shared_first"] is True
    assert [(s["stage"], s["key"], s["jobs"], s["wave"], s["status"], s["trained"]) for s in plan["shared"]] == \
        [("teacher", teacher_key, [0, 1, 2, 3], 0, "completed", ["teacher"])]
    assert plan["shared"][0]["threads"] == usable_cores()  # alone in its wave: every core
    record = json.loads((Path(plan["shared"][0]["run_dir"]) / "shared.json").read_text())
    assert [(s["name"], s["cached"], s["lock_wait_seconds"]) for s in record["stages"]] == [("teacher", False, 0.0)]
    assert all(stage(res, "teacher")["cached"] for res in jobs.values())  # trained once, before the jobs
    waits = {(n, s["name"]): s["lock_wait_seconds"] for n, res in jobs.items() for s in res["stages"]}
    assert len(waits) == 12 and set(waits.values()) == {0.0}, waits
    assert "waiting for stage" not in r.stdout + r.stderr
    assert "training 1 shared stage(s) first, 1 wave(s): wave 1: teacher (jobs 0,1,2,3)" in r.stderr
    assert not list(sweep.glob("shared/**/results.json"))  # never counted as a job (SweepStatus, compare)


@pytest.mark.slow  # ~1 min of CLI runs: make test-slow
def test_shared_stages_train_in_waves_the_tas_side_by_side(tmp_path):
    """A teacher shared by 4 jobs, each TA by 2 (the TA's temperature is swept, then the student's): wave 1 trains
    the teacher (alone: in the launching process, every core), wave 2 the two TAs at once in joblib's workers
    (cores / 2 threads each); every stage once, and no job waits on a lock."""
    sweep = tmp_path / "sweep"
    r = sweep_cli([*TINY, "+pipeline.per_stage.ta1.distill.temperature=2,4",
                   "+pipeline.per_stage.student.distill.temperature=2,4", "hydra/launcher=joblib",
                   "hydra.launcher.n_jobs=2"], tmp_path / "out", sweep, multirun=True, env={"OMP_NUM_THREADS": None})
    assert r.returncode == 0, r.stderr[-3000:]
    jobs = job_results(sweep)
    plan = json.loads((sweep / "sweep_plan.json").read_text())
    keys = {n: {s["name"]: s["store_key"] for s in res["stages"]} for n, res in jobs.items()}
    assert len({k["teacher"] for k in keys.values()}) == 1 and len({k["ta1"] for k in keys.values()}) == 2
    got = sorted((s["wave"], s["stage"], s["key"], tuple(s["jobs"]), s["trained"], s["in_launching_process"])
                 for s in plan["shared"])
    ta_jobs = sorted({tuple(sorted(int(n) for n in keys if keys[n]["ta1"] == k)) for k in {v["ta1"] for v in keys.values()}})
    assert got == sorted([(0, "teacher", keys["0"]["teacher"], (0, 1, 2, 3), ["teacher"], True)]
                         + [(1, "ta1", keys[str(js[0])]["ta1"], js, ["ta1"], False) for js in ta_jobs])
    # sized as two at a time (in workers, the same per-job limits as the jobs)
    assert {s["threads"] for s in plan["shared"] if s["wave"] == 1} == {max(1, usable_cores() // 2)}
    for res in jobs.values():
        assert [(s["name"], s["cached"], s["lock_wait_seconds"]) for s in res["stages"]] == \
            [("teacher", True, 0.0), ("ta1", True, 0.0), ("student", False, 0.0)]
    assert "training 3 shared stage(s) first, 2 wave(s): wave 1: teacher (jobs 0,1,2,3); wave 2: ta1" in r.stderr


@pytest.mark.slow  # 20-40 s of CLI runs: make test-slow
def test_opting_out_of_shared_first_and_the_users_thread_count(tmp_path):
    """sweep.shared_first=false: the jobs meet in the store as before (one trains the teacher, the other reuses
    it); OMP_NUM_THREADS set by the user is every job's thread count."""
    sweep = tmp_path / "sweep"
    r = sweep_cli([*TINY, *TWO_STAGES, "distill.temperature=2,4", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                   "sweep.shared_first=false"], tmp_path / "out", sweep, multirun=True, env={"OMP_NUM_THREADS": "2"})
    assert r.returncode == 0, r.stderr[-3000:]
    jobs = job_results(sweep)
    assert sum(not stage(res, "teacher")["cached"] for res in jobs.values()) == 1
    assert {res["environment"]["threads"] for res in jobs.values()} == {2}
    plan = json.loads((sweep / "sweep_plan.json").read_text())
    assert plan["shared_first"] is False and plan["shared"] == [] and not (sweep / "shared").exists()
    # a sweep setting in a single run would be ignored: bad input
    single = sweep_cli([*TINY, *TWO_STAGES, "sweep.shared_first=false"], tmp_path / "out", tmp_path / "run")
    assert single.returncode == 2
    assert single.stderr.strip().splitlines()[-1] == ("kdlab: error: sweep.shared_first applies to sweeps only "
                                                     "(python -m kdlab -m ...): a single run has no jobs to size or "
                                                     "share stages between")


def test_compare_on_the_joblib_sweep(joblib_sweep):
    sweep, _ = joblib_sweep
    jobs = job_results(sweep)
    r = compare(sweep)
    assert r.returncode == 0, r.stderr[-3000:]
    for title in ("Student accuracy", "Stages", "Stability", "dgkd"):
        assert title in r.stdout, title
    assert "Failed runs" not in r.stdout
    for name in ("comparison.csv", "comparison.html", "comparison_chain.png", "comparison_student.png",
                 "comparison_val_curves.png"):
        assert (sweep / name).stat().st_size > 0, name
    assert (sweep / "comparison_chain.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    row = next(csv.DictReader((sweep / "comparison.csv").open()))
    accs = [stage(res, "student")["test_acc"] for res in jobs.values()]
    assert row["group"] == "dgkd" and int(row["n"]) == 4 and int(row["n_failed"]) == 0
    assert float(row["student_test_acc_mean"]) == pytest.approx(statistics.fmean(accs))
    assert float(row["student_test_acc_std"]) == pytest.approx(statistics.stdev(accs))
    assert float(row["acc_teacher_mean"]) == pytest.approx(stage(jobs["0"], "teacher")["test_acc"])
    # grouped by the swept fields: one row per job
    out = sweep / "by_t_lam"
    r = compare(sweep, "--by", "distill.temperature,distill.lam", "--out", out, "--no-plots")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = list(csv.DictReader((out / "comparison.csv").open()))
    assert [(row["distill.temperature"], row["distill.lam"]) for row in rows] == \
        [("2", "0.3"), ("2", "0.7"), ("4", "0.3"), ("4", "0.7")]
    assert all(row["n"] == "1" for row in rows)
    # piped into a reader that stops early (| head): still exit 0 and write the files
    out = sweep / "piped"
    piped = f'"{sys.executable}" -m kdlab.compare "{sweep}" --out "{out}" --no-plots | head -c 10'
    r = subprocess.run(["bash", "-o", "pipefail", "-c", piped], check=False, cwd=ROOT, env=kdlab_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and (out / "comparison.html").exists(), r.stderr[-3000:]


@pytest.mark.slow
def test_methods_by_seeds_share_one_teacher_per_seed(tmp_path):
    """The README's sweep, tiny: 2 methods x 2 seeds. The seed is part of every stage, so there is one teacher
    per seed, trained once and reused by the other method; compare groups the runs by method."""
    sweep = tmp_path / "sweep"
    r = sweep_cli(["+experiment=kd_fashion_mnist,dgkd_fashion_mnist", "seed=0,1", "data.n_train=320",
                   "data.n_test=100", "trainer.max_epochs=1", "trainer.accelerator=cpu", "hydra/launcher=joblib",
                   "hydra.launcher.n_jobs=2"],
                  tmp_path / "out", sweep, multirun=True)
    assert r.returncode == 0, r.stderr[-3000:]
    jobs = list(job_results(sweep).values())
    assert sorted((res["method"], res["seed"]) for res in jobs) == [("dgkd", 0), ("dgkd", 1), ("kd", 0), ("kd", 1)]
    plan = json.loads((sweep / "sweep_plan.json").read_text())
    trained_first = {s["key"]: s for s in plan["shared"]}
    for seed in (0, 1):
        teachers = [stage(res, "teacher") for res in jobs if res["seed"] == seed]
        assert len({t["store_key"] for t in teachers}) == 1 and all(t["cached"] for t in teachers)
        # trained once, before the jobs: both teachers in one wave, side by side
        first = trained_first[teachers[0]["store_key"]]
        assert (first["stage"], first["wave"], first["trained"]) == ("teacher", 0, ["teacher"])
    assert len(trained_first) == 2
    r = compare(sweep, "--no-plots")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {row["group"]: row for row in csv.DictReader((sweep / "comparison.csv").open())}
    assert sorted(rows) == ["dgkd", "kd"] and all(row["n"] == "2" for row in rows.values())
    assert rows["dgkd"]["acc_teacher_mean"] == rows["kd"]["acc_teacher_mean"]  # the same two teachers


# -- one failing job does not stop the others ----------------------------------------------------------
FAILING = ["optimizer.lr=0.05,-1,1e30"]  # fine; bad config (job 1); NaN loss at run time (job 2)


@pytest.fixture(scope="module", params=["basic", "joblib"])
def failing_sweep(request, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    tmp = tmp_path_factory.mktemp(f"failing_{request.param}")
    # the preflight checks only the first combination (fine), so the bad ones fail inside their jobs
    r = sweep_cli([*TINY, *TWO_STAGES, *FAILING, f"hydra/launcher={request.param}",
                   *(["hydra.launcher.n_jobs=2"] if request.param == "joblib" else [])],
                  tmp / "out", tmp / "sweep", multirun=True)
    return tmp / "sweep", r


@pytest.mark.slow  # a long CLI run: in make test-slow (CI runs both)
def test_a_failing_job_does_not_stop_the_others(failing_sweep):
    sweep, r = failing_sweep
    jobs = job_results(sweep)
    assert sorted(jobs) == ["0", "1", "2"], r.stderr[-3000:]
    assert jobs["0"]["status"] == "completed" and [s["name"] for s in jobs["0"]["stages"]] == ["teacher", "student"]
    assert jobs["1"]["status"] == "failed" and jobs["1"]["stages"] == []
    assert jobs["1"]["error"] == "optimizer.lr (stage teacher) must be > 0, got -1"
    assert jobs["2"]["status"] == "failed" and "loss is nan" in jobs["2"]["error"]
    assert "stage 'teacher'" in jobs["2"]["error"]
    assert r.returncode == 1  # the sweep says so
    assert "3 job(s), 1 completed, 2 failed (1, 2)" in r.stderr
    assert "job 1 failed: optimizer.lr (stage teacher) must be > 0" in r.stderr
    assert "Traceback" not in r.stderr


def test_compare_reports_the_failed_jobs(failing_sweep):
    sweep, _ = failing_sweep
    r = compare(sweep)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Failed runs (2)" in r.stdout and "loss is nan" in r.stdout
    assert "2 of 3 run(s) failed" in r.stderr
    row = next(csv.DictReader((sweep / "comparison.csv").open()))
    assert (row["n"], row["n_failed"]) == ("1", "2")
    page = (sweep / "comparison.html").read_text()
    assert "Failed runs (2)" in page and "must be &gt; 0, got -1" in page


def test_sweep_status_counts_only_this_sweeps_jobs(tmp_path):
    """A reused sweep dir: jobs older than this sweep are not counted; a job dir without results.json is."""
    from kdlab.cli.hydra_app import SweepStatus

    def job(name: str, status: str | None, mtime: float | None = None) -> None:
        d = tmp_path / name
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "config.yaml").write_text("{}")
        if status:
            (d / "results.json").write_text(json.dumps({"status": status, "error": "boom\nmore"}))
        if mtime is not None:
            for p in (d / ".hydra" / "config.yaml", d / "results.json"):
                if p.exists():
                    os.utime(p, (mtime, mtime))

    job("0", "completed")
    job("1", "failed")
    job("2", None)  # died before its pipeline started
    job("10", "completed")
    job("old", "failed", mtime=1_000_000.0)
    jobs = SweepStatus.job_statuses(tmp_path, since=2_000_000.0)
    assert [d.name for d in jobs] == ["0", "1", "2", "10"]
    assert [s for s, _ in jobs.values()] == ["completed", "failed", "failed", "completed"]
    assert "no results.json" in jobs[tmp_path / "2"][1]


# -- submitit ------------------------------------------------------------------------------------------
@pytest.mark.slow  # 15-30 s of CLI runs: in make test-slow (CI runs both)
def test_submitit_local_sweep(tmp_path):
    r = sweep_cli([*TINY, *TWO_STAGES, "distill.temperature=2,4", "hydra/launcher=submitit_local",
                   "hydra.launcher.timeout_min=10", "hydra.launcher.cpus_per_task=1"],
                  tmp_path / "out", tmp_path / "sweep", multirun=True, env={"OMP_NUM_THREADS": None})
    assert r.returncode == 0, r.stderr[-3000:]
    jobs = job_results(tmp_path / "sweep")
    assert sorted(jobs) == ["0", "1"]
    assert all(res["status"] == "completed" for res in jobs.values())
    # the shared teacher ran first as its own submitit job; both jobs found it in the store without waiting
    plan = json.loads((tmp_path / "sweep" / "sweep_plan.json").read_text())
    assert [(s["stage"], s["jobs"], s["status"], s["trained"]) for s in plan["shared"]] == \
        [("teacher", [0, 1], "completed", ["teacher"])]
    assert all(stage(res, "teacher")["cached"] for res in jobs.values())
    assert {s["lock_wait_seconds"] for res in jobs.values() for s in res["stages"]} == {0.0}
    # submitit ran them (the shared stage's job, then the sweep's two): pickled results and per-job logs
    assert len(list((tmp_path / "sweep" / ".submitit").glob("*/*_result.pkl"))) == 3
    # every job at once, cpus_per_task=1 thread each
    assert (plan["launcher"], plan["parallel"], plan["threads_per_job"]) == ("submitit_local", 2, 1)
    assert {res["environment"]["threads"] for res in jobs.values()} == {1}
    assert "2 job(s), 2 completed, 0 failed" in r.stderr


# A stand-in SLURM for the real submitit plugin: sbatch starts the array's tasks in the background and
# returns, srun runs its command, sacct reports the tasks' states. Enough for submitit to submit, watch and
# collect the jobs as on a cluster.
FAKE_SBATCH = r"""#!{python}
import os, re, subprocess, sys
from pathlib import Path

fake = Path(os.environ["FAKE_SLURM_DIR"])
script = Path(sys.argv[-1]).read_text()
(fake / "state").mkdir(exist_ok=True)
job = 4242 + len(list(fake.glob("job-*.sbatch")))  # each submission its own job id
(fake / f"job-{{job}}.sbatch").write_text(script)
m = re.search(r"#SBATCH --array=(\d+)-(\d+)", script)
tasks = range(int(m[1]), int(m[2]) + 1) if m else [""]  # submitit submits a map of one as a plain job
for t in tasks:
    (fake / "state" / f"{{job}}_{{t}}".rstrip("_")).write_text("PENDING")
subprocess.Popen([sys.executable, str(fake / "bin" / "slurm_runner"), str(fake / f"job-{{job}}.sbatch"), str(job),
                  *map(str, tasks)], start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(f"Submitted batch job {{job}}")
"""

FAKE_RUNNER = r"""#!{python}
import os, subprocess, sys
from pathlib import Path

fake = Path(os.environ["FAKE_SLURM_DIR"])
script, job, tasks = sys.argv[1], sys.argv[2], sys.argv[3:]
for t in tasks:
    name = f"{{job}}_{{t}}".rstrip("_")
    (fake / "state" / name).write_text("RUNNING")
    env = dict(os.environ, SLURM_JOB_ID=str(int(job) * 100 + int(t or 0)), SLURM_NTASKS="1", SLURM_JOB_NUM_NODES="1",
               SLURM_NODEID="0", SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_JOB_NODELIST="localhost",
               SLURM_JOB_NAME="kdlab")
    if t == "":
        env["SLURM_JOB_ID"] = job
    else:
        env.update(SLURM_ARRAY_JOB_ID=job, SLURM_ARRAY_TASK_ID=t)
    with open(fake / f"{{name}}.log", "w") as log:
        rc = subprocess.call(["bash", script], env=env, stdout=log, stderr=subprocess.STDOUT)
    (fake / "state" / name).write_text("COMPLETED" if rc == 0 else "FAILED")
"""

FAKE_SRUN = r"""#!{python}
import os, sys

args = sys.argv[1:]
while args and args[0].startswith("--"):
    args = args[2:] if args[0] in ("--output", "--error") else args[1:]
os.execvp(args[0], args)
"""

FAKE_SACCT = r"""#!{python}
import os
from pathlib import Path

print("JobID|State|NodeList")
for f in sorted(Path(os.environ["FAKE_SLURM_DIR"], "state").glob("*")):
    print(f"{{f.name}}|{{f.read_text()}}|localhost")
"""


def fake_slurm(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("slurm_runner", FAKE_RUNNER), ("srun", FAKE_SRUN),
                       ("sacct", FAKE_SACCT)):
        (bin_dir / name).write_text(text.format(python=sys.executable))
        (bin_dir / name).chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_SLURM_DIR": str(tmp_path)}


@pytest.mark.slow  # minutes of CLI runs: make test-slow (CI runs it)
def test_slurm_preset_on_a_fake_cluster(tmp_path):
    """hydra/launcher=slurm through the real plugin and submitit: the sbatch script carries the preset's and
    the command line's settings; the jobs run, are collected and share their teacher."""
    r = sweep_cli([*TINY, *TWO_STAGES, "distill.temperature=2,4", "hydra/launcher=slurm",
                   "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=2", "hydra.launcher.timeout_min=90",
                   "hydra.launcher.account=lab", "+hydra.launcher.additional_parameters.mail-type=END",
                   "hydra.launcher.setup=['export KDLAB_ON_SLURM=1']"],
                  tmp_path / "out", tmp_path / "sweep", multirun=True, env=fake_slurm(tmp_path), timeout=300)
    logs = "".join(p.read_text() for p in tmp_path.glob("42*.log"))
    assert r.returncode == 0, r.stderr[-3000:] + logs[-3000:]
    # two submissions: the shared teacher's array first (waited for), then the sweep's
    shared_script, script = (tmp_path / "job-4242.sbatch").read_text(), (tmp_path / "job-4243.sbatch").read_text()
    assert "#SBATCH --job-name=kdlab-shared" in shared_script and "#SBATCH --partition=gpu" in shared_script
    assert not (tmp_path / "job-4244.sbatch").exists()
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=2", "#SBATCH --time=90",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --mem=32GB", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --account=lab", "#SBATCH --mail-type=END", "#SBATCH --array=0-1%2",
                 "#SBATCH --job-name=kdlab", "export KDLAB_ON_SLURM=1", "submitit.core._submit"):
        assert line in script, line
    jobs = job_results(tmp_path / "sweep")
    assert sorted(jobs) == ["0", "1"] and all(res["status"] == "completed" for res in jobs.values())
    assert all(stage(res, "teacher")["cached"] for res in jobs.values())  # trained by the first array
    plan = json.loads((tmp_path / "sweep" / "sweep_plan.json").read_text())
    assert [(s["stage"], s["status"], s["trained"]) for s in plan["shared"]] == [("teacher", "completed", ["teacher"])]
    assert plan["parallel"] is None and plan["threads_per_job"] is None  # SLURM places the jobs itself
    assert "2 job(s), 2 completed, 0 failed" in r.stderr


# -- Optuna --------------------------------------------------------------------------------------------
@pytest.mark.slow  # 15-30 s of CLI runs: in make test-slow (CI runs both)
def test_optuna_sweep_returns_the_students_val_acc(tmp_path):
    # no -m: the config sets MULTIRUN itself; the temperature's range as docs/sweeps.md changes it
    r = sweep_cli([*TINY, *TWO_STAGES, "hparams_search=dgkd_optuna", "hydra.sweeper.n_trials=2",
                   "distill.temperature=interval(2.0,8.0)", f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path / "out")
    assert r.returncode == 0, r.stderr[-3000:]
    jobs = job_results(tmp_path / "sweep")
    assert sorted(jobs) == ["0", "1"] and all(res["status"] == "completed" for res in jobs.values())
    best = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    val = {name: stage(res, "student")["val_acc"] for name, res in jobs.items()}
    assert best["best_value"] == pytest.approx(max(val.values()))
    # the best parameters are those of a job with the best value, and lie in the configured intervals
    winners = [jobs[n] for n, v in val.items() if v == pytest.approx(best["best_value"])]
    params = best["best_params"]
    assert any(res["config"]["distill.temperature"] == pytest.approx(params["distill.temperature"])
               and res["config"]["distill.lam"] == pytest.approx(params["distill.lam"]) for res in winners)
    assert 0.1 <= params["distill.lam"] <= 0.95  # the config's range
    assert all(2.0 <= res["config"]["distill.temperature"] <= 8.0 for res in jobs.values())  # the command line's
    assert sum(not stage(res, "teacher")["cached"] for res in jobs.values()) == 1


@pytest.mark.slow  # 15-30 s of CLI runs: in make test-slow (CI runs both)
def test_optuna_survives_a_failed_trial(tmp_path):
    # TPE (seed 1234) draws T = -1 first, then 4: a failed trial, then a good one
    r = sweep_cli([*TINY, *TWO_STAGES, "hparams_search=dgkd_optuna", "hydra.sweeper.n_trials=2",
                   "distill.temperature=choice(4.0,-1.0)", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                  tmp_path / "out")
    jobs = job_results(tmp_path / "sweep")
    statuses = sorted(res["status"] for res in jobs.values())
    assert statuses == ["completed", "failed"], (statuses, r.stderr[-3000:])  # the premise of this test
    assert r.returncode == 1 and "Traceback" not in r.stderr
    best = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    done = next(res for res in jobs.values() if res["status"] == "completed")
    assert best["best_value"] == pytest.approx(stage(done, "student")["val_acc"])
    assert best["best_params"]["distill.temperature"] == 4.0
    assert "2 job(s), 1 completed, 1 failed" in r.stderr


def test_optuna_config_composes_with_in_memory_storage():
    cfg = compose_dictconfig("hparams_search=dgkd_optuna", return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.storage is None
    assert sweeper.direction == "maximize" and sweeper.max_failure_rate == 1.0
    assert set(sweeper.params) == {"distill.temperature", "distill.lam"}
    import optuna  # optuna 2.x with the installed SQLAlchemy: an in-memory study works

    study = optuna.create_study(direction="maximize", storage=None)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    assert len(study.trials) == 2
