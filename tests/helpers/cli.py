"""The CLI in a subprocess on small synthetic data: ``run_kdlab``, ``read_results``, ``trained``, ``SYNTH``; many
CLI processes at once (``run_cli_batch``: forked from one warm helper process); ``python -m kdlab.study``."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
# Tiny, learnable synthetic data and short training: every CLI test runs in seconds.
SYNTH = ["preset=none", "data=synthetic", "data.n_train=640", "data.n_test=200", "data.batch_size=64", "logger=csv",
         "trainer.max_epochs=2", "optimizer.lr=0.01", "callbacks.progress=plain"]


def kdlab_env(extra: dict[str, str | None] | None = None) -> dict[str, str]:
    """The tests' environment for a kdlab process; ``extra`` adds variables (None: remove it, e.g.
    ``{"OMP_NUM_THREADS": None}`` to let a sweep size its jobs' threads itself)."""
    env = dict(os.environ)
    env.update({"WANDB_MODE": "offline", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0",
                "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"})
    env.pop("WANDB_API_KEY", None)
    env.update(extra or {})
    return {k: v for k, v in env.items() if v is not None}


def run_kdlab(args: list[str], out: Path, run_dir: Path | None = None, synth: bool = True, timeout: int = 600,
              multirun: bool = False, env: dict[str, str | None] | None = None, module: str = "kdlab"
              ) -> subprocess.CompletedProcess:
    """``python -m kdlab`` with outputs under ``out`` (store shared between calls with the same ``out``)."""
    cmd = [sys.executable, "-m", module]
    if multirun:
        cmd.append("-m")
    cmd += (SYNTH if synth else []) + list(args) + [f"paths.output_dir={out}"]
    if run_dir is not None:
        cmd.append(f"hydra.{'sweep' if multirun else 'run'}.dir={run_dir}")
    return subprocess.run(cmd, cwd=ROOT, env=kdlab_env(env), capture_output=True, text=True, timeout=timeout,
                          check=False)


def read_results(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "results.json").read_text())


def trained(results: dict) -> list[str]:
    return [s["name"] for s in results["stages"] if not s["cached"]]



FORK_HELPER = r"""
import json, os, runpy, sys, traceback
os.chdir(sys.argv[1])
import kdlab.cli.main, kdlab.compare.cli, kdlab.pipeline.runner  # noqa: F401,E401  (the start-up cost, paid once)
jobs, parallel = json.loads(sys.stdin.read()), int(sys.argv[2])

def start(job):
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        for fd, path in ((1, job["stdout"]), (2, job["stderr"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        sys.argv = [job["module"], *job["argv"]]
        try:
            runpy.run_module(job["module"], run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)

codes, queue, running = {}, list(jobs), {}
while queue or running:
    while queue and len(running) < parallel:
        job = queue.pop(0)
        running[start(job)] = job["id"]
    pid, status = os.wait()
    codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
print(json.dumps(codes))
"""


def start_cli(job: dict) -> subprocess.Popen:
    """``python -m kdlab ...`` (the child keeps its own copies of the output files' descriptors)."""
    with open(job["stdout"], "w") as out, open(job["stderr"], "w") as err:
        return subprocess.Popen([sys.executable, "-m", job["module"], *job["argv"]], cwd=ROOT, env=kdlab_env(),
                                stdout=out, stderr=err)


def run_cli_batch(jobs: list[dict], forked: bool = True, parallel: int = 2) -> dict[str, int]:
    """Run CLI jobs ({id, module, argv, stdout, stderr}) as processes; their exit statuses by id.

    ``forked``: children of the warm helper, ``parallel`` at a time; else ``python -m`` each, all at once."""
    if not jobs:
        return {}
    if not forked:
        procs = {j["id"]: start_cli(j) for j in jobs}
        return {cid: p.wait(timeout=900) for cid, p in procs.items()}
    helper = subprocess.run([sys.executable, "-c", FORK_HELPER, str(ROOT), str(parallel)], check=False, cwd=ROOT,
                            env=kdlab_env(), input=json.dumps(jobs), capture_output=True, text=True, timeout=900)
    assert helper.returncode == 0, helper.stderr[-3000:]
    return json.loads(helper.stdout.strip().splitlines()[-1])



def run_study(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdlab.study", *args], cwd=ROOT, env=kdlab_env(),
                          capture_output=True, text=True, timeout=timeout, check=False)

