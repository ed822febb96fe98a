"""The plots of ``kdlab.compare``, drawn with matplotlib's object API on the Agg canvas (no GUI, no pyplot
global state), returned as PNG bytes so the HTML can embed them."""
from __future__ import annotations

import io
import math

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", facecolor="white")
    return buf.getvalue()


def plot_chain(rows: list[dict], order: list[str]) -> bytes:
    """Test accuracy of every stage along the chain, one line per group; ``order``: stage names, in order."""
    fig = Figure(figsize=(max(6.0, 1.3 * len(order) + 3), 4.2))
    ax = fig.add_subplot()
    for r, color in zip(rows, _colors(len(rows))):
        pts = [(order.index(n), s["mean"] * 100, (s["std"] or 0) * 100)
               for n, s in r["stages"].items() if s["mean"] is not None]
        if pts:
            x, y, e = zip(*pts)
            ax.errorbar(x, y, yerr=e, marker="o", capsize=3, color=color, label=f"{r['group']} (n={r['n']})")
    ax.set_xticks(range(len(order)), order)
    ax.set_xlabel("stage (teacher → student)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Accuracy along the chain")
    ax.grid(alpha=0.3)
    if rows:
        ax.legend(fontsize=8, loc="best")
    return _png(fig)


def tick_label(row: dict) -> str:
    """A group's axis label: the value alone when the runs are grouped by one field (``dgkd``, not
    ``method=dgkd``)."""
    fields = row.get("fields") or {}
    return str(next(iter(fields.values()))) if len(fields) == 1 else str(row["group"])


def plot_student(rows: list[dict]) -> bytes:
    """Student test accuracy per group: best-on-val and last epoch, error bars = sample std. The best-on-val
    bar is that epoch's for every group, a data-free student's too (its ``test_acc_best_val``; the number it
    reports is the last epoch's)."""
    fig = Figure(figsize=(max(6.0, 0.9 * len(rows) + 3), 4.2))
    ax = fig.add_subplot()
    width = 0.38
    for offset, key, label, alpha in ((-width / 2, "student_test_acc_best_val", "best-on-val checkpoint", 0.9),
                                      (width / 2, "student_test_acc_last", "last epoch", 0.5)):
        xs = [i + offset for i, r in enumerate(rows) if r[f"{key}_mean"] is not None]
        ys = [r[f"{key}_mean"] * 100 for r in rows if r[f"{key}_mean"] is not None]
        es = [(r[f"{key}_std"] or 0) * 100 for r in rows if r[f"{key}_mean"] is not None]
        if xs:
            ax.bar(xs, ys, width, yerr=es, capsize=4, alpha=alpha, label=label, color="tab:blue")
    keys = ("student_test_acc_best_val", "student_test_acc_last")
    lows = [r[f"{k}_min"] for r in rows for k in keys if r[f"{k}_min"] is not None]
    if lows:  # zoom in on the differences instead of starting the bars at 0
        ax.set_ylim(max(0.0, min(lows) * 100 - 5), min(100.0, max(
            (r[f"{k}_max"] or 0) for r in rows for k in keys) * 100 + 3))
    labels = [f"{tick_label(r)}\n(n={r['n']})" for r in rows]
    long = max((len(t) for t in labels), default=0) > 90 / max(len(rows), 1)  # would overlap its neighbours
    ax.set_xticks(range(len(rows)), labels, fontsize=8, rotation=20 if long else 0, ha="right" if long else "center")
    ax.set_ylabel("student test accuracy (%)")
    ax.set_title("Student accuracy per group (mean ± std)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def _mean_curve(curves: list[list[float]]) -> list[float]:
    """The epoch-wise mean of runs' curves (a shorter run stops counting after its last epoch)."""
    length = max(map(len, curves))
    return [sum(c[e] for c in curves if len(c) > e) / sum(len(c) > e for c in curves) for e in range(length)]


def plot_val_curves(rows: list[dict], order: list[str]) -> bytes:
    """Validation accuracy per epoch, one panel per stage (PNG of :func:`curves_figure`)."""
    return _png(curves_figure(rows, order))


def curves_figure(rows: list[dict], order: list[str]) -> Figure:
    """Validation accuracy per epoch, one panel per stage; thin lines are runs, thick lines group means. Where
    the runs recorded it (``train_curve``), the training accuracy is drawn dashed beside it, in the group's
    colour: a stage fits its training split where the dashed line runs above the solid one."""
    order = [n for n in order if any(c for r in rows for c in r["val_curves"].get(n, []))]
    if not order:
        fig = Figure(figsize=(6, 2))
        fig.text(0.5, 0.5, "no validation curves in these runs", ha="center", va="center")
        return fig
    cols = min(3, len(order))
    nrows = math.ceil(len(order) / cols)
    fig = Figure(figsize=(4.4 * cols, 3.3 * nrows), layout="constrained")
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    for ax, name in zip(axes, order):
        any_train = False
        for r, color in zip(rows, _colors(len(rows))):
            for key, style in (("val_curves", "-"), ("train_curves", "--")):
                curves = [c for c in (r.get(key) or {}).get(name, []) if c]
                for c in curves:
                    ax.plot(range(1, len(c) + 1), [v * 100 for v in c], color=color, alpha=0.3, lw=0.8, ls=style)
                if curves:
                    mean = _mean_curve(curves)
                    train = key == "train_curves"
                    any_train |= train
                    ax.plot(range(1, len(mean) + 1), [v * 100 for v in mean], color=color, lw=2, ls=style,
                            label=f"{r['group']} (train)" if train else r["group"])
        ax.set_title(name)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy (%): val solid, train dashed" if any_train else "val accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[len(order):]:
        ax.set_visible(False)
    return fig


def make_plots(rows: list[dict], order: list[str]) -> dict[str, bytes]:
    """name -> PNG bytes for the comparison page: chain, student, val_curves (``order``: stage names)."""
    return {"chain": plot_chain(rows, order), "student": plot_student(rows),
            "val_curves": plot_val_curves(rows, order)}
