"""The tables of ``python -m kdlab.compare``: one specification (:func:`table_specs`) serves the terminal report
(rich), the HTML page (kdlab.compare.html) and, with the CSV, the files; numbers formatted once here.

Accuracies are fractions in the rows and shown as percentages.
"""
from __future__ import annotations

import csv
import os
import sys
from collections.abc import Sequence

from kdlab.compare.runs import (
    DEFAULT_LAST_K,
    DEFAULT_PROTOCOL,
    FIDELITY_METRICS,
    all_stage_names,
    generated_grids,
    has_fidelity,
    relative_to,
    run_label,
)

PAIRED_TITLE = "Paired comparison (student test accuracy, runs sharing a seed)"
FIDELITY_TITLE = "Fidelity and calibration"
PAIRED_FIDELITY_TITLE = "Paired comparison (student fidelity and calibration, runs sharing a seed)"


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def pct_pm(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    return f"{100 * mean:.2f} ± {'-' if std is None else f'{100 * std:.2f}'}"


def nats_pm(mean: float | None, std: float | None) -> str:
    """A KL divergence in nats, 3 decimals, mean ± std."""
    if mean is None:
        return "-"
    return f"{mean:.3f} ± {'-' if std is None else f'{std:.3f}'}"


def agreement_cell(agreement: dict[str, dict]) -> str:
    """The students' agreement with each source, in %: ``teacher 91.20, ta1 93.05``."""
    return ", ".join(f"{name} {pct(a['mean'])}" for name, a in agreement.items()) or "-"


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


def table_specs(rows: list[dict], by: Sequence[str], paired: list[dict] | None = None
                ) -> dict[str, tuple[list[str], list[list[str]]]]:
    """The printed/HTML tables as (header, rows of strings); one place serves the terminal and HTML;
    ``paired``: the results of :func:`kdlab.compare.paired.paired_table` (``--baseline`` / ``--pairs``)."""
    k = rows[0]["last_k"] if rows else DEFAULT_LAST_K
    names = all_stage_names(rows)

    # every number is labelled with its protocol (docs/pipelines.md#protocols): a column of its own
    key_head = [*by, *([] if "protocol" in by else ["protocol"])]

    def keys(r: dict) -> list[str]:
        own = ["-" if r["fields"][f] is None else str(r["fields"][f]) for f in by]
        return own + ([] if "protocol" in by else [str(r.get("protocol", DEFAULT_PROTOCOL))])

    acc_head = [*key_head, "n", "failed", "student test acc %", "last-epoch acc %", "best-on-test acc %", "min",
                "max", "range", "student params", "wall time"]
    acc = [[*keys(r), str(r["n"]), str(r["n_failed"]),
            pct_pm(r["student_test_acc_mean"], r["student_test_acc_std"]),
            pct_pm(r["student_test_acc_last_mean"], r["student_test_acc_last_std"]),
            pct_pm(r.get("student_test_acc_best_on_test_mean"), r.get("student_test_acc_best_on_test_std")),
            pct(r["student_test_acc_min"]), pct(r["student_test_acc_max"]), pct(r["student_test_acc_range"]),
            fmt_params(r["student_params"]), fmt_seconds(r["wall_seconds_mean"])] for r in rows]
    stage_head = [*key_head, *[f"{s} acc %" for s in names]]
    stage = [[*keys(r), *[pct_pm(r["stages"][s]["mean"], r["stages"][s]["std"]) if s in r["stages"] else "-"
                          for s in names]] for r in rows]
    stab_head = [*key_head, "n", "final acc mean %", "std (pp)", "range max-min (pp)", "last-epoch std (pp)",
                 "last-epoch range (pp)", f"val fluct. last {k} ep. (pp)", "max fluct. (pp)"]
    stab = [[*keys(r), str(r["n"]),
             pct(r["student_test_acc_mean"]), pct(r["student_test_acc_std"]),
             pct(r["student_test_acc_range"]), pct(r["student_test_acc_last_std"]),
             pct(r["student_test_acc_last_range"]), pct_pm(r["val_fluct_mean"], r["val_fluct_std"]),
             pct(r["val_fluct_max"])] for r in rows]
    tables = {"Student accuracy": (acc_head, acc), "Stages": (stage_head, stage), "Stability": (stab_head, stab)}
    if has_fidelity(rows):
        fid_head = [*key_head, "n", "student test acc %", "agreement with teacher %", "KL to teacher (nats)", "ECE %",
                    "agreement with each source %"]
        fid = [[*keys(r), str(r["n"]), pct_pm(r["student_test_acc_mean"], r["student_test_acc_std"]),
                pct_pm(r["student_agreement_teacher_mean"], r["student_agreement_teacher_std"]),
                nats_pm(r["student_kl_teacher_mean"], r["student_kl_teacher_std"]),
                pct_pm(r["student_ece_mean"], r["student_ece_std"]), agreement_cell(r["student_agreement"])]
               for r in rows]
        tables[FIDELITY_TITLE] = (fid_head, fid)
    if paired:
        from kdlab.compare.paired import fidelity_table_rows, table_rows

        tables[PAIRED_TITLE] = table_rows(paired)
        fidelity = fidelity_table_rows(paired)
        if fidelity is not None:
            tables[PAIRED_FIDELITY_TITLE] = fidelity
    return tables


STABILITY_NOTE = ("student's final (best-on-val; a data-free student's: last epoch) test accuracy over runs; "
                  "fluctuation = mean |Δ val acc| between consecutive epochs over the last {k} epochs (protocol "
                  "reference: of the test curve), in percentage points, averaged over runs")
STAGES_NOTE = "test accuracy of every stage, mean ± std over runs"
FIDELITY_NOTE = ("the student on the test split at the checkpoint it reports, mean ± std over runs: top-1 agreement "
                 "with its teacher (an ensemble: the mean of the members' softmax) and with each of its sources, "
                 "KL(p_teacher || p_student) at T = 1 averaged over test images, and its expected calibration error "
                 "(15 bins, l1); '-': not taught by sources, or a run of an older kdlab")
PAIRED_FIDELITY_NOTE = ("the same pairs as the accuracy's: mean difference of the student's agreement with its teacher "
                        "(pp), KL to it (nats) and ECE (pp), with the 95 % Student-t interval over the pairs; '-' where "
                        "a group reports none (a student without sources has no teacher); no verdict: closer to the "
                        "teacher is not more accurate")


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


PROTOCOL_NOTE = ("protocol heldout: student test acc = the best epoch on the held-out validation split; protocol "
                 "reference (the whole training split, fp32: the paper's run): student test acc = the last epoch, "
                 "best-on-test = the best test epoch (chosen on the test split, as most tables report). Runs of two "
                 "protocols are never one group and never compared with each other")


def table_note(title: str, rows: list[dict]) -> str | None:
    """The note under one of :func:`table_specs`' tables (None: none)."""
    if title == "Stability":
        return STABILITY_NOTE.format(k=rows[0]["last_k"] if rows else DEFAULT_LAST_K)
    if title == "Stages":
        return STAGES_NOTE
    if title == FIDELITY_TITLE:
        return FIDELITY_NOTE
    if title == PAIRED_FIDELITY_TITLE:
        return PAIRED_FIDELITY_NOTE
    if title == "Student accuracy":
        notes = [n for n in (data_free_note(rows),  # group names are data: never passed through str.format
                             PROTOCOL_NOTE if any(r.get("protocol", DEFAULT_PROTOCOL) != DEFAULT_PROTOCOL
                                                  for r in rows) else None) if n]
        return "; ".join(notes) or None
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
            out.append([run_label(r), g["stage"], where])
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
            table.add_column(h, justify="left" if i < len(by) + ("protocol" not in by) else "right", overflow="fold")
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
    sources = list(dict.fromkeys(name for r in rows for name in r.get("student_agreement") or {}))
    return ["group", *by, *([] if "protocol" in by else ["protocol"]), "n", "n_failed", "student_stage",
            *[f"student_test_acc_{k}" for k in stat], *[f"student_test_acc_last_{k}" for k in stat],
            # protocol=reference: the best test epoch (chosen on the test split)
            *[f"student_test_acc_best_on_test_{k}" for k in stat],
            *stage_cols, "student_params", "student_size_bytes", "student_bits", "wall_seconds_mean", "last_k",
            "val_fluct_mean", "val_fluct_std", "val_fluct_max",
            # data-free students: student_test_acc_* is their last epoch; this is the best-on-val epoch's
            "data_free", "student_test_acc_best_val_mean", "student_test_acc_best_val_std", "generated_grids",
            # fidelity (fractions; KL in nats) and calibration: the student's, its agreement with each source by
            # name, every stage's ECE
            *[f"student_{m}_{k}" for m in FIDELITY_METRICS for k in ("mean", "std")],
            *[f"student_agreement_{s}_{k}" for s in sources for k in ("mean", "std")],
            *[f"ece_{s}_{k}" for s in all_stage_names(rows) for k in ("mean", "std")]]


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
                flat[f"ece_{name}_mean"], flat[f"ece_{name}_std"] = s.get("ece_mean"), s.get("ece_std")
            for name, a in (r.get("student_agreement") or {}).items():
                flat[f"student_agreement_{name}_mean"], flat[f"student_agreement_{name}_std"] = a["mean"], a["std"]
            w.writerow({c: "" if flat.get(c) is None else flat[c] for c in cols})
