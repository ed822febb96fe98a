"""(e) Memory: peak resident memory of ``make run`` (the default pipeline: DGKD, plain10 -> plain8 -> plain6
-> plain4 -> plain2 on Fashion-MNIST, W&B offline + CSV logging), run as a user runs it, in a fresh output
directory (so every stage trains and every source-output cache is built).

By default the pipeline runs with ``trainer.max_epochs=1`` (every stage, cache and test of the real run,
one epoch each; the real run takes many minutes); ``--memory-full`` measures the real 10-epoch ``make run``.
The process tree (make, python, the W&B service) is polled every 0.1 s from /proc: the figure is the peak
of the kdlab process's own high-water mark (VmHWM), and the peak of the tree's summed RSS is reported too.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import common
from common import ROOT, Options, figure


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1])  # kB
    except OSError:
        pass
    return out


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            text = Path(f"/proc/{pid}/task/{tid}/children").read_text().split()
            kids.extend(int(k) for k in text)
    except OSError:
        pass
    return kids


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def measure(cmd: list[str], env: dict[str, str], period: float = 0.1) -> dict[str, Any]:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak_tree, hwm, names = 0, {}, {}
    import threading

    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    while proc.poll() is None:
        tree, todo = [], [proc.pid]
        while todo:
            p = todo.pop()
            tree.append(p)
            todo.extend(_children(p))
        total = 0
        for p in tree:
            st = _status(p)
            total += st.get("VmRSS", 0)
            if st.get("VmHWM", 0) > hwm.get(p, 0):
                hwm[p] = st["VmHWM"]
                names.setdefault(p, _cmdline(p)[:120])
        peak_tree = max(peak_tree, total)
        time.sleep(period)
    reader.join(timeout=5)
    wall = time.perf_counter() - t0
    kdlab = {p: v for p, v in hwm.items() if "-m kdlab" in names.get(p, "")}
    top = max(hwm.items(), key=lambda kv: kv[1]) if hwm else (None, 0)
    return {"returncode": proc.returncode, "wall_seconds": round(wall, 1),
            "peak_kdlab_mib": round(max(kdlab.values()) / 1024, 1) if kdlab else None,
            "peak_process_mib": round(top[1] / 1024, 1), "peak_process": names.get(top[0], ""),
            "peak_tree_mib": round(peak_tree / 1024, 1),
            "processes": {names.get(p, str(p)): round(v / 1024, 1) for p, v in hwm.items()},
            "tail": "".join(lines[-15:])}


def run(o: Options) -> dict[str, Any]:
    out = o.workdir / f"memory-{os.getpid()}"
    shutil.rmtree(out, ignore_errors=True)
    args = [f"paths.output_dir={out}"]
    variant = "make run (10 epochs per stage)"
    if not o.memory_full:
        args.append("trainer.max_epochs=1")
        variant = "make run with trainer.max_epochs=1"
    if o.quick:
        args += [f"data.subset={o.subset}", f"data.test_subset={o.test_subset}"]
        variant += f", data.subset={o.subset} (quick)"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("MAKEFLAGS", None)
    env.pop("MAKELEVEL", None)
    cmd = ["make", "--no-print-directory", "run", f"ARGS={' '.join(args)}"]
    m = measure(cmd, env)
    shutil.rmtree(out, ignore_errors=True)
    # what importing the libraries alone costs (the CUDA build of torch maps large libraries)
    base = measure([sys.executable, "-c", "import kdlab.pipeline.runner, pytorch_lightning, wandb"], env,
                   period=0.02)
    if m["returncode"] != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {m['returncode']}):\n{m['tail']}")
    peak = m["peak_kdlab_mib"] or m["peak_process_mib"]
    figs = [figure("e_memory", f"e. memory: peak RSS of the kdlab process, {variant}", peak, "MiB", None, None,
                   f"importing torch + Lightning + W&B alone: {base['peak_process_mib']} MiB; whole process tree "
                   f"(make, python, W&B service) peaked at {m['peak_tree_mib']} MiB; {m['wall_seconds']} s")]
    return {"name": "memory", "figures": figs,
            "details": {**m, "variant": variant, "command": " ".join(cmd), "import_baseline_mib":
                        base["peak_process_mib"]}}


if __name__ == "__main__":
    common.cli(run, __doc__.splitlines()[0])
