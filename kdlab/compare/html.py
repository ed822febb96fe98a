"""The self-contained page of ``python -m kdlab.compare`` (``comparison.html``): inline CSS, the tables of
kdlab.compare.tables, the plots and generated-image grids as base64 PNG, no scripts; paths relative to the
study or sweep root and a provenance line (command, kdlab commit, the runs' environment), so a committed page
travels.
"""
from __future__ import annotations

import base64
import html
import os
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from kdlab.compare.runs import (
    DEFAULT_LAST_K,
    MISSING,
    common_root,
    generated_grids,
    get_field,
    hashable,
    relative_to,
    run_label,
    student_stage,
    val_curve,
    val_fluctuation,
)
from kdlab.compare.tables import FAILED_HEAD, failed_rows, fmt_seconds, pct, table_note, table_specs

_CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"DejaVu Sans",Arial,sans-serif;margin:24px auto;
max-width:1200px;padding:0 16px;color:#1f2328;background:#fff}
h1{font-size:1.6em;margin-bottom:4px}h2{font-size:1.2em;margin-top:28px;border-bottom:1px solid #d0d7de;
padding-bottom:4px}.meta{color:#57606a;font-size:.9em}
table{border-collapse:collapse;margin:8px 0 16px;font-size:.9em}
th,td{border:1px solid #d0d7de;padding:4px 10px;text-align:right;white-space:nowrap}
th{background:#f6f8fa;font-weight:600;white-space:normal;vertical-align:bottom}.scroll{overflow-x:auto}td.key{text-align:left;font-weight:600}
tr:nth-child(even) td{background:#fafbfc}table.text td,table.text th{text-align:left}td.wrap{white-space:normal;text-align:left;max-width:520px}
.fail td{background:#fff5f5!important}figure{margin:12px 0 24px}figure img{max-width:100%;
border:1px solid #d0d7de}figcaption{color:#57606a;font-size:.9em}.warn{color:#9a6700}
.grids{display:flex;flex-wrap:wrap;gap:16px}.grids figure{margin:4px 0;max-width:360px}
.grids img{width:320px;image-rendering:pixelated}.grids figcaption{overflow-wrap:anywhere}
"""


def html_table(head: list[str], body: list[list[str]], n_keys: int = 1, cls: str = "",
                wrap: Sequence[int] = ()) -> str:
    e = html.escape
    out = [f'<table class="{cls}"><thead><tr>' + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr></thead><tbody>"]
    for line in body:
        cells = []
        for i, v in enumerate(line):
            c = "key" if i < n_keys else "wrap" if i in wrap else ""
            cells.append(f'<td class="{c}">{e(v)}</td>' if c else f"<td>{e(v)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "<div class='scroll'>" + "".join(out) + "</tbody></table></div>"


def source_commit() -> str | None:
    """The git commit of the kdlab checkout that renders the page (None outside a git checkout)."""
    import subprocess

    from kdlab.config_tree import ROOT as here

    if not (here / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def provenance(runs: list[dict], command: str | None) -> str:
    """One line: the command that made the page, the kdlab commit, the environment the runs recorded."""
    envs = {(e.get("torch"), e.get("cpu"), e.get("gpu")) for r in runs for e in [r.get("environment") or {}]
            if e}
    env = "; ".join(f"torch {t}, CPU {c or '?'}, GPU {g or 'none'}" for t, c, g in sorted(envs, key=str)) or "not recorded"
    return (f"Command: `{command or 'python -m kdlab.compare'}`; page written at kdlab commit "
            f"{source_commit() or 'unknown'}; the runs' environment: {env}.")


def render_html(rows: list[dict], runs: list[dict], by: Sequence[str], images: dict[str, bytes] | None = None,
                skipped: Sequence[tuple[str, str]] = (), title: str = "kdlab comparison",
                sources: Sequence[str] = (), paired: list[dict] | None = None, root: str | os.PathLike | None = None,
                command: str | None = None) -> str:
    """A self-contained page: inline CSS, images as base64 PNG, no scripts. Paths of runs are shown relative
    to ``root`` (default: the directory holding every source)."""
    e = html.escape
    root = root if root is not None else common_root(list(sources))
    n_done = sum(r.get("status") == "completed" for r in runs)
    parts = [(f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{e(title)}</title>"
              f"<style>{_CSS}</style></head><body><h1>{e(title)}</h1>"),
             f"<p class='meta'>{len(runs)} run(s): {n_done} completed, {len(runs) - n_done} failed, "
             f"{len(skipped)} corrupted file(s) skipped. Grouped by {e(', '.join(by))}. "
             f"Accuracies in %, mean ± sample std over runs. Generated {datetime.now():%Y-%m-%d %H:%M}"
             + (f" from {e(', '.join(relative_to(x, root) or '.' for x in sources))}" if sources else "")
             + (f" (paths relative to {e(Path(root).name)}/)" if root is not None else "") + ".</p>",
             f"<p class='meta'>{e(provenance(runs, command))}</p>"]
    for name, (head, body) in table_specs(rows, by, paired).items():
        parts.append(f"<h2>{e(name)}</h2>")
        text = table_note(name, rows)
        if text:
            parts.append(f"<p class='meta'>{e(text[0].upper() + text[1:])}.</p>")
        parts.append(html_table(head, body, n_keys=len(by) + ("protocol" not in by)))
    captions = {"chain": "Test accuracy of every stage along the chain (mean ± std over runs).",
                "student": "Student test accuracy per group (best-on-val and last epoch; error bars: std).",
                "val_curves": "Validation accuracy per epoch, per stage (thin: runs, thick: group mean); where the runs "
                              "recorded it, the training accuracy dashed beside it.",
                "paired": "Paired differences of the student's test accuracy (runs sharing a seed): mean and 95% "
                          "Student-t interval; x: each seed's difference. Unpaired rows (orange) compare means."}
    if images:
        parts.append("<h2>Plots</h2>")
        for name, png in images.items():
            b64 = base64.b64encode(png).decode("ascii")
            parts.append(f"<figure><img alt='{e(name)}' src='data:image/png;base64,{b64}'>"
                         f"<figcaption>{e(captions.get(name, name))}</figcaption></figure>")
    parts.extend(grid_section(runs, root))
    failed = failed_rows(runs, root)
    parts.append(f"<h2>Failed runs ({len(failed)})</h2>")
    parts.append(html_table(FAILED_HEAD, failed, n_keys=0, cls="text fail", wrap=(3, 4)) if failed
                 else "<p class='meta'>None.</p>")
    if skipped:
        parts.append(f"<h2 class='warn'>Skipped corrupted files ({len(skipped)})</h2>"
                     + html_table(["file", "reason"], [list(s) for s in skipped], n_keys=0, cls="text",
                                   wrap=(0, 1)))
    keys = [*by, *(["seed"] if "seed" not in by else [])]
    k = rows[0]["last_k"] if rows else DEFAULT_LAST_K
    done = [r for r in runs if r.get("status") == "completed"]
    fidelity = any(student_stage(r).get("ece") is not None for r in done)  # runs of an older kdlab have none

    def fidelity_cells(s: dict) -> list[str]:
        kl = s.get("kl_teacher")
        return [pct(s.get("agreement_teacher")), "-" if kl is None else f"{kl:.3f}", pct(s.get("ece"))] \
            if fidelity else []

    per_run = [[*(str(hashable(get_field(r, f))) if get_field(r, f) is not MISSING else "-" for f in keys),
                pct(student_stage(r).get("test_acc")), pct(student_stage(r).get("test_acc_last")),
                *fidelity_cells(student_stage(r)), pct(val_fluctuation(val_curve(student_stage(r), r["_dir"]), k)),
                fmt_seconds(r.get("wall_seconds")), relative_to(r["_path"], root)] for r in done]
    head = [*keys, "student test acc %", "last-epoch %",
            *(["agreement with teacher %", "KL to teacher (nats)", "ECE %"] if fidelity else []),
            f"val fluct. last {k} (pp)", "wall time", "results.json"]
    parts.append(f"<h2>Runs</h2><details><summary>{len(per_run)} completed run(s)</summary>"
                 + html_table(head, per_run, n_keys=len(keys), wrap=(len(head) - 1,)) + "</details>")
    parts.append("</body></html>")
    return "\n".join(parts)


def grid_section(runs: list[dict], root: str | os.PathLike | None = None) -> list[str]:
    """The last generated grid of every data-free stage, as HTML (nothing when there is none).

    The PNGs are embedded as base64 data URIs, like the plots, not linked: the page stays one
    self-contained file that still shows them when it is moved, mailed or published (docs/results/)
    without the run directories, which a study keeps elsewhere and may delete; a grid is a few tens of KB
    (64 images of 28x28 or 32x32)."""
    e = html.escape
    figures = []
    for r in runs:
        if r.get("status") != "completed":
            continue
        for g in generated_grids(r):
            what = f"{run_label(r)}, stage {g['stage']}"
            if g["path"] is None:
                why = ("reused from the store: its grids are in the directory of the run that trained it"
                       if g["cached"] else "no generated/<stage>/epoch_*.png in its run directory")
                figures.append(f"<figure><figcaption>{e(what)}: no grid ({e(why)}).</figcaption></figure>")
                continue
            try:
                png = Path(g["path"]).read_bytes()
            except OSError as err:
                figures.append(f"<figure><figcaption>{e(what)}: cannot read {e(relative_to(g['path'], root))} "
                               f"({e(err.strerror or str(err))}).</figcaption></figure>")
                continue
            epochs = f" of {g['epochs']}" if g["epochs"] else ""
            figures.append(f"<figure><img alt='{e(what)}' src='data:image/png;base64,"
                           f"{base64.b64encode(png).decode('ascii')}'><figcaption>{e(what)}: epoch "
                           f"{g['epoch'] + 1}{e(epochs)} ({e(relative_to(g['path'], root))})</figcaption></figure>")
    if not figures:
        return []
    return ["<h2>Generated images</h2><p class='meta'>The last grid of generated images of each data-free "
            "stage (64 images from a fixed latent batch, min-max scaled for viewing), from its run directory.</p>"
            "<div class='grids'>" + "".join(figures) + "</div>"]
