"""Compare many kdlab runs: ``python -m kdlab.compare PATH... [--by FIELD[,FIELD]] [--out DIR]``.

Reads the ``results.json`` of every run under the given paths, groups the runs (by method, or by any
top-level, config or override field), prints rich tables (accuracy, stages, stability) and writes
``comparison.csv``, a self-contained ``comparison.html`` and the PNG plots it embeds. For every data-free
stage (DAFL: ``data_free: true``) the last grid of generated images in its run directory
(``generated/<stage>/epoch_NNN.png``) is embedded in the page too.

Accuracies stay fractions in the data (as in results.json) and are shown as percentages.

The work is split by job: kdlab.compare.runs reads and groups the runs, kdlab.compare.tables formats the tables
(terminal and CSV), kdlab.compare.html writes the page, kdlab.compare.plots the plots, kdlab.compare.paired the paired
statistics; this module writes the files and is the command line.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from kdlab.cli.report import report_error
from kdlab.compare.html import render_html
from kdlab.compare.runs import DEFAULT_BY, DEFAULT_LAST_K, aggregate, all_stage_names, load_runs, warn
from kdlab.compare.tables import print_report, write_csv
from kdlab.errors import ConfigError, KdlabError


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
            from kdlab.compare.paired import CSV_COLUMNS, csv_row

            with open(out / "comparison_paired.csv", "w", newline="", encoding="utf-8") as fh:
                w = csv.DictWriter(fh, fieldnames=list(CSV_COLUMNS))
                w.writeheader()
                w.writerows(csv_row(r) for r in paired)
            written.append(out / "comparison_paired.csv")
        images: dict[str, bytes] = {}
        if plots:
            from kdlab.compare.plots import make_plots

            images = make_plots(rows, all_stage_names(rows))
            if paired:
                from kdlab.compare.paired import plot as paired_plot

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
        from kdlab.compare.paired import paired_table

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
        return report_error("kdlab.compare", e)
    except Exception as e:  # one line, never a traceback without --debug
        if args.debug:
            raise
        return report_error("kdlab.compare", e, hint="rerun with --debug for the traceback")


if __name__ == "__main__":
    sys.exit(main())
