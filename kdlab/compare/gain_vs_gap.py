"""Gain vs gap: does distillation help more when the teacher is further above the student?

A capacity-gap study (``studies/capacity_gap.yaml``) has one part per student size, each with the student
trained alone (its ``baseline``) and the methods, all taught by one teacher. Per part:

* gap = the teacher's test accuracy minus the student-alone mean (pp), the x of the figure;
* gain = each method's paired difference to the student alone over the seeds both ran (:mod:`kdlab.compare.paired`):
  its mean, 95 % t interval (and bootstrap interval for n >= 5), wins and verdict, the y with error bars.

Written as ``gain_vs_gap.{csv,md,png}`` next to the study's tables. The study config names it::

    gain_vs_gap: {baseline: gap_alone_fashion_mnist, teacher_stage: teacher,
                  methods: [gap_kd_fashion_mnist, gap_takd_fashion_mnist, ...], labels: {gap_kd_fashion_mnist: KD}}
"""
from __future__ import annotations

import csv
import io
import textwrap
from pathlib import Path
from typing import Any

from kdlab.compare.paired import fmt_ci, pp

CSV_COLUMNS = ("part", "method", "student_alone", "teacher", "gap", "gain", "ci_t_low", "ci_t_high",
               "ci_bootstrap_low", "ci_bootstrap_high", "n", "wins", "verdict")


def part_point(part: str, rows: list[dict], paired: list[dict], cfg: dict[str, Any]) -> list[dict]:
    """The figure's points of one part: one per method that ran and was paired with the student alone."""
    base_name, stage = str(cfg["baseline"]), str(cfg.get("teacher_stage", "teacher"))
    base = next((r for r in rows if str(r["fields"].get("experiment")) == base_name and r["n"]), None)
    teachers = [r["stages"][stage]["mean"] for r in rows if r["n"] and stage in r.get("stages", {})]
    if base is None or not teachers:
        return []
    alone = base.get("student_test_acc_best_val_mean", base["student_test_acc_mean"])
    teacher = teachers[0]
    vs = {r["group"].split("=", 1)[-1]: r for r in paired if r["baseline"] == f"experiment={base_name}"}
    out = []
    for method in cfg.get("methods") or []:
        r = vs.get(str(method))
        if r is None or r["mean"] is None:
            continue
        t, b = r["ci_t"] or (None, None), r["ci_bootstrap"] or (None, None)
        out.append({"part": part, "method": str(method), "student_alone": alone, "teacher": teacher,
                    "gap": teacher - alone, "gain": r["mean"], "ci_t_low": t[0], "ci_t_high": t[1],
                    "ci_bootstrap_low": b[0], "ci_bootstrap_high": b[1], "n": r["n"], "wins": r["wins"],
                    "verdict": r["verdict"]})
    return out


def points(collected: dict[str, tuple[list[dict], list[dict]]], cfg: dict[str, Any]) -> list[dict]:
    """Every part's points, smallest gap first."""
    pts = [p for part, (rows, paired) in collected.items() for p in part_point(part, rows, paired, cfg)]
    return sorted(pts, key=lambda p: (p["gap"], p["part"]))


def label(cfg: dict[str, Any], method: str) -> str:
    return str((cfg.get("labels") or {}).get(method, method))


def markdown(pts: list[dict], cfg: dict[str, Any]) -> str:
    """One row per student size (its gap), one column per method: paired gain [95 % t CI], wins of n, verdict."""
    methods = [str(m) for m in cfg.get("methods") or [] if any(p["method"] == str(m) for p in pts)]
    parts = list(dict.fromkeys(p["part"] for p in pts))
    head = ["student (part)", "student alone %", "teacher %", "gap (pp)",
            *[f"{label(cfg, m)}: gain (pp) [95% CI], wins" for m in methods]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for part in parts:
        mine = {p["method"]: p for p in pts if p["part"] == part}
        first = next(iter(mine.values()))
        cells = [part, f"{100 * first['student_alone']:.2f}", f"{100 * first['teacher']:.2f}",
                 f"{100 * first['gap']:.2f}"]
        for m in methods:
            p = mine.get(m)
            ci = None if p is None or p["ci_t_low"] is None else (p["ci_t_low"], p["ci_t_high"])
            cells.append("-" if p is None else f"{pp(p['gain'])} {fmt_ci(ci)}, {p['wins']}/{p['n']}, {p['verdict']}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


#: the figure's y axis turns symmetric-logarithmic when some gain or interval end lies beyond WIDE_PP, linear
#: within ±SYMLOG_LINEAR_PP (where the methods that did not diverge lie)
WIDE_PP, SYMLOG_LINEAR_PP = 10.0, 2.0


def y_scale(pts: list[dict]) -> str:
    """``"symlog"`` when a gain or an end of its interval is more than WIDE_PP points from 0, else ``"linear"``."""
    ends = [100 * abs(p[k]) for p in pts for k in ("gain", "ci_t_low", "ci_t_high") if p.get(k) is not None]
    return "symlog" if ends and max(ends) > WIDE_PP else "linear"


def plot(pts: list[dict], cfg: dict[str, Any]) -> bytes:
    """x: the gap (pp), y: each method's paired gain over the student alone (pp) with its 95 % t interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [str(m) for m in cfg.get("methods") or [] if any(p["method"] == str(m) for p in pts)]
    gaps = sorted({p["gap"] for p in pts})
    span = (max(gaps) - min(gaps)) if len(gaps) > 1 else 1.0
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, m in enumerate(methods):
        mine = sorted((p for p in pts if p["method"] == m), key=lambda p: p["gap"])
        dx = (i - (len(methods) - 1) / 2) * 0.012 * span * 100  # side by side, so the intervals do not overlap
        xs = [100 * p["gap"] + dx for p in mine]
        ys = [100 * p["gain"] for p in mine]
        lo = [100 * (p["gain"] - p["ci_t_low"]) if p["ci_t_low"] is not None else 0 for p in mine]
        hi = [100 * (p["ci_t_high"] - p["gain"]) if p["ci_t_high"] is not None else 0 for p in mine]
        ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=label(cfg, m), color=f"C{i}")
    ax.axhline(0, color="0.3", lw=0.8)
    ax.set_xlabel("capacity gap: teacher minus student-alone test accuracy (pp)")
    ylabel = "paired gain over the student alone (pp)"
    if y_scale(pts) == "symlog":  # one method far off (a student that diverged) would flatten every other onto 0
        ax.set_yscale("symlog", linthresh=SYMLOG_LINEAR_PP, linscale=1)
        lo, hi = ax.get_ylim()
        ticks = [v for v in (-100, -50, -20, -10, -5, -2, -1, 0, 1, 2, 5, 10, 20, 50, 100) if lo <= v <= hi]
        ax.set_yticks(ticks, [f"{v:+g}" if v else "0" for v in ticks])
        ylabel += f"\nlinear within ±{SYMLOG_LINEAR_PP:g}, logarithmic beyond"
    ax.set_ylabel(ylabel, fontsize=9)
    title = str(cfg.get("title") or "gain vs gap")
    ax.set_title(textwrap.fill(f"{title} (mean over seeds, 95% t interval)", 90), fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write(pts: list[dict], cfg: dict[str, Any], out: Path, plots: bool = True) -> list[Path]:
    """``gain_vs_gap.csv`` and ``.md`` (and ``.png`` with plots) under ``out``; the files written."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "gain_vs_gap.csv", out / "gain_vs_gap.md"]
    with open(written[0], "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        w.writeheader()
        w.writerows(pts)
    written[1].write_text(markdown(pts, cfg), encoding="utf-8")
    if plots and pts:
        written.append(out / "gain_vs_gap.png")
        written[2].write_bytes(plot(pts, cfg))
    return written
