"""Paired statistics for ``kdlab.compare``: is a method's gain over a baseline real, or seed noise?

Two runs that share a seed are a *pair*: the same data order and, for a student with the run's seed, the same
initial weights, so most of the seed-to-seed noise cancels in their difference. For a group G against a
baseline group B (``--baseline experiment=baseline_fashion_mnist``) or between two named groups
(``--pairs dgkd,takd``), per group:

* the paired differences ``d_s = acc_G(s) - acc_B(s)`` of the student's test accuracy over the seeds s both
  groups ran, their mean, the number of pairs, wins / ties / losses;
* the 95 % confidence interval of the mean difference from Student's t over the pairs
  (``scipy.stats.ttest_1samp(d).confidence_interval``, n >= 2), and for n >= 5 a bootstrap interval too
  (``scipy.stats.bootstrap``, BCa, 9,999 resamples, a fixed seed so the page is reproducible);
* a verdict: ``better`` when the t interval lies above 0, ``worse`` below, else ``not distinguishable``
  (always so with fewer than 2 pairs).

The student's fidelity and calibration (``agreement_teacher``, ``kl_teacher``, ``ece``) are paired the same way,
each comparison's ``fidelity`` ({metric: the same statistics}, where both groups report the metric); no verdict is
drawn for them (higher agreement, lower KL and lower ECE are "closer" and "better calibrated", not more accurate).

Groups that share no seed are compared unpaired (Welch's t interval of the difference of means,
``scipy.stats.ttest_ind(equal_var=False)``) and labelled ``unpaired``; a pairing never mixes seeds. A group with
two completed runs of one seed cannot be paired (which one?) and is refused with one line.

Groups of two protocols (``heldout``, ``reference``: docs/pipelines.md#protocols) are never compared: their numbers
are measured differently (a best-on-validation epoch on less training data vs the last epoch of a run on all of
it). ``--baseline`` compares the groups of the baseline's protocol and leaves the others out with a warning;
``--pairs`` across protocols is refused with one line.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kdlab.compare.runs import FIDELITY_METRICS
from kdlab.errors import ConfigError

CONFIDENCE = 0.95
BOOTSTRAP_MIN = 5
BOOTSTRAP_RESAMPLES = 9999
BOOTSTRAP_SEED = 0
VERDICTS = ("better", "worse", "not distinguishable")


def parse_baseline(text: str, by: Sequence[str]) -> dict[str, str]:
    """``FIELD=VALUE[,FIELD=VALUE]`` (fields of ``--by``), or a bare VALUE when grouping by one field."""
    out: dict[str, str] = {}
    for part in [p.strip() for p in str(text).split(",") if p.strip()]:
        if "=" in part:
            k, v = part.split("=", 1)
            out[k.strip()] = v.strip()
        elif len(by) == 1:
            out[by[0]] = part
        else:
            raise ConfigError(f"--baseline {text!r}: name the field (FIELD=VALUE) when grouping by {', '.join(by)}")
    unknown = sorted(set(out) - set(by) - {"protocol"})  # protocol=...: the group's protocol (always a key)
    if not out or unknown:
        raise ConfigError(f"--baseline {text!r} must name the grouping field(s) {', '.join(by)} (FIELD=VALUE); "
                          f"got {', '.join(unknown) or 'nothing'}")
    return out


def find_group(rows: list[dict], want: dict[str, str], what: str) -> dict:
    """The row whose grouping fields match ``want`` (as strings); a ConfigError listing the groups otherwise."""
    hits = [r for r in rows if all(str(r["fields"].get(k, r["protocol"] if k == "protocol" else None)) == v
                                   for k, v in want.items())]
    if not hits:
        known = ", ".join(r["group"] for r in rows)
        raise ConfigError(f"{what} {', '.join(f'{k}={v}' for k, v in want.items())} matches no group; groups: {known}")
    if len(hits) > 1:
        raise ConfigError(f"{what} matches {len(hits)} groups ({', '.join(r['group'] for r in hits)}); name more fields"
                          + (" (runs of two protocols: --baseline FIELD=VALUE,protocol=heldout|reference, or give the "
                             "runs of one protocol)" if len({r['protocol'] for r in hits}) > 1 else ""))
    return hits[0]


def by_seed(row: dict, metric: str | None = None) -> dict[int, float]:
    """{seed: the student's test accuracy (or ``metric``, one of FIDELITY_METRICS)} of a group's completed runs;
    two runs of one seed are refused."""
    out: dict[int, float] = {}
    values = row.get("accuracies", []) if metric is None else (row.get("per_seed") or {}).get(metric, [])
    for seed, acc in values:
        if acc is None:
            continue
        if seed in out:
            raise ConfigError(f"group {row['group']} has two completed runs with seed {seed}: a pairing needs one "
                              f"run per seed (compare them in separate directories)")
        out[seed] = float(acc)
    return out


def no_spread(values: Sequence[float]) -> bool:
    """All values equal up to float rounding (accuracy differences such as 0.9 - 0.8 and 0.8 - 0.7)."""
    return max(values) - min(values) <= 1e-12


def t_interval(values: Sequence[float]) -> tuple[float, float] | None:
    """The 95 % Student-t interval of the mean of ``values`` (n >= 2); a zero-width one when all are equal."""
    from scipy import stats

    if len(values) < 2:
        return None
    if no_spread(values):  # t is undefined: the interval is the value itself
        m = sum(values) / len(values)
        return float(m), float(m)
    ci = stats.ttest_1samp(list(values), 0.0).confidence_interval(CONFIDENCE)
    return float(ci.low), float(ci.high)


def bootstrap_interval(values: Sequence[float]) -> tuple[float, float] | None:
    """The 95 % BCa bootstrap interval of the mean (n >= BOOTSTRAP_MIN and some spread), seeded."""
    import numpy as np
    from scipy import stats

    if len(values) < BOOTSTRAP_MIN or no_spread(values):
        return None
    res = stats.bootstrap((np.asarray(values, dtype=float),), np.mean, confidence_level=CONFIDENCE,
                          n_resamples=BOOTSTRAP_RESAMPLES, method="BCa", random_state=BOOTSTRAP_SEED)
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def verdict(ci: tuple[float, float] | None) -> str:
    if ci is None:
        return "not distinguishable"
    low, high = ci
    return "better" if low > 0 else "worse" if high < 0 else "not distinguishable"


def compare_groups(group: dict, base: dict, metric: str | None = None) -> dict[str, Any]:
    """``group`` against ``base``: paired over their shared seeds, else unpaired (module doc); the student's test
    accuracy, or ``metric``. Groups of two protocols are refused."""
    if group.get("protocol") != base.get("protocol"):
        raise ConfigError(f"cannot compare {group['group']} ({group.get('protocol')}) with {base['group']} "
                          f"({base.get('protocol')}): runs of two protocols measure their numbers differently; compare "
                          f"within one protocol (docs/compare.md#protocols)")
    g, b = by_seed(group, metric), by_seed(base, metric)
    shared = sorted(set(g) & set(b))
    out: dict[str, Any] = {"group": group["group"], "baseline": base["group"], "n_group": len(g), "n_base": len(b)}
    if shared:
        diffs = [g[s] - b[s] for s in shared]
        ci = t_interval(diffs)
        out.update(paired=True, n=len(diffs), seeds=shared, diffs=diffs, mean=sum(diffs) / len(diffs),
                   ci_t=ci, ci_bootstrap=bootstrap_interval(diffs), wins=sum(d > 0 for d in diffs),
                   ties=sum(d == 0 for d in diffs), losses=sum(d < 0 for d in diffs), verdict=verdict(ci))
        return out
    from scipy import stats

    xs, ys = list(g.values()), list(b.values())
    mean = (sum(xs) / len(xs) - sum(ys) / len(ys)) if xs and ys else None
    ci = None
    if len(xs) >= 2 and len(ys) >= 2 and not (no_spread(xs) and no_spread(ys)):
        r = stats.ttest_ind(xs, ys, equal_var=False).confidence_interval(CONFIDENCE)
        ci = (float(r.low), float(r.high))
    out.update(paired=False, n=0, seeds=[], diffs=[], mean=mean, ci_t=ci, ci_bootstrap=None, wins=None,
               ties=None, losses=None, verdict=verdict(ci))
    return out


def compare_with_fidelity(group: dict, base: dict) -> dict[str, Any]:
    """:func:`compare_groups` on the accuracy, with ``fidelity``: the same on each fidelity metric both report."""
    out = compare_groups(group, base)
    out["fidelity"] = {m: compare_groups(group, base, m) for m in FIDELITY_METRICS
                       if by_seed(group, m) and by_seed(base, m)}
    return out


def paired_table(rows: list[dict], by: Sequence[str], baseline: str | None = None,
                 pairs: Sequence[str] = ()) -> list[dict]:
    """Every group against ``--baseline`` (the baseline itself left out), then each ``--pairs A,B`` (A vs B)."""
    out: list[dict] = []
    if baseline:
        base = find_group(rows, parse_baseline(baseline, by), "--baseline")
        other = sorted({r["group"] for r in rows if r.get("protocol") != base.get("protocol")})
        if other:
            from kdlab.compare.runs import warn

            warn(f"--baseline {baseline} is a {base.get('protocol')} group: the groups of another protocol are not "
                 f"compared with it ({', '.join(other)})")
        out += [compare_with_fidelity(r, base) for r in rows
                if r is not base and r["n"] and r.get("protocol") == base.get("protocol")]
    for spec in pairs:
        names = [x.strip() for x in str(spec).split(",") if x.strip()]
        if len(names) != 2:
            raise ConfigError(f"--pairs {spec!r} must name two groups, A,B (A is compared against B)")
        a, b = (find_group(rows, parse_baseline(n, by), "--pairs") for n in names)
        out.append(compare_with_fidelity(a, b))
    return out


def pp(x: float | None) -> str:
    """A difference of accuracies (fractions) as signed percentage points."""
    return "-" if x is None else f"{100 * x:+.2f}"


def fmt_ci(ci: tuple[float, float] | None) -> str:
    return "-" if ci is None else f"[{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}]"


def nats(x: float | None) -> str:
    """A difference of KL divergences (nats), signed, 3 decimals."""
    return "-" if x is None else f"{x:+.3f}"


def fmt_ci_nats(ci: tuple[float, float] | None) -> str:
    return "-" if ci is None else f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"


def pp_cell(mean: float | None, ci: tuple[float, float] | None) -> str:
    return f"{pp(mean)} {fmt_ci(ci)}"


def nats_cell(mean: float | None, ci: tuple[float, float] | None) -> str:
    return f"{nats(mean)} {fmt_ci_nats(ci)}"


# the fidelity columns of the paired table: metric, header, cell (mean difference, 95 % t interval)
FIDELITY_COLUMNS = (("agreement_teacher", "agreement Δ (pp) [95% CI]", pp_cell),
                    ("kl_teacher", "KL Δ (nats) [95% CI]", nats_cell),
                    ("ece", "ECE Δ (pp) [95% CI]", pp_cell))


def fidelity_cell(r: dict, metric: str) -> str:
    """One fidelity comparison of a paired result: mean difference [95 % t interval], "-" where not reported."""
    c = (r.get("fidelity") or {}).get(metric)
    if c is None or c["mean"] is None:
        return "-"
    fmt = next(f for m, _, f in FIDELITY_COLUMNS if m == metric)
    return fmt(c["mean"], c["ci_t"]) + ("" if c["paired"] else " unpaired")


def table_rows(results: list[dict]) -> tuple[list[str], list[list[str]]]:
    """(header, rows of strings) of the paired table, for the terminal, HTML and markdown."""
    head = ["group", "vs", "pairing", "n", "mean diff (pp)", "95% CI, t (pp)", "95% CI, bootstrap (pp)",
            "wins / ties / losses", "verdict"]
    body = []
    for r in results:
        wtl = "-" if r["wins"] is None else f"{r['wins']} / {r['ties']} / {r['losses']}"
        body.append([r["group"], r["baseline"], "paired" if r["paired"] else "unpaired",
                     str(r["n"]) if r["paired"] else f"{r['n_group']} vs {r['n_base']}", pp(r["mean"]),
                     fmt_ci(r["ci_t"]), fmt_ci(r["ci_bootstrap"]), wtl, r["verdict"]])
    return head, body


def fidelity_table_rows(results: list[dict]) -> tuple[list[str], list[list[str]]] | None:
    """(header, rows of strings) of the paired fidelity table: the same comparisons on the student's agreement with
    its teacher, KL to it and ECE (mean difference [95 % t interval]); None when no comparison has them."""
    if not any(r.get("fidelity") for r in results):
        return None
    head = ["group", "vs", "pairing", "n", *[h for _, h, _ in FIDELITY_COLUMNS]]
    body = []
    for r in results:
        pairs = [c for c in (r.get("fidelity") or {}).values() if c["paired"]]
        n = str(pairs[0]["n"]) if pairs else "-"
        body.append([r["group"], r["baseline"], "paired" if pairs else "unpaired", n,
                     *[fidelity_cell(r, m) for m, _, _ in FIDELITY_COLUMNS]])
    return head, body


CSV_COLUMNS = ("group", "baseline", "paired", "n", "n_group", "n_base", "mean", "ci_t_low", "ci_t_high",
               "ci_bootstrap_low", "ci_bootstrap_high", "wins", "ties", "losses", "verdict", "seeds",
               # the student's fidelity and calibration, paired the same way (empty where not reported)
               *[f"{m}_{k}" for m in FIDELITY_METRICS for k in ("mean", "ci_t_low", "ci_t_high", "n")])


def csv_row(r: dict) -> dict[str, Any]:
    t, bs = r["ci_t"] or (None, None), r["ci_bootstrap"] or (None, None)
    out = {"group": r["group"], "baseline": r["baseline"], "paired": r["paired"], "n": r["n"],
           "n_group": r["n_group"], "n_base": r["n_base"], "mean": r["mean"], "ci_t_low": t[0], "ci_t_high": t[1],
           "ci_bootstrap_low": bs[0], "ci_bootstrap_high": bs[1], "wins": r["wins"], "ties": r["ties"],
           "losses": r["losses"], "verdict": r["verdict"], "seeds": " ".join(map(str, r["seeds"]))}
    for m, c in (r.get("fidelity") or {}).items():
        ci = c["ci_t"] or (None, None)
        out.update({f"{m}_mean": c["mean"], f"{m}_ci_t_low": ci[0], f"{m}_ci_t_high": ci[1],
                    f"{m}_n": c["n"] if c["paired"] else None})
    return out


def plot(results: list[dict]) -> bytes:
    """Each comparison's mean difference with its t interval (points: the per-seed differences), as PNG."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * max(len(results), 1)))
    for i, r in enumerate(results):
        y = len(results) - 1 - i
        if r["ci_t"] is not None:
            ax.plot([100 * r["ci_t"][0], 100 * r["ci_t"][1]], [y, y], color="C0", lw=2)
        if r["mean"] is not None:
            ax.plot([100 * r["mean"]], [y], "o", color="C0" if r["paired"] else "C1")
        ax.plot([100 * d for d in r["diffs"]], [y] * len(r["diffs"]), "x", color="0.5", ms=4)
    ax.axvline(0, color="0.3", lw=0.8)
    ax.set_yticks(range(len(results)))
    ax.set_yticklabels([f"{r['group']} vs {r['baseline']}" + ("" if r["paired"] else " (unpaired)")
                        for r in reversed(results)], fontsize=8)
    ax.set_xlabel("student test accuracy difference (pp), mean and 95% t interval; x: per seed")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
