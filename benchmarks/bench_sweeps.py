"""(l) A sweep on the whole machine: a 4-job sweep of students that share a teacher (``distill.temperature=2,4``
x ``distill.lam=0.3,0.7``, plain8 -> plain2 by KD on 1,500 Fashion-MNIST images, 2 epochs per stage, the teacher
run live in every student step as under augmentation), run by the real command line
(``python -m kdlab -m ...``) in three ways, each from an empty store (so each trains the teacher once):

* ``sequential``: the basic launcher, the jobs one after another in one process, torch's default threads (one
  per core);
* ``before``: joblib, 2 jobs at a time, as kdlab ran them before: every job with one thread per core
  (``OMP_NUM_THREADS`` = cores, the user's setting, which kdlab leaves alone) and no shared-stage plan
  (``sweep.shared_first=false``: the jobs that need the teacher while one trains it wait on its lock);
* ``after``: joblib, as many jobs at a time as the machine allows (:func:`kdlab.cli.resources.parallel_jobs`,
  what ``python -m kdlab.study`` uses), sized by kdlab (``cores / jobs`` threads each) with the teacher trained
  first.

The rounds are interleaved (sequential, before, after, sequential, ...) and each figure takes each way's best
round. Figures: the parallel sweep's wall time over the sequential one's, before and after (target: after <= 1,
no slower); the threads each job reported in results.json (``environment.threads``); the seconds jobs spent
waiting on locks; the after sweep's wall time over the sum of its distinct stages' times (the teacher once, the 4
students: ``stage_seconds``), i.e. how much of the stages' work ran side by side (< 1) after the start-up costs.

    python benchmarks/bench_sweeps.py            # or: make bench ARGS="--only sweeps"   (~6-8 min on 2 cores)
    python benchmarks/bench_sweeps.py --quick    # 2 jobs on 400 images (the smoke test, ~2 min)

``--subset`` sets the training images, ``--epochs`` every stage's epochs, ``--repeats`` the rounds.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any

import common
from common import Options, check, figure, ratio

from kdlab.cli.resources import launcher_overrides, parallel_jobs, usable_cores

SIZES = {  # training images (before the validation split), test images, epochs of every stage, swept values
    "default": {"subset": 1500, "test": 1000, "epochs": 2, "teacher_epochs": 2,
                "sweep": ["distill.temperature=2,4", "distill.lam=0.3,0.7"]},
    "quick": {"subset": 400, "test": 200, "epochs": 1, "teacher_epochs": 1, "sweep": ["distill.temperature=2,4"]},
}
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
              "NUMEXPR_NUM_THREADS", "KDLAB_SWEEP_RESOURCES")


def sizes(o: Options) -> dict[str, Any]:
    size = dict(SIZES["quick" if o.quick else "default"])
    if not o.quick and o.subset != Options().subset:
        size["subset"] = o.subset
    if not o.quick and o.epochs != Options().epochs:
        size["epochs"] = size["teacher_epochs"] = o.epochs
    return size


def sweep_args(size: dict[str, Any]) -> list[str]:
    return [f"data.subset={size['subset']}", f"data.test_subset={size['test']}", "logger=csv",
            "callbacks.progress=none", "pipeline=direct", "pipeline.chain=[plain8,plain2]", "distill=kd",
            "distill.cache=off",
            f"trainer.max_epochs={size['epochs']}", f"+pipeline.per_stage.teacher.max_epochs={size['teacher_epochs']}",
            *size["sweep"]]


def variants(cores: int) -> dict[str, tuple[list[str], dict[str, str]]]:
    """way -> (its launcher overrides, its thread environment)."""
    jobs = parallel_jobs()
    return {
        "sequential": ([], {}),
        "before": (["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "sweep.shared_first=false"],
                   {"OMP_NUM_THREADS": str(cores)}),
        "after": (launcher_overrides(jobs), {}),
    }


def run_sweep(o: Options, name: str, args: list[str], env_extra: dict[str, str]) -> dict[str, Any]:
    """One sweep through the CLI, from an empty store; what its jobs and its plan recorded."""
    root = o.workdir / "sweeps" / name
    shutil.rmtree(root, ignore_errors=True)
    sweep = root / "sweep"
    env = {k: v for k, v in os.environ.items() if k not in THREAD_ENV}
    env.update({"WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONWARNINGS": "ignore", **env_extra})
    cmd = [sys.executable, "-m", "kdlab", "-m", *args, f"paths.output_dir={root / 'out'}",
           f"paths.store_dir={root / 'store'}", f"hydra.sweep.dir={sweep}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=common.ROOT, env=env, capture_output=True, text=True, check=False, timeout=3600)
    wall = time.perf_counter() - t0
    (root / "sweep.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"sweep {name} exited {proc.returncode}: {tail} (log {root / 'sweep.log'})")
    jobs = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/results.json"), key=lambda p: int(p.parent.name))]
    plan_path = sweep / "sweep_plan.json"
    plan = json.loads(plan_path.read_text()) if plan_path.exists() else {}
    shared = [json.loads(p.read_text()) for p in sorted(sweep.glob("shared/*/shared.json"))]
    stages: dict[str, float] = {}  # store key -> stage_seconds, where the stage was trained
    for rec in [*shared, *jobs]:
        for s in rec["stages"]:
            if not s["cached"]:
                stages[s["store_key"]] = s["stage_seconds"]
    return {"wall_seconds": round(wall, 2), "jobs": len(jobs), "threads": [j["environment"]["threads"] for j in jobs],
            "lock_wait_seconds": round(sum(s.get("lock_wait_seconds") or 0.0 for j in jobs for s in j["stages"]), 2),
            "trained_by_jobs": sum(not s["cached"] for j in jobs for s in j["stages"]),
            "distinct_stages": len(stages), "stage_seconds_sum": round(sum(stages.values()), 2),
            "parallel": plan.get("parallel"), "shared": [(s["stage"], s["seconds"]) for s in plan.get("shared", [])],
            "plan_seconds": plan.get("seconds"), "command": "python -m kdlab -m " + " ".join(args)}


def best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return min(runs, key=lambda r: r["wall_seconds"])


def run(o: Options) -> dict[str, Any]:
    size = sizes(o)
    cores = usable_cores()
    ways = variants(cores)
    base = sweep_args(size)
    rounds = 1 if o.quick else max(1, o.repeats)
    runs: dict[str, list[dict[str, Any]]] = {w: [] for w in ways}
    for r in range(rounds):  # interleaved: the machine's drift hits every way alike
        for way, (launcher, env) in ways.items():
            runs[way].append(run_sweep(o, f"{way}-{r}", [*base, *launcher], env))
    seq, before, after = best(runs["sequential"]), best(runs["before"]), best(runs["after"])
    jobs = after["jobs"]
    figs = []
    speed_before = ratio(before["wall_seconds"], seq["wall_seconds"])
    figs.append(figure("l_before", f"l. sweep of {jobs} students sharing a teacher: parallel (2 at a time, every job "
                       "all cores, no plan) / sequential, wall time", speed_before, "x", None, None,
                       f"{before['wall_seconds']} s vs {seq['wall_seconds']} s; threads per job {before['threads']}, "
                       f"{before['lock_wait_seconds']} s waiting on locks in total (best of {rounds})"))
    speed_after = ratio(after["wall_seconds"], seq["wall_seconds"])
    figs.append(figure("l_after", f"l. the same sweep, parallel as kdlab sizes it ({after['parallel']} at a time, "
                       "shared stages first) / sequential, wall time", speed_after, "x", "<= 1",
                       check(speed_after, "<=", 1.0),
                       f"{after['wall_seconds']} s vs {seq['wall_seconds']} s; shared stages first: "
                       f"{after['shared']} (best of {rounds})"))
    figs.append(figure("l_threads", "l. threads per job in the parallel sweep (results.json environment.threads)",
                       max(after["threads"]), "", f"<= {max(1, cores // max(1, after['parallel'] or 1))}",
                       check(max(after["threads"]), "<=", max(1, cores // max(1, after["parallel"] or 1))),
                       f"jobs: {after['threads']} on {cores} cores, {after['parallel']} at a time (before: "
                       f"{before['threads']}; sequential: {seq['threads']})"))
    figs.append(figure("l_lock_wait", "l. seconds the parallel sweep's jobs waited on stage locks", after["lock_wait_seconds"],
                       "s", "== 0", after["lock_wait_seconds"] == 0.0,
                       f"before (no plan): {before['lock_wait_seconds']} s"))
    spread = ratio(after["wall_seconds"], after["stage_seconds_sum"])
    figs.append(figure("l_plan", "l. parallel sweep wall time / sum of its distinct stages' times (each once)", spread,
                       "x", None, None,
                       f"{after['wall_seconds']} s vs {after['stage_seconds_sum']} s over {after['distinct_stages']} "
                       f"stages (the rest is process start-up, planning and data loading: plan "
                       f"{after['plan_seconds']} s); sequential: {seq['wall_seconds']} s vs {seq['stage_seconds_sum']} s"))
    return {"name": "sweeps", "figures": figs,
            "details": {"runs": runs, "cores": cores, "sizes": size, "rounds": rounds,
                        "commands": {w: best(rs)["command"] for w, rs in runs.items()},
                        "env": {w: env for w, (_, env) in ways.items()}}}


if __name__ == "__main__":
    common.cli(run, __doc__.splitlines()[0])
