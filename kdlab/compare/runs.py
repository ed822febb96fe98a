"""Reading and grouping kdlab runs for ``python -m kdlab.compare``: every ``results.json`` under the given paths,
a run's value for any field, its stages' validation curves and generated-image grids, and :func:`aggregate`, one
row of statistics per group of runs (the rows that kdlab.compare.tables, kdlab.compare.html, kdlab.compare.plots
and kdlab.compare.paired turn into tables, pages, plots and paired statistics).

Accuracies stay fractions, as in results.json.
"""
from __future__ import annotations

import csv
import itertools
import json
import math
import os
import statistics
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from kdlab.errors import ConfigError

RESULTS_NAME = "results.json"
DEFAULT_BY = ("method",)
DEFAULT_LAST_K = 5
GENERATED_DIR = "generated"  # <run dir>/generated/<stage>/epoch_NNN.png (kdlab/modules/datafree.py)
TOP_LEVEL_FIELDS = ("method", "dataset", "seed", "experiment", "status", "kdlab_version", "protocol")
#: results.json's ``protocol`` (docs/pipelines.md#protocols); runs written before it existed were held out
DEFAULT_PROTOCOL = "heldout"
# a stage's fidelity to its teacher and calibration on the test split (results.json; kdlab/modules/fidelity.py)
FIDELITY_METRICS = ("agreement_teacher", "kl_teacher", "ece")


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
    if not is_number(student.get("test_acc", (data.get("final") or {}).get("test_acc"))):
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

def is_number(x: object) -> bool:
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


MISSING = object()


def get_field(run: dict, field: str) -> object:
    """A run's value for ``field``: top-level key, config field (flat or nested), override, or dotted path."""
    if field == "protocol":  # runs written before protocols existed were held out
        return protocol_of(run)
    if field in run and not isinstance(run[field], (dict, list)):
        return run[field]
    config = run.get("config") or {}
    if field in config:
        return config[field]
    for source in (config, run):
        node = source
        for part in field.split("."):
            node = node.get(part, MISSING) if isinstance(node, dict) else MISSING
        if node is not MISSING:
            return node
    for ov in run.get("overrides") or []:
        key, sep, value = str(ov).partition("=")
        if sep and key.lstrip("+~") == field:
            return _parse_scalar(value)
    return MISSING


def hashable(v: object) -> object:
    if v is MISSING:
        return None
    return json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v


def train_curve(stage: dict) -> list[float]:
    """A stage's per-epoch training accuracy (``train_curve``; [] for a stage recorded without one)."""
    curve = stage.get("train_curve")
    return [float(v) for v in curve if is_number(v)] if isinstance(curve, list) else []


def val_curve(stage: dict, run_dir: str | None = None) -> list[float]:
    """A stage's per-epoch evaluation: ``val_curve``, its ``test_curve`` where it has no validation split
    (protocol=reference), else its Lightning CSV log."""
    curve = stage.get("val_curve") or stage.get("test_curve")
    if isinstance(curve, list) and curve:
        return [float(v) for v in curve if is_number(v)]
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


def protocol_of(run: dict) -> str:
    """The run's protocol: ``heldout`` (a validation split chooses the epoch) or ``reference`` (the paper's run)."""
    return str(run.get("protocol") or DEFAULT_PROTOCOL)


def run_label(run: dict) -> str:
    return f"{run.get('experiment') or run.get('method') or '-'}, seed {run.get('seed', '-')}"


# ----------------------------------------------------------------------------------------- aggregation

def stats(values: Iterable[float | None]) -> dict:
    """n, mean, sample std (None when n < 2), min, max, range of the numeric values."""
    v = [float(x) for x in values if is_number(x)]
    if not v:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None, "range": None}
    return {"n": len(v), "mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else None,
            "min": min(v), "max": max(v), "range": max(v) - min(v)}


def _sort_key(values: tuple) -> tuple:
    return tuple((2, "") if v is None else (0, v) if is_number(v) else (1, str(v)) for v in values)


def group_label(fields: dict, protocol: str = DEFAULT_PROTOCOL) -> str:
    """The group's name; a group of another protocol than the default is labelled with it."""
    if list(fields) == ["method"]:
        label = str(fields["method"])
    else:
        label = ", ".join(f"{k}={'-' if v is None else v}" for k, v in fields.items())
    return label if protocol == DEFAULT_PROTOCOL or "protocol" in fields else f"{label} [{protocol}]"


def known_fields(runs: list[dict]) -> list[str]:
    names: dict[str, None] = {}
    for r in runs:
        names.update({k: None for k in TOP_LEVEL_FIELDS if k in r})
        names.update({k: None for k in (r.get("config") or {})})
        names.update({str(o).partition("=")[0].lstrip("+~"): None for o in r.get("overrides") or []})
    return list(names)


def merge_order(chains: Iterable[list[str]]) -> list[str]:
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
    """One row per group of runs. Completed runs give the statistics; failed ones are counted. Runs of two
    protocols are never one group: the protocol is part of every group's key (``row["protocol"]``)."""
    by = list(by)
    for f in by:
        if all(get_field(r, f) is MISSING for r in runs):
            raise ConfigError(f"unknown --by field {f!r}: no run has it; known: {', '.join(known_fields(runs))}")
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((protocol_of(r), *(hashable(get_field(r, f)) for f in by)), []).append(r)
    rows = []
    for key in sorted(groups, key=lambda k: (k[0] != DEFAULT_PROTOCOL, k[0], _sort_key(k[1:]))):
        members = groups[key]
        done = [r for r in members if r.get("status") == "completed"]
        students = [student_stage(r) for r in done]
        fields = dict(zip(by, key[1:]))
        row = {"group": group_label(fields, key[0]), "fields": fields, "protocol": key[0], "n": len(done),
               "n_failed": len(members) - len(done), "last_k": last_k,
               "student_stage": students[0].get("name") if students else None}
        best = [s.get("test_acc", (r.get("final") or {}).get("test_acc")) for r, s in zip(done, students)]
        # a data-free student reports its last epoch as test_acc; the epoch picked on the real validation
        # split (a use of data) is its test_acc_best_val. For every other stage the two are the same.
        best_val = [s.get("test_acc_best_val", b) if s.get("data_free") else b for s, b in zip(students, best)]
        row["data_free"] = any(s.get("data_free") is True for s in students)
        row["accuracies"] = [(r.get("seed"), b) for r, b in zip(done, best)]  # (seed, acc): kdlab.compare.paired
        # the student's fidelity and calibration: per seed for the pairs, mean and std over runs
        row["per_seed"] = {m: [(r.get("seed"), s.get(m)) for r, s in zip(done, students)] for m in FIDELITY_METRICS}
        for m in FIDELITY_METRICS:
            st = stats(s.get(m) for s in students)
            row.update({f"student_{m}_mean": st["mean"], f"student_{m}_std": st["std"], f"student_{m}_n": st["n"]})
        row["student_agreement"] = source_agreement(students)
        for prefix, values in (("student_test_acc", best),
                               ("student_test_acc_last", [s.get("test_acc_last") for s in students]),
                               ("student_test_acc_best_val", best_val),
                               # protocol=reference: the best test epoch (chosen on the test split, so named)
                               ("student_test_acc_best_on_test", [s.get("test_acc_best_on_test") for s in students])):
            row.update({f"{prefix}_{k}": v for k, v in stats(values).items() if k != "n"})
        params = stats(s.get("params") for s in students)["mean"]
        row["student_params"] = None if params is None else round(params)
        size = stats(s.get("size_bytes") for s in students)["mean"]  # at the student's bit-widths
        row["student_size_bytes"] = None if size is None else round(size)
        bits = {(s.get("weight_bits"), s.get("act_bits")) for s in students if s.get("weight_bits") is not None}
        row["student_bits"] = ", ".join(f"W{w} A{a}" for w, a in sorted(bits)) or None
        row["wall_seconds_mean"] = stats(r.get("wall_seconds") for r in done)["mean"]
        curves: dict[str, list[list[float]]] = {}
        train_curves: dict[str, list[list[float]]] = {}
        for r in done:
            for s in r.get("stages") or []:
                curves.setdefault(str(s.get("name")), []).append(val_curve(s, r.get("_dir")))
                train_curves.setdefault(str(s.get("name")), []).append(train_curve(s))
        student_curves = [val_curve(s, r.get("_dir")) for r, s in zip(done, students)]
        fl = stats(val_fluctuation(c, last_k) for c in student_curves)
        row.update(val_fluct_mean=fl["mean"], val_fluct_std=fl["std"], val_fluct_max=fl["max"],
                   val_fluct_n=fl["n"])
        chain = merge_order([[str(s.get("name")) for s in r.get("stages") or []] for r in done])
        row["stages"] = {}
        for name in chain:
            st = [s for r in done for s in r.get("stages") or [] if str(s.get("name")) == name]
            acc = stats(s.get("test_acc") for s in st)
            ece = stats(s.get("ece") for s in st)
            row["stages"][name] = {"role": st[0].get("role"), "mean": acc["mean"], "std": acc["std"],
                                   "n": acc["n"], "params": st[0].get("params"), "ece_mean": ece["mean"],
                                   "ece_std": ece["std"]}
        row["val_curves"] = curves
        row["train_curves"] = train_curves
        row["generated_grids"] = [g["path"] for r in done for g in generated_grids(r) if g["path"]]
        rows.append(row)
    return rows


def source_agreement(students: list[dict]) -> dict[str, dict]:
    """{source name: mean, std and n of the students' top-1 agreement with it}, sources in the students' order."""
    names = merge_order([[str(k) for k in s["agreement"]] for s in students if isinstance(s.get("agreement"), dict)])
    out = {}
    for name in names:
        st = stats(s["agreement"].get(name) for s in students if isinstance(s.get("agreement"), dict))
        out[name] = {"mean": st["mean"], "std": st["std"], "n": st["n"]}
    return out


def has_fidelity(rows: list[dict]) -> bool:
    """Whether any group's students report fidelity or calibration (runs of an older kdlab do not)."""
    return any(r.get(f"student_{m}_n") for r in rows for m in FIDELITY_METRICS)


def all_stage_names(rows: list[dict]) -> list[str]:
    """Every stage name of the groups' chains, in one order consistent with all of them."""
    return merge_order([list(r["stages"]) for r in rows])


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
