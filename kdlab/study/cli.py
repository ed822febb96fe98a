"""Run a results study: ``python -m kdlab.study [NAME] [--docs] [-- OVERRIDE ...]``.

A study (``studies/<NAME>.yaml``) is a list of sweeps, each a Hydra multirun of kdlab's own command over
some experiments and seeds, grouped into parts (one results table each):

    python -m kdlab -m +experiment=A,B seed=0,1,2 [the sweep's overrides] [the study's] [yours]

The sweeps run one after the other (stages shared between them come from the store), each running as many of its
pipelines at a time as the machine allows (joblib; ``--jobs``; docs/sweeps.md), then
``kdlab.compare`` turns each part's runs into tables: ``<out>/<part>/comparison.{csv,html,md}`` and PNGs,
plus ``<out>/results.md`` (all parts) and ``<out>/study.json`` (commands, exit codes, wall times).
``--docs`` writes them to ``docs/results/`` and puts ``results.md`` into the README between the
``<!-- results:begin -->`` and ``<!-- results:end -->`` markers. Exit status 1 when a sweep failed
(the tables then show what finished), 2 for bad input.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from kdlab.cli.report import report_error
from kdlab.compare import tables as compare_tables
from kdlab.errors import ConfigError, KdlabError
from kdlab.study.config import ROOT, command_line, docs_dir, experiment_command, load_study, sweep_args
from kdlab.study.tables import publish


def run_sweep(args: list[str], sweep_dir: Path, log: Path) -> tuple[int, float]:
    """One multirun in a subprocess; its output goes to the terminal and to ``log``."""
    cmd = [sys.executable, "-m", "kdlab", *args, f"hydra.sweep.dir={sweep_dir}"]
    t0 = time.perf_counter()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w", encoding="utf-8") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            fh.write(line)
            sys.stdout.write("    " + line)
            sys.stdout.flush()
        rc = proc.wait()
    return rc, time.perf_counter() - t0


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    import torch

    return {"cpu": cpu_name(), "cores": os.cpu_count(),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "loadavg_start": [round(x, 2) for x in os.getloadavg()]}


def how_to_run(requested: int | None, extra: list[str]) -> tuple[int | None, int | None, list[str]]:
    """(jobs at a time, threads per job, the launcher overrides) of every sweep: as many jobs at once as the
    machine allows (kdlab.cli.resources.parallel_jobs: one per GPU, else one per core, at most 8; ``--jobs``
    chooses), under joblib, each job sized by kdlab. A launcher given after ``--`` is the user's: (None, None, [])."""
    from kdlab.cli.resources import (
        assign,
        launcher_overrides,
        parallel_jobs,
        usable_cores,
        user_threads,
        visible_gpus,
    )

    if any(x.startswith(("hydra/launcher=", "hydra.launcher.")) for x in extra):
        return None, None, []
    jobs = parallel_jobs(requested)
    threads = assign(jobs, 0, visible_gpus(), usable_cores(), user_threads=user_threads()).threads if jobs > 1 \
        else (user_threads() or usable_cores())
    return jobs, threads, launcher_overrides(jobs)


def run(a: argparse.Namespace) -> int:
    if a.tables_only:
        return tables_only(a)
    study = load_study(a.name)
    try:
        seeds = [int(s) for s in a.seeds.split(",")] if a.seeds else [int(s) for s in study["seeds"]]
    except ValueError as e:
        raise ConfigError(f"--seeds must be comma-separated integers, got {a.seeds!r}") from e
    parts = list(study["parts"])
    only = [p.strip() for p in a.only.split(",")] if a.only else parts
    for p in only:
        if p not in parts:
            raise ConfigError(f"--only names unknown part {p!r}; parts of study {a.name}: {', '.join(parts)}")
    extra = list(a.overrides)
    jobs, threads, launcher = how_to_run(a.jobs, extra)
    sweeps = [s for s in study["sweeps"] if s["part"] in only]
    stamp = datetime.now().strftime("%Y-%m-%d/%H-%M-%S")
    root = Path(a.root) if a.root else ROOT / "outputs" / "study" / Path(a.name).stem / stamp
    out = docs_dir(study) if a.docs else Path(a.out) if a.out else root / "results"

    record = {"study": a.name, "seeds": seeds, "overrides": extra, "root": str(root),
              "machine": {**machine(), "jobs": jobs, "threads_per_job": threads},
              "started": datetime.now().isoformat(timespec="seconds"), "sweeps": []}
    for i, sw in enumerate(sweeps):
        args = sweep_args(study, sw, seeds, extra) + launcher
        record["sweeps"].append({
            "part": sw["part"], "experiments": sw["experiments"], "command": command_line(args),
            "commands": {e: experiment_command(study, sw, e, seeds, extra) for e in sw["experiments"]},
            "dir": str(root / f"{i + 1:02d}-{sw['part']}"), "args": args})
    n_jobs = len(seeds) * sum(len(s["experiments"]) for s in sweeps)
    how = f"{jobs} job(s) at a time, {threads} thread(s) each" if jobs else "the launcher given after --"
    print(f"study {a.name}: {len(sweeps)} sweeps, {n_jobs} pipeline runs, seeds {seeds}; {how}; runs under {root}")
    if a.dry_run:
        for s in record["sweeps"]:
            print(s["command"])
        return 0

    t0 = time.perf_counter()
    failed = 0
    for i, s in enumerate(record["sweeps"]):
        print(f"[{i + 1}/{len(sweeps)}] {s['part']}: {s['command']}", flush=True)
        rc, secs = run_sweep(s["args"], Path(s["dir"]), Path(s["dir"] + ".log"))
        s.update(exit_code=rc, seconds=round(secs, 1))
        failed += rc != 0
        print(f"[{i + 1}/{len(sweeps)}] {s['part']}: exit {rc} after {compare_tables.fmt_seconds(secs)} "
              f"(total {compare_tables.fmt_seconds(time.perf_counter() - t0)})", flush=True)
    record["seconds"] = round(time.perf_counter() - t0, 1)
    record["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    (root / "study.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    publish(study, record, out, a)
    print(f"study {a.name}: {len(sweeps) - failed}/{len(sweeps)} sweeps succeeded in "
          f"{compare_tables.fmt_seconds(record['seconds'])}")
    return 1 if failed else 0


def tables_only(a: argparse.Namespace) -> int:
    """--tables-only: rebuild the tables of a finished study from its run directories (no training)."""
    if not a.root:
        raise ConfigError("--tables-only needs --root, the directory of a finished study run")
    path = Path(a.root) / "study.json"
    if not path.is_file():
        raise ConfigError(f"--root {a.root} holds no study.json (not a finished study run)")
    record = json.loads(path.read_text(encoding="utf-8"))
    study = load_study(a.name)
    out = docs_dir(study) if a.docs else Path(a.out) if a.out else Path(a.root) / "results"
    publish(study, record, out, a)
    return 1 if any(s.get("exit_code") for s in record["sweeps"]) else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kdlab.study", description=__doc__.split("\n\n")[0])
    p.add_argument("name", nargs="?", default="fashion_mnist", help="a study in studies/ (default fashion_mnist) or the path of a study .yaml")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default: the study's, 0,1,2)")
    p.add_argument("--only", default=None, help="comma-separated parts to run (default: all)")
    p.add_argument("--root", default=None, help="where the sweeps' runs go (default outputs/study/NAME/DATE/TIME)")
    p.add_argument("--out", default=None, help="where the tables go (default ROOT/results)")
    p.add_argument("--docs", action="store_true", help="write the tables to docs/results/ and into the README")
    p.add_argument("--jobs", type=int, default=None,
                   help="pipelines at a time in each sweep (default: one per GPU, else one per core, at most 8, each "
                   "with cores / jobs threads; 1: one after another)")
    p.add_argument("--dry-run", action="store_true", help="print the sweep commands and stop")
    p.add_argument("--tables-only", action="store_true",
                   help="rebuild the tables of the finished study under --root from its run directories")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.epilog = "After --: kdlab overrides added to every sweep, e.g. -- trainer.max_epochs=1"
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    try:
        a = build_parser().parse_args(argv[:cut])
    except SystemExit as e:
        return int(e.code or 0)
    a.overrides = argv[cut + 1:]
    try:
        return run(a)
    except KdlabError as e:
        return report_error("kdlab.study", e)
    except KeyboardInterrupt:
        print("kdlab.study: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
