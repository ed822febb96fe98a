"""A study's ``published`` block: a paper's table beside kdlab's reproduction of it, row by row.

Each row names the paper's figure and the kdlab experiment (and, for a source such as the teacher, its stage)
that reproduces it; the table gives kdlab's mean ± std, the 95 % Student-t interval of that mean, and the
difference to the study's baseline row, published (one run each) and kdlab's (paired by seed, 95 % interval).
A row without an experiment is the paper's only, with the reason kdlab has none (``kdlab:``)."""
from __future__ import annotations

from kdlab.compare.paired import fmt_ci, pp, t_interval
from kdlab.compare.runs import stats
from kdlab.errors import ConfigError


def _row(rows: list[dict], experiment: str) -> dict | None:
    return next((r for r in rows if str(r["fields"].get("experiment")) == experiment and r["n"]), None)


def _reported(row: dict, stage: str | None) -> tuple[list[float], bool]:
    """The accuracies (fractions) kdlab reports for a row: a stage's test accuracy per run (a source trained once
    is one value), else the student's reported number per seed (best-on-val; a data-free student its last epoch);
    and whether the values are one network's."""
    if stage:
        if stage not in row["stages"]:
            raise ConfigError(f"published row names stage {stage!r}; the runs of "
                              f"{row['fields'].get('experiment')} have stages {', '.join(row['stages'])}")
        st = row["stages"][stage]
        if not st["std"]:  # one network (trained once, reused by every run) or one run
            return [st["mean"]], True
        return [st["mean"]] * int(st["n"]), False  # several: only their mean and std are kept

    return [a for _, a in row["accuracies"] if a is not None], False


def markdown(cfg: dict, collected: dict[str, tuple[list[dict], list[dict]]]) -> str:
    """The published-vs-kdlab table of ``cfg`` (the study's ``published`` block) from its part's rows."""
    part = cfg.get("part")
    if part not in collected:
        return ""
    rows, paired = collected[part]
    base_name = cfg.get("baseline")
    vs_base = {r["group"]: r for r in paired if base_name and r["baseline"] == f"experiment={base_name}"}
    base_pub = next((float(x["published"]) for x in cfg["rows"] if x.get("experiment") == base_name
                     and not x.get("stage")), None)
    head = ["row", f"published % ({cfg.get('source', 'paper')})", "kdlab % (mean ± std, n)",
            "kdlab 95% CI of the mean", "Δ vs student alone: published (pp)",
            "Δ vs student alone: kdlab (pp) [95% CI], wins/ties/losses"]
    lines = [f"#### {cfg.get('title', 'Published vs kdlab')}", ""]
    if cfg.get("note"):
        lines += [str(cfg["note"]).strip(), ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for x in cfg["rows"]:
        pub = float(x["published"])
        exp, stage = x.get("experiment"), x.get("stage")
        row = _row(rows, exp) if exp else None
        d_pub = "-" if base_pub is None or exp == base_name and not stage or stage else pp((pub - base_pub) / 100)
        if row is None:
            why = x.get("kdlab") or f"{exp} did not run"
            lines.append(f"| {x['label']} | {pub:.2f} | {why} | - | {d_pub} | - |")
            continue
        values, one = _reported(row, stage)
        st = stats(values)
        n = 1 if one else st["n"]
        spread = row["stages"][stage]["std"] if stage else st["std"]
        cell = (f"{100 * st['mean']:.2f} (one network)" if one
                else f"{100 * st['mean']:.2f} ± {100 * (spread or 0):.2f} (n={n})")
        ci = t_interval(values) if not one and not stage else None
        ci = "-" if ci is None else f"[{100 * ci[0]:.2f}, {100 * ci[1]:.2f}]"
        c = None if stage else vs_base.get(row["group"])
        d_kd = "-" if c is None else (f"{pp(c['mean'])} {fmt_ci(c['ci_t'])}, {c['wins']}/{c['ties']}/{c['losses']}"
                                       if c["paired"] else f"{pp(c['mean'])} {fmt_ci(c['ci_t'])} unpaired")
        label = x["label"] + (" †" if row.get("data_free") and not stage else "")
        lines.append(f"| {label} | {pub:.2f} | {cell} | {ci} | {d_pub} | {d_kd} |")
    if any(r.get("data_free") for r in rows):
        lines += ["", "† Data-free: the number is the student's last epoch (it chooses nothing on real data)."]
    return "\n".join(lines) + "\n"
