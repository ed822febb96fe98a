"""``make bench``: every kdlab speed figure, measured in one run on this machine, as a table and JSON.

    make bench                          # all benchmarks, ~25 min on a 2-core CPU
    make bench ARGS=--quick             # tiny sizes: checks that every script works (the smoke test)
    make bench ARGS="--only stages,data"
    python benchmarks/run.py --memory-full   # (e) on the real 10-epoch `make run` (long)

Each benchmark is its own script (benchmarks/bench_*.py, runnable alone) and runs in its own process, one
after the other; their JSON is collected into benchmarks/results/bench.json (``--out``) and the table is
printed and written next to it as bench.md. A subset (``--only``, ``--skip``) writes bench-partial.json and
``--quick`` bench-quick.json (git-ignored), never the full run's files; ``--docs`` takes a full run only.
At ``--quick`` size only the targets that hold at any size (exact counts) are judged; the others are shown,
not judged (tiny stages time start-up, not work). Logs of every script: <workdir>/logs/. Missed targets are
reported (column "ok"), not errors; the exit status is 1 only if a benchmark failed to run (or, with
``--strict``, missed a target).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common

BENCHES = ["hotpath", "data", "stages", "knobs", "methods", "views", "dafl", "quant", "imagefolder", "peer", "memory",
           "sweeps", "gpu"]
WHAT = {"hotpath": "2. no wasted work (profile)", "data": "b. data path", "stages": "a/c/f. student stages",
        "knobs": "3. speed knobs", "methods": "g. method cost", "views": "h. sources cached under augmentation",
        "dafl": "i. data-free step (DAFL)",
        "quant": "j. quantized students", "imagefolder": "k. on-disk ImageFolder loader", "peer": "d. peer (torchdistill)", "memory": "e. memory",
        "sweeps": "l. a sweep on the whole machine", "gpu": "5. GPU (only where there is one)"}
# rewritten with --docs: the README keeps the figures that have a target (a first-day page), the performance
# page every figure
DOCS = {HERE.parent / "README.md": True, HERE.parent / "docs" / "performance.md": False}  # path -> headline only
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def run_one(name: str, argv: list[str], o: common.Options, inproc: bool, timeout: float) -> dict[str, Any]:
    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]
    if inproc:
        import importlib

        try:
            result = importlib.import_module(f"bench_{name}").run(o)
        except Exception as e:  # noqa: BLE001 - report and go on with the next benchmark
            result = {"name": name, "error": f"{type(e).__name__}: {e}".strip()[:2000], "figures": []}
    else:
        logs = o.workdir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        out, log = logs / f"{name}.json", logs / f"{name}.log"
        out.unlink(missing_ok=True)
        cmd = [sys.executable, str(HERE / f"bench_{name}.py"), *argv, "--out", str(out)]
        with open(log, "w") as fh:
            try:
                rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout, check=False,
                                    env={**os.environ, "PYTHONWARNINGS": "ignore"}).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        if out.exists():
            result = json.loads(out.read_text())
        else:
            tail = log.read_text(errors="replace").strip().splitlines()[-12:]
            result = {"name": name, "error": f"exit {rc}; log {log}:\n" + "\n".join(tail), "figures": []}
    common.judge(result.get("figures", []), o.quick)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["loadavg_1min"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
    return result


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def table(results: dict[str, Any]) -> str:
    rows = [("figure", "value", "target", "ok", "note")]
    for name, res in results.items():
        if res.get("error"):
            rows.append((f"{WHAT.get(name, name)}: FAILED", "-", "-", "-", res["error"].splitlines()[0][:100]))
        for f in res.get("figures", []):
            ok = "-" if f["ok"] is None else ("yes" if f["ok"] else "NO")
            unit = f" {f['unit']}" if f["unit"] and f["unit"] != "x" else ("x" if f["unit"] == "x" else "")
            rows.append((f["label"], fmt(f["value"]) + unit, f["target"] or "-", ok, f["note"]))
    widths = [min(max(len(r[i]) for r in rows), cap) for i, cap in enumerate((84, 14, 16, 3, 10_000))]
    lines = []
    for i, r in enumerate(rows):
        lines.append("  ".join(c[:w].ljust(w) if j < 4 else c for j, (c, w) in enumerate(zip(r, widths))))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths[:4]) + "  " + "-" * 20)
    return "\n".join(lines)


def markdown(report: dict[str, Any], headline: bool = False) -> str:
    """The table; ``headline``: only the figures with a target (and any benchmark that failed to run)."""
    m = report["machine"]
    head = (f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), "
            f"GPU: {m['cuda'] or 'none'}; 1-min load average {report['loadavg'][0]} at start, "
            f"{report['loadavg'][1]} at the end. Command: `{report['command']}` ({report['seconds']:.0f} s).")
    out = [head, "",
           "| figure | value | target | met | measured as |", "|---|---|---|---|---|"]
    for name, res in report["benches"].items():
        if res.get("error"):
            out.append(f"| {WHAT.get(name, name)} | failed | | | {res['error'].splitlines()[0]} |")
        for f in res.get("figures", []):
            if headline and not f["target"]:
                continue
            ok = "" if f["ok"] is None else ("yes" if f["ok"] else "**no**")
            unit = f" {f['unit']}" if f["unit"] and f["unit"] != "x" else ("x" if f["unit"] == "x" else "")
            out.append(f"| {f['label']} | {fmt(f['value'])}{unit} | {f['target'] or ''} | {ok} | {f['note']} |")
    if headline:
        n = sum(len(res.get("figures", [])) for res in report["benches"].values())
        note = f"The figures with a target; all {n} figures of this run, and what each one measures, are in "
        out += ["", note + "`docs/performance.md`."]
    return "\n".join(out) + "\n"


def write_docs(report: dict[str, Any], docs: dict[Path, bool] | None = None) -> None:
    """The table between the ``bench`` markers of each page in ``docs`` (default ``DOCS``): path -> headline only."""
    for doc, headline in (DOCS if docs is None else docs).items():
        text = doc.read_text() if doc.exists() else ""
        if BEGIN in text and END in text:
            head, rest = text.split(BEGIN, 1)
            doc.write_text(head + BEGIN + "\n" + markdown(report, headline) + END + rest.split(END, 1)[1])


def default_out(quick: bool, partial: bool) -> Path:
    """Where a run's JSON goes by default: only a full run replaces the committed bench.json / bench.md."""
    return HERE / "results" / ("bench-quick.json" if quick else "bench-partial.json" if partial else "bench.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_options(ap)
    ap.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(BENCHES)}")
    ap.add_argument("--skip", default="", help="comma-separated benchmarks to leave out")
    ap.add_argument("--inproc", action="store_true", default=None,
                    help="run the benchmarks in this process (default with --quick: saves the imports)")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON report (default benchmarks/results/bench.json for a full run; bench-quick.json with "
                         "--quick, bench-partial.json with --only / --skip: neither replaces the full run's)")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds per benchmark")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    ap.add_argument("--docs", action="store_true", help="also put the table into docs/performance.md and the "
                    f"figures with a target into README.md (between their {BEGIN} / {END} lines)")
    a = ap.parse_args()
    common.quiet()
    o = common.options_from(a)
    common.set_threads(o.threads)
    o.workdir.mkdir(parents=True, exist_ok=True)
    names = [n for n in (a.only.split(",") if a.only else BENCHES) if n and n not in a.skip.split(",")]
    unknown = sorted(set(names) - set(BENCHES))
    if unknown:
        ap.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHES)}")
    partial = names != BENCHES
    if a.docs and (a.quick or partial):
        ap.error("--docs writes a full run's figures into the README and docs/performance.md; drop "
                 + ("--quick" if a.quick else "--only / --skip"))
    inproc = a.quick if a.inproc is None else a.inproc
    argv = [arg for arg in sys.argv[1:] if arg not in ("--inproc", "--strict", "--docs")]
    argv = _strip(argv, ("--only", "--skip", "--out", "--timeout"))
    out = a.out or default_out(a.quick, partial)
    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]
    results: dict[str, Any] = {}
    for name in names:
        print(f"[bench] {name}: {WHAT[name]} ...", file=sys.stderr, flush=True)
        results[name] = run_one(name, argv, o, inproc, a.timeout)
        status = "FAILED" if results[name].get("error") else "done"
        print(f"[bench] {name}: {status} in {results[name]['seconds']:.0f} s", file=sys.stderr, flush=True)
    report = {"schema": 1, "command": "make bench" + (f" ARGS='{' '.join(sys.argv[1:])}'" if sys.argv[1:] else ""),
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds": round(time.perf_counter() - t0, 1),
              "machine": common.machine(), "loadavg": [round(load0, 2), round(os.getloadavg()[0], 2)],
              "options": o.to_json(), "benches": results,
              "figures": [f for r in results.values() for f in r.get("figures", [])]}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    tmp.replace(out)
    out.with_suffix(".md").write_text(markdown(report))
    if a.docs:
        write_docs(report)
    print(table(results))
    print(f"\n{report['seconds']:.0f} s; machine: {report['machine']['cpu']} ({report['machine']['cores']} cores), "
          f"load {report['loadavg'][0]} -> {report['loadavg'][1]}; JSON: {out}")
    failed = [n for n, r in results.items() if r.get("error")]
    missed = [f["key"] for f in report["figures"] if f["ok"] is False]
    if failed:
        print(f"failed: {', '.join(failed)} (logs in {o.workdir / 'logs'})", file=sys.stderr)
    if missed:
        print(f"targets missed: {', '.join(missed)}", file=sys.stderr)
    sys.exit(1 if failed or (a.strict and missed) else 0)


def _strip(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    """argv without the orchestrator's own flags (and their values)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in flags:
            skip = True
            continue
        if any(arg.startswith(f + "=") for f in flags):
            continue
        out.append(arg)
    return out


if __name__ == "__main__":
    main()
