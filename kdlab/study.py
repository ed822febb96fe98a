"""Run a results study: ``python -m kdlab.study [NAME] [--docs] [-- OVERRIDE ...]``.

A study (``conf/study/<NAME>.yaml``) is a list of sweeps, each a Hydra multirun of kdlab's own command over
some experiments and seeds, grouped into parts (one results table each):

    python -m kdlab -m +experiment=A,B seed=0,1,2 [the sweep's overrides] [the study's] [yours]

The sweeps run one after the other (stages shared between them come from the store), then
``kdlab.compare`` turns each part's runs into tables: ``<out>/<part>/comparison.{csv,html,md}`` and PNGs,
plus ``<out>/results.md`` (all parts) and ``<out>/study.json`` (commands, exit codes, wall times).
``--docs`` writes them to ``docs/results/`` and puts ``results.md`` into the README between the
``<!-- results:begin -->`` and ``<!-- results:end -->`` markers. Exit status 1 when a sweep failed
(the tables then show what finished), 2 for bad input.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from omegaconf import OmegaConf

from kdlab import compare, compare_runs, compare_tables
from kdlab.errors import ConfigError, KdlabError

ROOT = Path(__file__).resolve().parents[1]
STUDY_DIR = ROOT / "conf" / "study"
EXPERIMENT_DIR = ROOT / "conf" / "experiment"
README = ROOT / "README.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def known_studies() -> list[str]:
    return sorted(p.stem for p in STUDY_DIR.glob("*.yaml"))


def load_study(name: str) -> dict:
    """The study's config, checked: every sweep names known experiments and a part."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else STUDY_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown study {name!r}; known: {', '.join(known_studies()) or '(none)'}")
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(cfg, dict) or not cfg.get("sweeps"):
        raise ConfigError(f"study {path} has no 'sweeps' list")
    known = sorted(p.stem for p in EXPERIMENT_DIR.glob("*.yaml"))
    parts = cfg.setdefault("parts", {})
    for i, sw in enumerate(cfg["sweeps"]):
        if not isinstance(sw, dict) or not sw.get("experiments") or not sw.get("part"):
            raise ConfigError(f"study {name}: sweep {i} needs 'part' and a non-empty 'experiments' list")
        for e in sw["experiments"]:
            if e not in known:
                raise ConfigError(f"study {name}: unknown experiment {e!r}; known: {', '.join(known)}")
        parts.setdefault(sw["part"], {"title": sw["part"]})
    cfg.setdefault("seeds", [0, 1, 2])
    cfg.setdefault("overrides", [])
    cfg.setdefault("by", "experiment")
    cfg.setdefault("last_k", 3)
    cfg.setdefault("docs_dir", "docs/results")
    cfg.setdefault("readme_marker", "results")
    return cfg


def docs_dir(study: dict) -> Path:
    """Where ``--docs`` writes the study's tables: its ``docs_dir`` (default docs/results), under the repo."""
    return ROOT / str(study["docs_dir"])


def sweep_args(study: dict, sweep: dict, seeds: Sequence[int], extra: Sequence[str]) -> list[str]:
    """kdlab's own multirun arguments for one sweep (without the output directory)."""
    return ["-m", "+experiment=" + ",".join(sweep["experiments"]), "seed=" + ",".join(map(str, seeds)),
            *sweep.get("overrides", []), *study["overrides"], *extra]


def command_line(args: Sequence[str]) -> str:
    return "python -m kdlab " + " ".join(shlex.quote(a) for a in args)


def experiment_command(study: dict, sweep: dict, experiment: str, seeds: Sequence[int],
                       extra: Sequence[str]) -> str:
    """The command that reproduces one experiment's row on its own."""
    one = {**sweep, "experiments": [experiment]}
    return command_line(sweep_args(study, one, seeds, extra))


def row_name(args: Sequence[str], experiment: str) -> str:
    """An experiment's name in the tables: the ``experiment_name=`` a sweep's arguments set, else its own."""
    names = [str(a).split("=", 1)[1] for a in args if str(a).startswith("experiment_name=")]
    return names[-1] if names else experiment


# --------------------------------------------------------------------------------------------- tables

DATA_FREE_FOOTNOTE = ("† A data-free student (DAFL, `data_free: true`): the number it reports is its **last "
                      "epoch** (bold), since choosing an epoch on the real validation split is a use of data; its "
                      "best-on-val column is that choice, shown for comparison only.")


def paired_cell(r: dict | None) -> str:
    """One paired comparison in a table cell: mean difference [95 % t interval] (pp), wins/ties/losses, verdict."""
    if r is None:
        return "-"
    from kdlab.paired import fmt_ci, pp

    if not r["paired"]:
        return f"{pp(r['mean'])} {fmt_ci(r['ci_t'])} unpaired, {r['verdict']}"
    return (f"{pp(r['mean'])} {fmt_ci(r['ci_t'])}, {r['wins']}/{r['ties']}/{r['losses']} of {r['n']}, "
            f"{r['verdict']}")


def part_markdown(title: str, rows: list[dict], commands: dict[str, str], note: str = "",
                  paired: list[dict] | None = None, baseline: str | None = None) -> str:
    """One part's results table: the student (best-on-val and last epoch), every source stage, the command.

    A data-free student's row (DAFL) is marked †: its best-on-val cell is the epoch picked on the real
    validation split (``test_acc_best_val``), its last-epoch cell, the number it reports, is bold."""
    sources = [n for n in compare_runs.all_stage_names(rows) if n not in {r["student_stage"] for r in rows}]
    # a part with a quantized student shows every student's bit-widths and size in bytes at them
    quantized = any(r.get("student_bits") not in (None, "W32 A32") for r in rows)
    vs_base = {r["group"]: r for r in paired or [] if baseline and r["baseline"] == f"experiment={baseline}"}
    head = ["experiment", "n", "student best-on-val %", "student last epoch %", "range (pp)",
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
        best = compare_tables.pct_pm(r.get("student_test_acc_best_val_mean", r["student_test_acc_mean"]),
                              r.get("student_test_acc_best_val_std", r["student_test_acc_std"]))
        last = compare_tables.pct_pm(r["student_test_acc_last_mean"], r["student_test_acc_last_std"])
        cells = [exp + (" †" if free else ""), str(r["n"]) + (f" ({r['n_failed']} failed)" if r["n_failed"] else ""),
                 best + (" †" if free else ""), f"**{last}**" if free else last,
                 compare_tables.pct(r["student_test_acc_range"]),
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
                  "excludes 0 (`python -m kdlab.compare --baseline / --pairs`)."
                  + "".join(f" {r['group'].split('=', 1)[-1]} vs {r['baseline'].split('=', 1)[-1]}: {paired_cell(r)}."
                            for r in others)]
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


# ------------------------------------------------------------------------------------------------ run

def run_sweep(args: list[str], sweep_dir: Path, log: Path) -> tuple[int, float]:
    """One multirun in a subprocess; its output goes to the terminal and to ``log``."""
    cmd = [sys.executable, "-m", "kdlab", *args, f"hydra.sweep.dir={sweep_dir}"]
    t0 = time.perf_counter()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w", encoding="utf-8") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            fh.write(line)
            sys.stdout.write("    " + line)
            sys.stdout.flush()
        rc = proc.wait()
    return rc, time.perf_counter() - t0


def part_pairs(rows: list[dict], by: list[str], meta: dict) -> list[dict]:
    """A part's paired comparisons: every experiment against its ``baseline`` and each of its ``pairs`` [A, B],
    where the groups ran (a missing one is skipped with a warning: a part may be run in pieces)."""
    from kdlab.paired import paired_table

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
        written = compare.write_outputs(rows, runs, by, out / part, plots=plots, skipped=skipped,
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


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    import torch

    return {"cpu": cpu_name(), "cores": os.cpu_count(),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "loadavg_start": [round(x, 2) for x in os.getloadavg()]}


def run(a: argparse.Namespace) -> int:
    if a.tables_only:
        return tables_only(a)
    study = load_study(a.name)
    try:
        seeds = [int(s) for s in a.seeds.split(",")] if a.seeds else [int(s) for s in study["seeds"]]
    except ValueError as e:
        raise ConfigError(f"--seeds must be comma-separated integers, got {a.seeds!r}") from e
    parts = list(study["parts"])
    only = [p.strip() for p in a.only.split(",")] if a.only else parts
    for p in only:
        if p not in parts:
            raise ConfigError(f"--only names unknown part {p!r}; parts of study {a.name}: {', '.join(parts)}")
    extra = list(a.overrides)
    sweeps = [s for s in study["sweeps"] if s["part"] in only]
    stamp = datetime.now().strftime("%Y-%m-%d/%H-%M-%S")
    root = Path(a.root) if a.root else ROOT / "outputs" / "study" / Path(a.name).stem / stamp
    out = docs_dir(study) if a.docs else Path(a.out) if a.out else root / "results"

    record = {"study": a.name, "seeds": seeds, "overrides": extra, "root": str(root), "machine": machine(),
              "started": datetime.now().isoformat(timespec="seconds"), "sweeps": []}
    for i, sw in enumerate(sweeps):
        args = sweep_args(study, sw, seeds, extra)
        record["sweeps"].append({
            "part": sw["part"], "experiments": sw["experiments"], "command": command_line(args),
            "commands": {e: experiment_command(study, sw, e, seeds, extra) for e in sw["experiments"]},
            "dir": str(root / f"{i + 1:02d}-{sw['part']}"), "args": args})
    n_jobs = len(seeds) * sum(len(s["experiments"]) for s in sweeps)
    print(f"study {a.name}: {len(sweeps)} sweeps, {n_jobs} pipeline runs, seeds {seeds}; runs under {root}")
    if a.dry_run:
        for s in record["sweeps"]:
            print(s["command"])
        return 0

    t0 = time.perf_counter()
    failed = 0
    for i, s in enumerate(record["sweeps"]):
        print(f"[{i + 1}/{len(sweeps)}] {s['part']}: {s['command']}", flush=True)
        rc, secs = run_sweep(s["args"], Path(s["dir"]), Path(s["dir"] + ".log"))
        s.update(exit_code=rc, seconds=round(secs, 1))
        failed += rc != 0
        print(f"[{i + 1}/{len(sweeps)}] {s['part']}: exit {rc} after {compare_tables.fmt_seconds(secs)} "
              f"(total {compare_tables.fmt_seconds(time.perf_counter() - t0)})", flush=True)
    record["seconds"] = round(time.perf_counter() - t0, 1)
    record["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    (root / "study.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    publish(study, record, out, a)
    print(f"study {a.name}: {len(sweeps) - failed}/{len(sweeps)} sweeps succeeded in "
          f"{compare_tables.fmt_seconds(record['seconds'])}")
    return 1 if failed else 0


def publish(study: dict, record: dict, out: Path, a: argparse.Namespace) -> None:
    """The tables of a finished study (``record``) into ``out``, and with --docs into the README."""
    out.mkdir(parents=True, exist_ok=True)
    collected: dict[str, tuple[list[dict], list[dict]]] = {}
    blocks = tables(study, record, out, plots=not a.no_plots, collected=collected)
    if study.get("gain_vs_gap"):  # a capacity-gap study: each method's paired gain against the gap
        from kdlab import gain_vs_gap

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
    md = "\n".join(b for _, b in blocks)
    seeds, extra, m = record["seeds"], record["overrides"], record["machine"]
    header = (f"Measured by `python -m kdlab.study {record['study']}"
              + (f" --seeds {','.join(map(str, seeds))}" if seeds != study["seeds"] else "")
              + (" -- " + " ".join(shlex.quote(x) for x in extra) if extra else "")
              + f"` in {compare_tables.fmt_seconds(record['seconds'])} on {m['cpu']} "
              f"({m['cores']} cores, torch {m['torch']}, GPU: {m['gpu'] or 'none'}, 1-min load "
              f"{m['loadavg_start'][0]} at start), {record['started'][:10]}. Student test accuracy on each "
              "recipe's test split, mean ± sample std over the seeds; "
              "best-on-val = the epoch chosen on the held-out validation split, never on test.\n\n")
    (out / "results.md").write_text(header + md, encoding="utf-8")
    (out / "study.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out / 'results.md'}, {out / 'study.json'}")
    if a.docs:  # the README (a first-day page) gets the study's readme_parts; the others are linked
        shown = study.get("readme_parts") or [p for p, _ in blocks]
        rest = [p for p, _ in blocks if p not in shown]
        docs = docs_dir(study).relative_to(ROOT).as_posix()
        block = header + "\n".join(b.replace("](" + f"{docs}/gain_vs_gap.png".removeprefix("docs/") + ")",
                                             f"]({docs}/gain_vs_gap.png)") for p, b in blocks if p in shown)
        if rest:
            block += (f"\nThe tables of the other parts ({', '.join(rest)}), with the same columns: "
                      f"[{docs}/results.md]({docs}/results.md).\n")
        update_readme(block, marker=study["readme_marker"])
        print(f"updated {README} between {' and '.join(markers(study['readme_marker']))}")


def tables_only(a: argparse.Namespace) -> int:
    """--tables-only: rebuild the tables of a finished study from its run directories (no training)."""
    if not a.root:
        raise ConfigError("--tables-only needs --root, the directory of a finished study run")
    path = Path(a.root) / "study.json"
    if not path.is_file():
        raise ConfigError(f"--root {a.root} holds no study.json (not a finished study run)")
    record = json.loads(path.read_text(encoding="utf-8"))
    study = load_study(a.name)
    out = docs_dir(study) if a.docs else Path(a.out) if a.out else Path(a.root) / "results"
    publish(study, record, out, a)
    return 1 if any(s.get("exit_code") for s in record["sweeps"]) else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kdlab.study", description=__doc__.split("\n\n")[0])
    p.add_argument("name", nargs="?", default="fashion_mnist", help="a study in conf/study/ (default fashion_mnist) or the path of a study .yaml")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default: the study's, 0,1,2)")
    p.add_argument("--only", default=None, help="comma-separated parts to run (default: all)")
    p.add_argument("--root", default=None, help="where the sweeps' runs go (default outputs/study/NAME/DATE/TIME)")
    p.add_argument("--out", default=None, help="where the tables go (default ROOT/results)")
    p.add_argument("--docs", action="store_true", help="write the tables to docs/results/ and into the README")
    p.add_argument("--dry-run", action="store_true", help="print the sweep commands and stop")
    p.add_argument("--tables-only", action="store_true",
                   help="rebuild the tables of the finished study under --root from its run directories")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.epilog = "After --: kdlab overrides added to every sweep, e.g. -- trainer.max_epochs=1"
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    try:
        a = build_parser().parse_args(argv[:cut])
    except SystemExit as e:
        return int(e.code or 0)
    a.overrides = argv[cut + 1:]
    try:
        return run(a)
    except KdlabError as e:
        print(f"kdlab.study: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("kdlab.study: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
