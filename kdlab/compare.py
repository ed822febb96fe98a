"""Compare many kdlab runs: ``python -m kdlab.compare PATH... [--by FIELD[,FIELD]] [--out DIR]``.

Reads the ``results.json`` of every run under the given paths, groups the runs (by method, or by any
top-level, config or override field), prints rich tables (accuracy, stages, stability) and writes
``comparison.csv``, a self-contained ``comparison.html`` and the PNG plots it embeds. For every data-free
stage (DAFL: ``data_free: true``) the last grid of generated images in its run directory
(``generated/<stage>/epoch_NNN.png``) is embedded in the page too.

Accuracies stay fractions in the data (as in results.json) and are shown as percentages.
"""
from __future__ import annotations

import argparse
import base64
import csv
import html
import itertools
import json
import math
import os
import statistics
import sys
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path

from kdlab.errors import ConfigError, KdlabError

RESULTS_NAME = "results.json"
DEFAULT_BY = ("method",)
DEFAULT_LAST_K = 5
PLOT_NAMES = ("chain", "student", "val_curves")
GENERATED_DIR = "generated"  # <run dir>/generated/<stage>/epoch_NNN.png (kdlab/modules/datafree.py)
PAIRED_TITLE = "Paired comparison (student test accuracy, runs sharing a seed)"
TOP_LEVEL_FIELDS = ("method", "dataset", "seed", "experiment", "status", "kdlab_version")


def warn(msg: str) -> None:
    print(f"kdlab.compare: warning: {msg}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------- loading

def find_results(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Every results.json under ``paths`` (a path may be the file itself), sorted, without duplicates."""
    found: dict[Path, None] = {}
    empty = []
    for p in map(Path, paths):
        if not p.exists():
            raise ConfigError(f"path does not exist: {p}")
        files = [p] if p.is_file() else sorted(p.rglob(RESULTS_NAME))
        if not files:
            empty.append(str(p))
        for f in files:
            found.setdefault(f.resolve(), None)
    if not found:
        raise ConfigError(f"no {RESULTS_NAME} found under {', '.join(empty)}")
    for e in empty:
        warn(f"no {RESULTS_NAME} found under {e}")
    return list(found)


def _check_run(data: object) -> str | None:
    """Why ``data`` is not a usable results.json, or None if it is."""
    if not isinstance(data, dict):
        return f"expected a JSON object, got {type(data).__name__}"
    stages = data.get("stages")
    if data.get("status") != "completed":
        if stages is not None and not isinstance(stages, list):
            return "'stages' is not a list"
        return None  # failed/incomplete runs only need their status and error
    if not isinstance(stages, list) or not stages or not all(isinstance(s, dict) for s in stages):
        return "completed run without a non-empty 'stages' list of objects"
    student = student_stage(data)
    if not _is_number(student.get("test_acc", (data.get("final") or {}).get("test_acc"))):
        return f"student stage {student.get('name')!r} has no numeric test_acc"
    return None


def load_runs(paths: Iterable[str | os.PathLike], skipped: list | None = None) -> list[dict]:
    """Parse every results.json under ``paths``; each run dict gets ``_path`` and ``_dir``.

    Corrupted files are skipped with a warning (and appended as ``(path, reason)`` to ``skipped``);
    ConfigError if no results.json exists or none is valid. Failed runs are kept (status != completed).
    """
    runs = []
    files = find_results(paths)
    for f in files:
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
            reason = _check_run(data)
        except json.JSONDecodeError as e:
            reason = f"invalid JSON ({e})"
        except (OSError, UnicodeDecodeError) as e:
            reason = f"unreadable ({type(e).__name__}: {e})"
        if reason:
            warn(f"skipping corrupted {f}: {reason}")
            if skipped is not None:
                skipped.append((str(f), reason))
            continue
        data["_path"], data["_dir"] = str(f), str(f.parent)
        runs.append(data)
    if not runs:
        raise ConfigError(f"no valid {RESULTS_NAME} among {len(files)} file(s); all were corrupted")
    return runs


# ------------------------------------------------------------------------------------------- run access

def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def student_stage(run: dict) -> dict:
    """The final stage: the one named by ``final.stage``, else the last one."""
    stages = run.get("stages") or []
    name = (run.get("final") or {}).get("stage")
    for s in stages:
        if s.get("name") == name:
            return s
    return stages[-1] if stages else {}


def _parse_scalar(text: str) -> object:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return text


_MISSING = object()


def get_field(run: dict, field: str) -> object:
    """A run's value for ``field``: top-level key, config field (flat or nested), override, or dotted path."""
    if field in run and not isinstance(run[field], (dict, list)):
        return run[field]
    config = run.get("config") or {}
    if field in config:
        return config[field]
    for source in (config, run):
        node = source
        for part in field.split("."):
            node = node.get(part, _MISSING) if isinstance(node, dict) else _MISSING
        if node is not _MISSING:
            return node
    for ov in run.get("overrides") or []:
        key, sep, value = str(ov).partition("=")
        if sep and key.lstrip("+~") == field:
            return _parse_scalar(value)
    return _MISSING


def _hashable(v: object) -> object:
    if v is _MISSING:
        return None
    return json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v


def val_curve(stage: dict, run_dir: str | None = None) -> list[float]:
    """A stage's validation accuracy per epoch: ``val_curve``, else its Lightning CSV log."""
    curve = stage.get("val_curve")
    if isinstance(curve, list) and curve:
        return [float(v) for v in curve if _is_number(v)]
    log = stage.get("csv_log")
    if not log:
        return []
    for path in (Path(log), Path(run_dir or ".") / log):
        if path.is_file():
            return read_csv_curve(path)
    return []


def read_csv_curve(path: str | os.PathLike, column: str = "val/acc") -> list[float]:
    """Per-epoch ``val/acc`` from a Lightning CSVLogger metrics.csv (last value logged per epoch)."""
    by_epoch: dict[int, float] = {}
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            for i, row in enumerate(csv.DictReader(fh)):
                value = row.get(column) or row.get(column.replace("/", "_"))
                if value in (None, ""):
                    continue
                epoch = row.get("epoch")
                by_epoch[int(float(epoch)) if epoch not in (None, "") else i] = float(value)
    except (OSError, ValueError, csv.Error) as e:
        warn(f"cannot read CSV log {path}: {e}")
        return []
    return [by_epoch[e] for e in sorted(by_epoch)]


def val_fluctuation(curve: Sequence[float], last_k: int = DEFAULT_LAST_K) -> float | None:
    """Mean |acc[e] - acc[e-1]| over the last ``last_k`` epochs (``last_k - 1`` differences)."""
    tail = list(curve)[-last_k:]
    if len(tail) < 2:
        return None
    return sum(abs(b - a) for a, b in itertools.pairwise(tail)) / (len(tail) - 1)


def _grid_epoch(path: Path) -> int | None:
    """NNN of ``epoch_NNN.png`` (0-based, as the module writes it), None for any other name."""
    digits = path.stem.removeprefix("epoch_")
    return int(digits) if path.stem.startswith("epoch_") and digits.isdigit() else None


def generated_grids(run: dict) -> list[dict]:
    """The last grid of generated images of each data-free stage of ``run`` (``data_free: true`` in its
    results.json): ``{"stage", "epochs", "cached", "path" (None when the run directory has none), "epoch"
    (0-based, from the file name)}``. A stage reused from the store (``cached``) was trained, and its grids
    written, by another run: its entry then has no path."""
    out = []
    for s in run.get("stages") or []:
        if not isinstance(s, dict) or s.get("data_free") is not True:
            continue
        folder = Path(run.get("_dir") or ".") / GENERATED_DIR / str(s.get("name"))
        grids = sorted(((e, p) for p in (folder.glob("epoch_*.png") if folder.is_dir() else [])
                        if (e := _grid_epoch(p)) is not None and p.is_file()), key=lambda t: t[0])
        epoch, path = grids[-1] if grids else (None, None)
        out.append({"stage": str(s.get("name")), "epochs": s.get("epochs"), "cached": bool(s.get("cached")),
                    "path": str(path) if path is not None else None, "epoch": epoch})
    return out


def _run_label(run: dict) -> str:
    return f"{run.get('experiment') or run.get('method') or '-'}, seed {run.get('seed', '-')}"


# ----------------------------------------------------------------------------------------- aggregation

def stats(values: Iterable[float | None]) -> dict:
    """n, mean, sample std (None when n < 2), min, max, range of the numeric values."""
    v = [float(x) for x in values if _is_number(x)]
    if not v:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None, "range": None}
    return {"n": len(v), "mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else None,
            "min": min(v), "max": max(v), "range": max(v) - min(v)}


def _sort_key(values: tuple) -> tuple:
    return tuple((2, "") if v is None else (0, v) if _is_number(v) else (1, str(v)) for v in values)


def group_label(fields: dict) -> str:
    if list(fields) == ["method"]:
        return str(fields["method"])
    return ", ".join(f"{k}={'-' if v is None else v}" for k, v in fields.items())


def known_fields(runs: list[dict]) -> list[str]:
    names: dict[str, None] = {}
    for r in runs:
        names.update({k: None for k in TOP_LEVEL_FIELDS if k in r})
        names.update({k: None for k in (r.get("config") or {})})
        names.update({str(o).partition("=")[0].lstrip("+~"): None for o in r.get("overrides") or []})
    return list(names)


def _merge_order(chains: Iterable[list[str]]) -> list[str]:
    """One order of stage names consistent with every chain (teacher first, student last)."""
    order: list[str] = []
    for chain in chains:
        pos = -1
        for name in chain:
            if name in order:
                pos = order.index(name)
            else:
                pos += 1
                order.insert(pos, name)
    return order


def aggregate(runs: list[dict], by: Sequence[str] = DEFAULT_BY, last_k: int = DEFAULT_LAST_K) -> list[dict]:
    """One row per group of runs. Completed runs give the statistics; failed ones are counted."""
    by = list(by)
    for f in by:
        if all(get_field(r, f) is _MISSING for r in runs):
            raise ConfigError(f"unknown --by field {f!r}: no run has it; known: {', '.join(known_fields(runs))}")
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault(tuple(_hashable(get_field(r, f)) for f in by), []).append(r)
    rows = []
    for key in sorted(groups, key=_sort_key):
        members = groups[key]
        done = [r for r in members if r.get("status") == "completed"]
        students = [student_stage(r) for r in done]
        fields = dict(zip(by, key))
        row = {"group": group_label(fields), "fields": fields, "n": len(done),
               "n_failed": len(members) - len(done), "last_k": last_k,
               "student_stage": students[0].get("name") if students else None}
        best = [s.get("test_acc", (r.get("final") or {}).get("test_acc")) for r, s in zip(done, students)]
        # a data-free student reports its last epoch as test_acc; the epoch picked on the real validation
        # split (a use of data) is its test_acc_best_val. For every other stage the two are the same.
        best_val = [s.get("test_acc_best_val", b) if s.get("data_free") else b for s, b in zip(students, best)]
        row["data_free"] = any(s.get("data_free") is True for s in students)
        row["accuracies"] = [(r.get("seed"), b) for r, b in zip(done, best)]  # (seed, acc): kdlab.paired
        for prefix, values in (("student_test_acc", best),
                               ("student_test_acc_last", [s.get("test_acc_last") for s in students]),
                               ("student_test_acc_best_val", best_val)):
            row.update({f"{prefix}_{k}": v for k, v in stats(values).items() if k != "n"})
        params = stats(s.get("params") for s in students)["mean"]
        row["student_params"] = None if params is None else round(params)
        size = stats(s.get("size_bytes") for s in students)["mean"]  # at the student's bit-widths
        row["student_size_bytes"] = None if size is None else round(size)
        bits = {(s.get("weight_bits"), s.get("act_bits")) for s in students if s.get("weight_bits") is not None}
        row["student_bits"] = ", ".join(f"W{w} A{a}" for w, a in sorted(bits)) or None
        row["wall_seconds_mean"] = stats(r.get("wall_seconds") for r in done)["mean"]
        curves: dict[str, list[list[float]]] = {}
        for r in done:
            for s in r.get("stages") or []:
                curves.setdefault(str(s.get("name")), []).append(val_curve(s, r.get("_dir")))
        student_curves = [val_curve(s, r.get("_dir")) for r, s in zip(done, students)]
        fl = stats(val_fluctuation(c, last_k) for c in student_curves)
        row.update(val_fluct_mean=fl["mean"], val_fluct_std=fl["std"], val_fluct_max=fl["max"],
                   val_fluct_n=fl["n"])
        chain = _merge_order([[str(s.get("name")) for s in r.get("stages") or []] for r in done])
        row["stages"] = {}
        for name in chain:
            st = [s for r in done for s in r.get("stages") or [] if str(s.get("name")) == name]
            acc = stats(s.get("test_acc") for s in st)
            row["stages"][name] = {"role": st[0].get("role"), "mean": acc["mean"], "std": acc["std"],
                                   "n": acc["n"], "params": st[0].get("params")}
        row["val_curves"] = curves
        row["generated_grids"] = [g["path"] for r in done for g in generated_grids(r) if g["path"]]
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------ formatting

def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def pct_pm(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    return f"{100 * mean:.2f} ± {'-' if std is None else f'{100 * std:.2f}'}"


def fmt_params(n: float | None) -> str:
    # not Lightning's get_human_readable_count: importing it loads all of pytorch_lightning (~5 s), which
    # `python -m kdlab.compare` otherwise never needs
    if n is None:
        return "-"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K" if n >= 1e3 else str(int(n))


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} KB" if n >= 1e3 else f"{int(n)} B"


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 60:
        return f"{s:.1f}s"
    m, sec = divmod(round(s), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{sec:02d}s"


def all_stage_names(rows: list[dict]) -> list[str]:
    return _merge_order([list(r["stages"]) for r in rows])


def _source_stages(rows: list[dict]) -> list[str]:
    students = {r["student_stage"] for r in rows}
    return [n for n in all_stage_names(rows) if n not in students]


def table_specs(rows: list[dict], by: Sequence[str], paired: list[dict] | None = None
                ) -> dict[str, tuple[list[str], list[list[str]]]]:
    """The printed/HTML tables as (header, rows of strings); one place serves the terminal and HTML;
    ``paired``: the results of :func:`kdlab.paired.paired_table` (``--baseline`` / ``--pairs``)."""
    k = rows[0]["last_k"] if rows else DEFAULT_LAST_K
    names = all_stage_names(rows)

    def keys(r: dict) -> list[str]:
        return ["-" if r["fields"][f] is None else str(r["fields"][f]) for f in by]

    acc_head = [*by, "n", "failed", "student test acc %", "last-epoch acc %", "min", "max", "range",
                "student params", "wall time"]
    acc = [[*keys(r), str(r["n"]), str(r["n_failed"]),
            pct_pm(r["student_test_acc_mean"], r["student_test_acc_std"]),
            pct_pm(r["student_test_acc_last_mean"], r["student_test_acc_last_std"]),
            pct(r["student_test_acc_min"]), pct(r["student_test_acc_max"]), pct(r["student_test_acc_range"]),
            fmt_params(r["student_params"]), fmt_seconds(r["wall_seconds_mean"])] for r in rows]
    stage_head = [*by, *[f"{s} acc %" for s in names]]
    stage = [[*keys(r), *[pct_pm(r["stages"][s]["mean"], r["stages"][s]["std"]) if s in r["stages"] else "-"
                          for s in names]] for r in rows]
    stab_head = [*by, "n", "final acc mean %", "std (pp)", "range max-min (pp)", "last-epoch std (pp)",
                 "last-epoch range (pp)", f"val fluct. last {k} ep. (pp)", "max fluct. (pp)"]
    stab = [[*keys(r), str(r["n"]),
             pct(r["student_test_acc_mean"]), pct(r["student_test_acc_std"]),
             pct(r["student_test_acc_range"]), pct(r["student_test_acc_last_std"]),
             pct(r["student_test_acc_last_range"]), pct_pm(r["val_fluct_mean"], r["val_fluct_std"]),
             pct(r["val_fluct_max"])] for r in rows]
    tables = {"Student accuracy": (acc_head, acc), "Stages": (stage_head, stage), "Stability": (stab_head, stab)}
    if paired:
        from kdlab.paired import table_rows

        tables[PAIRED_TITLE] = table_rows(paired)
    return tables


STABILITY_NOTE = ("student's final (best-on-val; a data-free student's: last epoch) test accuracy over runs; "
                  "fluctuation = mean |Δ val acc| between consecutive epochs over the last {k} epochs, in "
                  "percentage points, averaged over runs")
STAGES_NOTE = "test accuracy of every stage, mean ± std over runs"


def data_free_note(rows: list[dict]) -> str | None:
    """What "student test acc" means for the data-free groups, with their best-on-val numbers; None if none."""
    free = [r for r in rows if r.get("data_free")]
    if not free:
        return None
    best = "; ".join(f"{r['group']} {pct_pm(r['student_test_acc_best_val_mean'], r['student_test_acc_best_val_std'])}"
                     for r in free)
    return ("data-free students (" + ", ".join(r["group"] for r in free) + "): their student test acc is the "
            "last epoch's, since choosing an epoch on the real validation split is a use of data; their "
            f"best-on-val test accuracy, for comparison only: {best}")


def table_note(title: str, rows: list[dict]) -> str | None:
    """The note under one of :func:`table_specs`' tables (None: none)."""
    if title == "Stability":
        return STABILITY_NOTE.format(k=rows[0]["last_k"] if rows else DEFAULT_LAST_K)
    if title == "Stages":
        return STAGES_NOTE
    if title == "Student accuracy":
        return data_free_note(rows)  # group names are data: never passed through str.format
    return None


def grid_rows(runs: list[dict]) -> list[list[str]]:
    """run, stage, last grid (or why there is none) for every data-free stage of the completed runs."""
    out = []
    for r in runs:
        if r.get("status") != "completed":
            continue
        for g in generated_grids(r):
            where = g["path"] or ("none here: the stage was reused from the store, its grids are in the run "
                                  "that trained it" if g["cached"] else "none found in the run directory")
            out.append([_run_label(r), g["stage"], where])
    return out


GRID_HEAD = ["run", "stage", "last generated grid"]


def failed_rows(runs: list[dict], root: str | os.PathLike | None = None) -> list[list[str]]:
    return [[str(r.get("method", "-")), str(r.get("seed", "-")), str(r.get("status", "missing")),
             str(r.get("error") or "(no error recorded)"), relative_to(r["_path"], root)]
            for r in runs if r.get("status") != "completed"]


FAILED_HEAD = ["method", "seed", "status", "error", "results.json"]


def print_report(rows: list[dict], runs: list[dict], by: Sequence[str], skipped: list, console=None,
                 paired: list[dict] | None = None) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    if console is None:
        wide = not sys.stdout.isatty() and "COLUMNS" not in os.environ
        console = Console(width=180 if wide else None, highlight=False)
    n_done = sum(r.get("status") == "completed" for r in runs)
    console.print(f"[bold]{len(runs)} run(s)[/]: {n_done} completed, {len(runs) - n_done} failed, "
                  f"{len(skipped)} corrupted file(s) skipped; grouped by {', '.join(by)}")
    for title, (head, body) in table_specs(rows, by, paired).items():
        note = table_note(title, rows)
        table = Table(title=title, title_justify="left", title_style="bold",
                      caption=escape(note) if note else None, caption_justify="left")
        for i, h in enumerate(head):  # wrap (never crop) when the terminal is narrow
            table.add_column(h, justify="left" if i < len(by) else "right", overflow="fold")
        for line in body:
            table.add_row(*line)
        console.print(table)
    grids = grid_rows(runs)
    if grids:
        table = Table(title="Generated images (data-free stages; embedded in comparison.html)",
                      title_justify="left", title_style="bold")
        for h in GRID_HEAD:
            table.add_column(h, overflow="fold")
        for line in grids:
            table.add_row(*map(escape, line))  # paths and names are data, not rich markup
        console.print(table)
    failed = failed_rows(runs)
    if failed:
        table = Table(title=f"Failed runs ({len(failed)})", title_justify="left", title_style="bold red")
        for h in FAILED_HEAD:
            table.add_column(h, overflow="fold")
        for line in failed:
            table.add_row(*line)
        console.print(table)


# ---------------------------------------------------------------------------------------------- output

def csv_columns(rows: list[dict], by: Sequence[str]) -> list[str]:
    stat = ("mean", "std", "min", "max", "range")
    stage_cols = [f"acc_{s}_{k}" for s in all_stage_names(rows) for k in ("mean", "std")]
    return ["group", *by, "n", "n_failed", "student_stage",
            *[f"student_test_acc_{k}" for k in stat], *[f"student_test_acc_last_{k}" for k in stat],
            *stage_cols, "student_params", "student_size_bytes", "student_bits", "wall_seconds_mean", "last_k",
            "val_fluct_mean", "val_fluct_std", "val_fluct_max",
            # data-free students: student_test_acc_* is their last epoch; this is the best-on-val epoch's
            "data_free", "student_test_acc_best_val_mean", "student_test_acc_best_val_std", "generated_grids"]


def write_csv(rows: list[dict], by: Sequence[str], path: str | os.PathLike) -> None:
    """One row per group; accuracies as fractions (as in results.json), empty where undefined;
    ``generated_grids``: the last grid of each of the group's data-free runs, ``;``-separated."""
    cols = csv_columns(rows, by)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        for r in rows:
            flat = {**r, **r["fields"], "generated_grids": ";".join(r.get("generated_grids") or []) or None}
            for name, s in r["stages"].items():
                flat[f"acc_{name}_mean"], flat[f"acc_{name}_std"] = s["mean"], s["std"]
            w.writerow({c: "" if flat.get(c) is None else flat[c] for c in cols})


_CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"DejaVu Sans",Arial,sans-serif;margin:24px auto;
max-width:1200px;padding:0 16px;color:#1f2328;background:#fff}
h1{font-size:1.6em;margin-bottom:4px}h2{font-size:1.2em;margin-top:28px;border-bottom:1px solid #d0d7de;
padding-bottom:4px}.meta{color:#57606a;font-size:.9em}
table{border-collapse:collapse;margin:8px 0 16px;font-size:.9em}
th,td{border:1px solid #d0d7de;padding:4px 10px;text-align:right;white-space:nowrap}
th{background:#f6f8fa;font-weight:600;white-space:normal;vertical-align:bottom}.scroll{overflow-x:auto}td.key{text-align:left;font-weight:600}
tr:nth-child(even) td{background:#fafbfc}table.text td,table.text th{text-align:left}td.wrap{white-space:normal;text-align:left;max-width:520px}
.fail td{background:#fff5f5!important}figure{margin:12px 0 24px}figure img{max-width:100%;
border:1px solid #d0d7de}figcaption{color:#57606a;font-size:.9em}.warn{color:#9a6700}
.grids{display:flex;flex-wrap:wrap;gap:16px}.grids figure{margin:4px 0;max-width:360px}
.grids img{width:320px;image-rendering:pixelated}.grids figcaption{overflow-wrap:anywhere}
"""


def _html_table(head: list[str], body: list[list[str]], n_keys: int = 1, cls: str = "",
                wrap: Sequence[int] = ()) -> str:
    e = html.escape
    out = [f'<table class="{cls}"><thead><tr>' + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr></thead><tbody>"]
    for line in body:
        cells = []
        for i, v in enumerate(line):
            c = "key" if i < n_keys else "wrap" if i in wrap else ""
            cells.append(f'<td class="{c}">{e(v)}</td>' if c else f"<td>{e(v)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "<div class='scroll'>" + "".join(out) + "</tbody></table></div>"


def relative_to(path: str | os.PathLike, root: str | os.PathLike | None) -> str:
    """``path`` relative to ``root`` when it lies under it (so a committed page names no machine's paths)."""
    if root is None:
        return str(path)
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return str(path)


def common_root(paths: Sequence[str | os.PathLike]) -> Path | None:
    """The deepest directory holding every one of ``paths`` (None without paths)."""
    if not paths:
        return None
    resolved = [Path(p).resolve() for p in paths]
    return Path(os.path.commonpath([p if p.is_dir() else p.parent for p in resolved]))


def source_commit() -> str | None:
    """The git commit of the kdlab checkout that renders the page (None outside a git checkout)."""
    import subprocess

    here = Path(__file__).resolve().parent.parent
    if not (here / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def provenance(runs: list[dict], command: str | None) -> str:
    """One line: the command that made the page, the kdlab commit, the environment the runs recorded."""
    envs = {(e.get("torch"), e.get("cpu"), e.get("gpu")) for r in runs for e in [r.get("environment") or {}]
            if e}
    env = "; ".join(f"torch {t}, CPU {c or '?'}, GPU {g or 'none'}" for t, c, g in sorted(envs, key=str)) or "not recorded"
    return (f"Command: `{command or 'python -m kdlab.compare'}`; page written at kdlab commit "
            f"{source_commit() or 'unknown'}; the runs' environment: {env}.")


def render_html(rows: list[dict], runs: list[dict], by: Sequence[str], images: dict[str, bytes] | None = None,
                skipped: Sequence[tuple[str, str]] = (), title: str = "kdlab comparison",
                sources: Sequence[str] = (), paired: list[dict] | None = None, root: str | os.PathLike | None = None,
                command: str | None = None) -> str:
    """A self-contained page: inline CSS, images as base64 PNG, no scripts. Paths of runs are shown relative
    to ``root`` (default: the directory holding every source)."""
    e = html.escape
    root = root if root is not None else common_root(list(sources))
    n_done = sum(r.get("status") == "completed" for r in runs)
    parts = [(f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{e(title)}</title>"
              f"<style>{_CSS}</style></head><body><h1>{e(title)}</h1>"),
             f"<p class='meta'>{len(runs)} run(s): {n_done} completed, {len(runs) - n_done} failed, "
             f"{len(skipped)} corrupted file(s) skipped. Grouped by {e(', '.join(by))}. "
             f"Accuracies in %, mean ± sample std over runs. Generated {datetime.now():%Y-%m-%d %H:%M}"
             + (f" from {e(', '.join(relative_to(x, root) or '.' for x in sources))}" if sources else "")
             + (f" (paths relative to {e(Path(root).name)}/)" if root is not None else "") + ".</p>",
             f"<p class='meta'>{e(provenance(runs, command))}</p>"]
    for name, (head, body) in table_specs(rows, by, paired).items():
        parts.append(f"<h2>{e(name)}</h2>")
        text = table_note(name, rows)
        if text:
            parts.append(f"<p class='meta'>{e(text[0].upper() + text[1:])}.</p>")
        parts.append(_html_table(head, body, n_keys=len(by)))
    captions = {"chain": "Test accuracy of every stage along the chain (mean ± std over runs).",
                "student": "Student test accuracy per group (best-on-val and last epoch; error bars: std).",
                "val_curves": "Validation accuracy per epoch, per stage (thin: runs, thick: group mean).",
                "paired": "Paired differences of the student's test accuracy (runs sharing a seed): mean and 95% "
                          "Student-t interval; x: each seed's difference. Unpaired rows (orange) compare means."}
    if images:
        parts.append("<h2>Plots</h2>")
        for name, png in images.items():
            b64 = base64.b64encode(png).decode("ascii")
            parts.append(f"<figure><img alt='{e(name)}' src='data:image/png;base64,{b64}'>"
                         f"<figcaption>{e(captions.get(name, name))}</figcaption></figure>")
    parts.extend(grid_section(runs, root))
    failed = failed_rows(runs, root)
    parts.append(f"<h2>Failed runs ({len(failed)})</h2>")
    parts.append(_html_table(FAILED_HEAD, failed, n_keys=0, cls="text fail", wrap=(3, 4)) if failed
                 else "<p class='meta'>None.</p>")
    if skipped:
        parts.append(f"<h2 class='warn'>Skipped corrupted files ({len(skipped)})</h2>"
                     + _html_table(["file", "reason"], [list(s) for s in skipped], n_keys=0, cls="text",
                                   wrap=(0, 1)))
    keys = [*by, *(["seed"] if "seed" not in by else [])]
    k = rows[0]["last_k"] if rows else DEFAULT_LAST_K
    per_run = [[*(str(_hashable(get_field(r, f))) if get_field(r, f) is not _MISSING else "-" for f in keys),
                pct(student_stage(r).get("test_acc")), pct(student_stage(r).get("test_acc_last")),
                pct(val_fluctuation(val_curve(student_stage(r), r["_dir"]), k)),
                fmt_seconds(r.get("wall_seconds")), relative_to(r["_path"], root)] for r in runs
               if r.get("status") == "completed"]
    head = [*keys, "student test acc %", "last-epoch %", f"val fluct. last {k} (pp)", "wall time", "results.json"]
    parts.append(f"<h2>Runs</h2><details><summary>{len(per_run)} completed run(s)</summary>"
                 + _html_table(head, per_run, n_keys=len(keys), wrap=(len(head) - 1,)) + "</details>")
    parts.append("</body></html>")
    return "\n".join(parts)


def grid_section(runs: list[dict], root: str | os.PathLike | None = None) -> list[str]:
    """The last generated grid of every data-free stage, as HTML (nothing when there is none).

    The PNGs are embedded as base64 data URIs, like the plots, not linked: the page stays one
    self-contained file that still shows them when it is moved, mailed or published (docs/results/)
    without the run directories, which a study keeps elsewhere and may delete; a grid is a few tens of KB
    (64 images of 28x28 or 32x32)."""
    e = html.escape
    figures = []
    for r in runs:
        if r.get("status") != "completed":
            continue
        for g in generated_grids(r):
            what = f"{_run_label(r)}, stage {g['stage']}"
            if g["path"] is None:
                why = ("reused from the store: its grids are in the directory of the run that trained it"
                       if g["cached"] else "no generated/<stage>/epoch_*.png in its run directory")
                figures.append(f"<figure><figcaption>{e(what)}: no grid ({e(why)}).</figcaption></figure>")
                continue
            try:
                png = Path(g["path"]).read_bytes()
            except OSError as err:
                figures.append(f"<figure><figcaption>{e(what)}: cannot read {e(relative_to(g['path'], root))} "
                               f"({e(err.strerror or str(err))}).</figcaption></figure>")
                continue
            epochs = f" of {g['epochs']}" if g["epochs"] else ""
            figures.append(f"<figure><img alt='{e(what)}' src='data:image/png;base64,"
                           f"{base64.b64encode(png).decode('ascii')}'><figcaption>{e(what)}: epoch "
                           f"{g['epoch'] + 1}{e(epochs)} ({e(relative_to(g['path'], root))})</figcaption></figure>")
    if not figures:
        return []
    return ["<h2>Generated images</h2><p class='meta'>The last grid of generated images of each data-free "
            "stage (64 images from a fixed latent batch, min-max scaled for viewing), from its run directory.</p>"
            "<div class='grids'>" + "".join(figures) + "</div>"]


def write_outputs(rows: list[dict], runs: list[dict], by: Sequence[str], out: Path, plots: bool = True,
                  skipped: Sequence[tuple[str, str]] = (), sources: Sequence[str] = (),
                  paired: list[dict] | None = None, root: str | os.PathLike | None = None,
                  command: str | None = None) -> list[Path]:
    """comparison.csv, comparison.html and (with plots) comparison_<name>.png in ``out``; with ``paired``
    results also comparison_paired.csv and its plot."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        written = [out / "comparison.csv"]
        write_csv(rows, by, written[0])
        if paired:
            from kdlab.paired import CSV_COLUMNS, csv_row

            with open(out / "comparison_paired.csv", "w", newline="", encoding="utf-8") as fh:
                w = csv.DictWriter(fh, fieldnames=list(CSV_COLUMNS))
                w.writeheader()
                w.writerows(csv_row(r) for r in paired)
            written.append(out / "comparison_paired.csv")
        images: dict[str, bytes] = {}
        if plots:
            from kdlab.compare_plots import make_plots

            images = make_plots(rows, all_stage_names(rows))
            if paired:
                from kdlab.paired import plot as paired_plot

                images["paired"] = paired_plot(paired)
            for name, png in images.items():
                (out / f"comparison_{name}.png").write_bytes(png)
                written.append(out / f"comparison_{name}.png")
        page = render_html(rows, runs, by, images, skipped=skipped, sources=sources, paired=paired, root=root,
                           command=command)
        (out / "comparison.html").write_text(page, encoding="utf-8")
        written.append(out / "comparison.html")
    except OSError as e:
        raise KdlabError(f"cannot write the comparison to {out}: {e.strerror or e}") from e
    return written


# ------------------------------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kdlab.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+", metavar="PATH", help="run/sweep directories or results.json files")
    p.add_argument("--by", default=",".join(DEFAULT_BY),
                   help="comma-separated grouping fields: method, dataset, seed, experiment, a config field "
                        "such as distill.temperature, or an override key (default: method)")
    p.add_argument("--out", default=None, help="output dir (default: the first PATH if a directory, else cwd)")
    p.add_argument("--last-k", type=int, default=DEFAULT_LAST_K,
                   help="epochs over which the validation fluctuation is measured (default: 5)")
    p.add_argument("--baseline", default=None, metavar="FIELD=VALUE",
                   help="paired statistics of every group against this one, e.g. experiment=baseline_fashion_mnist "
                        "(runs sharing a seed are pairs: mean difference, 95%% t and bootstrap intervals, verdict)")
    p.add_argument("--pairs", action="append", default=[], metavar="A,B",
                   help="paired statistics of group A against group B (values of the --by field; repeatable)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots (CSV and HTML only)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def run(args: argparse.Namespace) -> int:
    by = [f.strip() for f in args.by.split(",") if f.strip()]
    if not by:
        raise ConfigError(f"--by needs at least one field, got {args.by!r}")
    if args.last_k < 2:
        raise ConfigError(f"--last-k must be an integer >= 2 (two epochs make one difference), got {args.last_k}")
    skipped: list[tuple[str, str]] = []
    runs = load_runs(args.paths, skipped)
    rows = aggregate(runs, by, args.last_k)
    paired = None
    if args.baseline or args.pairs:
        from kdlab.paired import paired_table

        paired = paired_table(rows, by, args.baseline, args.pairs)
    first = Path(args.paths[0])
    out = Path(args.out) if args.out else first if first.is_dir() else Path.cwd()
    try:
        print_report(rows, runs, by, skipped, paired=paired)
    except (BrokenPipeError, SystemExit):  # the reader went away (| head; rich exits then): write the files
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    import shlex

    written = write_outputs(rows, runs, by, out, plots=not args.no_plots, skipped=skipped, sources=args.paths,
                            paired=paired, command="python -m kdlab.compare " + " ".join(map(shlex.quote, argv_used(args))))
    print("wrote " + ", ".join(str(w) for w in written))
    n_failed = sum(r.get("status") != "completed" for r in runs)
    if n_failed:
        warn(f"{n_failed} of {len(runs)} run(s) failed; see the 'Failed runs' table")
    if not any(r["n"] for r in rows):
        warn("no completed run: the tables are empty")
    return 0


def argv_used(args: argparse.Namespace) -> list[str]:
    """The command line as given (for the page's provenance line)."""
    return list(getattr(args, "_argv", None) or sys.argv[1:])


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        args._argv = list(argv) if argv is not None else sys.argv[1:]
    except SystemExit as e:  # argparse: usage error (2) or --help (0)
        return int(e.code or 0)
    try:
        return run(args)
    except KdlabError as e:
        if args.debug:
            raise
        print(f"kdlab.compare: error: {e}", file=sys.stderr)
        return e.exit_code
    except Exception as e:  # one line, never a traceback without --debug
        if args.debug:
            raise
        print(f"kdlab.compare: error: {type(e).__name__}: {e} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
