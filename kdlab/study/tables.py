"""A finished study's tables: each part's runs compared (``kdlab.compare``) into ``<out>/<part>/``, its markdown
table (the student best-on-val and last epoch, every source, paired differences against the part's baseline,
the command of each row), ``<out>/results.md`` (every part, under a header saying how and where it was
measured), ``<out>/study.json``, and with ``--docs`` the README's block between the study's markers."""
from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from kdlab.compare import cli as compare_cli
from kdlab.compare import runs as compare_runs
from kdlab.compare import tables as compare_tables
from kdlab.errors import ConfigError
from kdlab.study.config import ROOT, docs_dir, row_name

README = ROOT / "README.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"

DATA_FREE_FOOTNOTE = ("† A data-free student (DAFL, `data_free: true`): the number it reports is its **last "
                      "epoch** (bold), since choosing an epoch on the real validation split is a use of data; its "
                      "best-on-val column is that choice, shown for comparison only.")

FIDELITY_FOOTNOTE = ("Fidelity and calibration of the student on the test split, at the checkpoint it reports: "
                     "top-1 agreement with its teacher, KL(p_teacher || p_student) at T = 1 in nats (mean over test "
                     "images), expected calibration error (15 bins); mean ± std over the seeds, '-' for a student "
                     "without sources.")


def paired_cell(r: dict | None) -> str:
    """One paired comparison in a table cell: mean difference [95 % t interval] (pp), wins/ties/losses, verdict."""
    if r is None:
        return "-"
    from kdlab.compare.paired import fmt_ci, pp

    if not r["paired"]:
        return f"{pp(r['mean'])} {fmt_ci(r['ci_t'])} unpaired, {r['verdict']}"
    return (f"{pp(r['mean'])} {fmt_ci(r['ci_t'])}, {r['wins']}/{r['ties']}/{r['losses']} of {r['n']}, "
            f"{r['verdict']}")


def part_markdown(title: str, rows: list[dict], commands: dict[str, str], note: str = "",
                  paired: list[dict] | None = None, baseline: str | None = None) -> str:
    """One part's results table: the student (best-on-val and last epoch; its agreement with the teacher, KL to the
    teacher and ECE where its runs report them), every source stage, the command.

    A data-free student's row (DAFL) is marked †: its best-on-val cell is the epoch picked on the real
    validation split (``test_acc_best_val``), its last-epoch cell, the number it reports, is bold."""
    sources = [n for n in compare_runs.all_stage_names(rows) if n not in {r["student_stage"] for r in rows}]
    # a part with a quantized student shows every student's bit-widths and size in bytes at them
    quantized = any(r.get("student_bits") not in (None, "W32 A32") for r in rows)
    vs_base = {r["group"]: r for r in paired or [] if baseline and r["baseline"] == f"experiment={baseline}"}
    fidelity = compare_runs.has_fidelity(rows)  # runs of an older kdlab report none
    head = ["experiment", "n", "student best-on-val %", "student last epoch %", "range (pp)",
            *(["agreement with teacher %", "KL to teacher (nats)", "ECE %"] if fidelity else []),
            *[f"{s} %" for s in sources], *(["student bits", "student size"] if quantized else []),
            *([f"paired Δ vs {baseline} (pp) [95% CI], wins/ties/losses"] if vs_base else []),
            "wall / run", "command"]
    lines = [f"#### {title}", ""]
    if note:
        lines += [note, ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        exp = str(r["fields"].get("experiment"))
        free = bool(r.get("data_free"))
        protocol = r.get("protocol", "heldout")  # another protocol than the study's is labelled in its row
        best = compare_tables.pct_pm(r.get("student_test_acc_best_val_mean", r["student_test_acc_mean"]),
                              r.get("student_test_acc_best_val_std", r["student_test_acc_std"]))
        last = compare_tables.pct_pm(r["student_test_acc_last_mean"], r["student_test_acc_last_std"])
        cells = [exp + (" †" if free else "") + ("" if protocol == "heldout" else f" [protocol {protocol}: "
                                                     "best-on-val column = its last epoch]"), str(r["n"]) + (f" ({r['n_failed']} failed)" if r["n_failed"] else ""),
                 best + (" †" if free else ""), f"**{last}**" if free else last,
                 compare_tables.pct(r["student_test_acc_range"]),
                 *([compare_tables.pct_pm(r["student_agreement_teacher_mean"], r["student_agreement_teacher_std"]),
                    compare_tables.nats_pm(r["student_kl_teacher_mean"], r["student_kl_teacher_std"]),
                    compare_tables.pct_pm(r["student_ece_mean"], r["student_ece_std"])] if fidelity else []),
                 *[compare_tables.pct_pm(r["stages"][s]["mean"], r["stages"][s]["std"]) if s in r["stages"] else "-"
                   for s in sources],
                 *([r.get("student_bits") or "-", compare_tables.fmt_bytes(r.get("student_size_bytes"))] if quantized else []),
                 *([paired_cell(vs_base.get(r["group"]))] if vs_base else []),
                 compare_tables.fmt_seconds(r["wall_seconds_mean"]), f"`{commands.get(exp, '-')}`"]
        lines.append("| " + " | ".join(cells) + " |")
    others = [r for r in paired or [] if not (baseline and r["baseline"] == f"experiment={baseline}")]
    if vs_base or others:
        lines += ["", "Paired: runs of two experiments with the same seed (same data order, same student "
                  "initialisation); Δ = mean difference of the student's best-on-val test accuracy (data-free: last "
                  "epoch), 95 % Student-t interval over the pairs; `better` / `worse` only when the interval "
                  "excludes 0 (`--baseline` and `--pairs` of `python -m kdlab.compare`)."
                  + "".join(f" {r['group'].split('=', 1)[-1]} vs {r['baseline'].split('=', 1)[-1]}: {paired_cell(r)}."
                            for r in others)]
    if fidelity:
        lines += ["", FIDELITY_FOOTNOTE]
    if any(r.get("data_free") for r in rows):
        lines += ["", DATA_FREE_FOOTNOTE + " Its generated images (the last grid of each run) are in this part's "
                  "`comparison.html`."]
    return "\n".join(lines) + "\n"


def markers(marker: str = "results") -> tuple[str, str]:
    """The README markers a study writes between: ``<!-- results:begin -->`` (a study's ``readme_marker``)."""
    return f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"


def update_readme(block: str, readme: Path = README, marker: str = "results") -> None:
    begin, end = markers(marker)
    text = readme.read_text(encoding="utf-8")
    if begin not in text or end not in text:
        raise ConfigError(f"{readme} has no {begin} ... {end} markers to write the results between")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    tmp = readme.with_suffix(".md.tmp")
    tmp.write_text(f"{head}{begin}\n{block}{end}{tail}", encoding="utf-8")
    tmp.replace(readme)


def part_pairs(rows: list[dict], by: list[str], meta: dict) -> list[dict]:
    """A part's paired comparisons: every experiment against its ``baseline`` and each of its ``pairs`` [A, B],
    where the groups ran (a missing one is skipped with a warning: a part may be run in pieces)."""
    from kdlab.compare.paired import paired_table

    present = {str(r["fields"].get(by[0])) for r in rows if r["n"]}
    base = meta.get("baseline")
    if base and str(base) not in present:
        compare_runs.warn(f"part {meta.get('title', '?')[:40]}: baseline {base} did not run; no paired columns")
        base = None
    pairs = [f"{a},{b}" for a, b in meta.get("pairs") or [] if str(a) in present and str(b) in present]
    if not base and not pairs:
        return []
    return paired_table(rows, by[:1], f"{by[0]}={base}" if base else None, pairs)


def tables(study: dict, record: dict, out: Path, plots: bool,
           collected: dict[str, tuple[list[dict], list[dict]]] | None = None) -> list[tuple[str, str]]:
    """compare each part's sweeps into ``out/<part>/`` and return each part's markdown, (part, markdown);
    ``collected`` (if given) gets each part's (rows, paired comparisons)."""
    by = [f.strip() for f in str(study["by"]).split(",")]
    blocks = []
    for part, meta in study["parts"].items():
        dirs = [Path(s["dir"]) for s in record["sweeps"] if s["part"] == part and Path(s["dir"]).exists()]
        if not dirs:
            continue
        skipped: list = []
        try:
            runs = compare_runs.load_runs(dirs, skipped)
        except ConfigError as e:
            compare_runs.warn(f"{part}: {e}")
            continue
        rows = compare_runs.aggregate(runs, by, int(study["last_k"]))
        order = [row_name(s.get("overrides", []), e) for s in study["sweeps"] if s["part"] == part
                 for e in s["experiments"]]
        rows.sort(key=lambda r: order.index(r["fields"].get("experiment"))
                  if r["fields"].get("experiment") in order else len(order))
        paired = part_pairs(rows, by, meta)
        written = compare_cli.write_outputs(rows, runs, by, out / part, plots=plots, skipped=skipped,
                                        sources=[str(d) for d in dirs], paired=paired, root=record.get("root"),
                                        command=" ; ".join(s["command"] for s in record["sweeps"] if s["part"] == part))
        commands = {row_name(s.get("args", []), e): c for s in record["sweeps"] if s["part"] == part
                    for e, c in s["commands"].items()}
        md = part_markdown(meta.get("title", part), rows, commands, meta.get("note", ""), paired,
                           meta.get("baseline") if any(str(r["fields"].get(by[0])) == str(meta.get("baseline"))
                                                       for r in rows) else None)
        (out / part / "comparison.md").write_text(md, encoding="utf-8")
        if collected is not None:
            collected[part] = (rows, paired)
        print("wrote " + ", ".join(str(w) for w in [*written, out / part / "comparison.md"]))
        blocks.append((part, md))
    return blocks


def protocol_label(collected: dict[str, tuple[list[dict], list[dict]]]) -> str:
    """What the study's numbers are, by its runs' protocols (docs/pipelines.md#protocols)."""
    protocols = sorted({r.get("protocol", "heldout") for rows, _ in collected.values() for r in rows} or {"heldout"})
    held = "best-on-val = the epoch chosen on the held-out validation split, never on test"
    if protocols == ["heldout"]:
        return f"protocol heldout: {held}"
    return (f"protocols {', '.join(protocols)} (each row labelled): heldout's {held}; reference's best-on-val column "
            f"is its last epoch (no validation split)")


def publish(study: dict, record: dict, out: Path, a: argparse.Namespace) -> None:
    """The tables of a finished study (``record``) into ``out``, and with --docs into the README."""
    out.mkdir(parents=True, exist_ok=True)
    collected: dict[str, tuple[list[dict], list[dict]]] = {}
    blocks = tables(study, record, out, plots=not a.no_plots, collected=collected)
    if study.get("gain_vs_gap"):  # a capacity-gap study: each method's paired gain against the gap
        from kdlab.compare import gain_vs_gap

        cfg = study["gain_vs_gap"]
        pts = gain_vs_gap.points(collected, cfg)
        written = gain_vs_gap.write(pts, cfg, out, plots=not a.no_plots)
        print("wrote " + ", ".join(str(w) for w in written))
        if pts:
            # the figure as the page that includes results.md sees it: a docs page (mkdocs snippets resolve links
            # from the docs root), else results.md's own directory; the README's is rewritten below
            docs_root = ROOT / "docs"
            fig = (out / "gain_vs_gap.png").resolve()
            link = fig.relative_to(docs_root).as_posix() if fig.is_relative_to(docs_root) else "gain_vs_gap.png"
            figure = f"\n![gain vs gap]({link})\n" if not a.no_plots else ""
            text = f"#### {cfg.get('title', 'Gain vs gap')}\n\n{cfg.get('note', '')}\n\n"
            blocks.insert(0, ("gain_vs_gap", text + gain_vs_gap.markdown(pts, cfg) + figure))
    if study.get("curves") and not a.no_plots:  # the convergence figure (kdlab/study/curves.py)
        from kdlab.study import curves

        cfg = {**study["curves"], "parts": {p: m.get("title", p) for p, m in study["parts"].items()}}
        data = curves.series(collected, cfg)
        if data:
            (out / "curves.png").write_bytes(curves.plot(data, cfg))
            print(f"wrote {out / 'curves.png'}")
            fig = (out / "curves.png").resolve()
            docs_root = ROOT / "docs"
            link = fig.relative_to(docs_root).as_posix() if fig.is_relative_to(docs_root) else "curves.png"
            at = 1 if blocks and blocks[0][0] == "gain_vs_gap" else 0
            text = (f"#### {cfg.get('title', 'Training and validation curves')}\n\n{cfg.get('note', '')}\n\n"
                    f"![training and validation curves]({link})\n")
            blocks.insert(at, ("curves", text))
    if study.get("published"):  # a paper's table beside kdlab's reproduction (kdlab/study/published.py)
        from kdlab.study import published

        text = published.markdown(study["published"], collected)
        if text:
            blocks.insert(0, ("published", text))
    md = "\n".join(b for _, b in blocks)
    seeds, extra, m = record["seeds"], record["overrides"], record["machine"]
    header = (f"Measured by `python -m kdlab.study {record['study']}"
              + (f" --seeds {','.join(map(str, seeds))}" if seeds != study["seeds"] else "")
              + (" -- " + " ".join(shlex.quote(x) for x in extra) if extra else "")
              + f"` in {compare_tables.fmt_seconds(record['seconds'])} on {m['cpu']} "
              f"({m['cores']} cores, torch {m['torch']}, GPU: {m['gpu'] or 'none'}, "
              + (f"{m['jobs']} job(s) at a time with {m['threads_per_job']} thread(s) each, " if m.get("jobs") else "")
              + "1-min load "
              f"{m['loadavg_start'][0]} at start), {record['started'][:10]}. Student test accuracy on each "
              f"recipe's test split, mean ± sample std over the seeds; {protocol_label(collected)}.\n\n")
    (out / "results.md").write_text(header + md, encoding="utf-8")
    (out / "study.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out / 'results.md'}, {out / 'study.json'}")
    if a.docs:  # the README (a first-day page) gets the study's readme_parts; the others are linked
        shown = study.get("readme_parts") or [p for p, _ in blocks]
        rest = [p for p, _ in blocks if p not in shown]
        docs = docs_dir(study).relative_to(ROOT).as_posix()
        def readme_links(b: str) -> str:  # the figures as the README (at the repo root) sees them
            for png in ("gain_vs_gap.png", "curves.png"):
                b = b.replace("](" + f"{docs}/{png}".removeprefix("docs/") + ")", f"]({docs}/{png})")
            return b

        block = header + "\n".join(readme_links(b) for p, b in blocks if p in shown)
        if rest:
            block += (f"\nThe tables of the other parts ({', '.join(rest)}), with the same columns: "
                      f"[{docs}/results.md]({docs}/results.md).\n")
        update_readme(block, marker=study["readme_marker"])
        print(f"updated {README} between {' and '.join(markers(study['readme_marker']))}")
