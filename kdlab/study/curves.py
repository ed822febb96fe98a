"""A study's convergence figure (its ``curves`` block): for each part, one stage's training accuracy per epoch
(dashed: the augmented batches in training mode, as trained) and validation accuracy (solid), each the mean over
the seeds, and the stage's mean test accuracy as a dotted line at the same colour, for the experiments the block
names. It shows what the converged study claims of its students: the training curve flat at the end and above
the test accuracy. kdlab.compare's per-part val-curve plot draws every row and seed; this one draws a few rows,
averaged, so that the two curves can be read.

    curves:
      title: "..."
      stage: student
      experiments: [conv_alone_fashion_mnist, conv_kd_fashion_mnist]
      labels: {conv_alone_fashion_mnist: alone, conv_kd_fashion_mnist: KD}
"""
from __future__ import annotations

import io
import textwrap
from typing import Any


def mean_curve(curves: list[list[float]]) -> list[float]:
    """The epoch-wise mean of per-seed curves, over the epochs every seed has."""
    curves = [c for c in curves if c]
    n = min((len(c) for c in curves), default=0)
    return [sum(c[i] for c in curves) / len(curves) for i in range(n)]


def series(collected: dict[str, tuple[list[dict], list[dict]]], cfg: dict[str, Any]) -> dict[str, dict[str, dict]]:
    """{part: {experiment: {"train": [...], "val": [...], "test": mean test accuracy, "n": seeds}}} for the
    experiments of ``cfg`` found in each part's rows (kdlab.compare.runs.aggregate's), fractions as recorded."""
    stage = str(cfg.get("stage", "student"))
    wanted = [str(e) for e in cfg.get("experiments") or []]
    out: dict[str, dict[str, dict]] = {}
    for part, (rows, _paired) in collected.items():
        mine = {}
        for row in rows:
            exp = str(row["fields"].get("experiment"))
            if exp not in wanted:
                continue
            val = mean_curve(row.get("val_curves", {}).get(stage, []))
            train = mean_curve(row.get("train_curves", {}).get(stage, []))
            if val or train:
                mine[exp] = {"train": train, "val": val, "test": row.get("student_test_acc_best_val_mean"),
                             "n": row.get("n")}
        if mine:
            out[part] = {e: mine[e] for e in wanted if e in mine}
    return out


def plot(data: dict[str, dict[str, dict]], cfg: dict[str, Any]) -> bytes:
    """One panel per part: training (dashed) and validation (solid) accuracy per epoch, test accuracy (dotted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = cfg.get("labels") or {}
    parts = list(data)
    fig, axes = plt.subplots(1, len(parts), figsize=(5.2 * len(parts), 4.0), squeeze=False, sharey=True)
    for ax, part in zip(axes[0], parts):
        for i, (exp, s) in enumerate(data[part].items()):
            color, name = f"C{i}", str(labels.get(exp, exp))
            if s["val"]:
                ax.plot(range(1, len(s["val"]) + 1), [100 * v for v in s["val"]], "-", color=color, lw=1,
                        alpha=0.8, label=f"{name}: validation")
            if s["train"]:
                ax.plot(range(1, len(s["train"]) + 1), [100 * v for v in s["train"]], "--", color=color, lw=1.6,
                        label=f"{name}: training")
            if s["test"] is not None:
                ax.axhline(100 * s["test"], color=color, ls=":", lw=1.4, label=f"{name}: test")
        ax.set_title(str((cfg.get("parts") or {}).get(part, part)), fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy (%), mean over seeds")
    lo = min((100 * v for p in data.values() for s in p.values() for k in ("train", "val")
              for v in s[k][len(s[k]) // 4:]), default=0.0)
    axes[0][0].set_ylim(max(0.0, lo - 2), None)  # the first quarter (lr 0.05, far below) would flatten the end
    fig.suptitle(textwrap.fill(str(cfg.get("title") or "training and validation curves"), 120), fontsize=9)
    handles, names = axes[0][0].get_legend_handles_labels()  # one legend below the panels: the curves' ends free
    fig.legend(handles, names, loc="lower center", ncol=len(data[parts[0]]), fontsize=7, frameon=False)
    rows = 3  # a legend row per kind of line (validation, training, test)
    fig.tight_layout(rect=(0, 0.035 * rows + 0.02, 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
