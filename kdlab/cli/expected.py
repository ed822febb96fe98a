"""What the README tells a newcomer to expect from ``make run``: at its end the default run compares its student
with the README's figure for its seed (``docs/results/default_run.json``, written with the README's table by
``python -m kdlab.cli.expected --write SWEEP_DIR``).

The comparison is made only for the README's own configuration: the run's student must have the store key the
README's run had (same config, data, seed and precision), else it says which key differs and prints no verdict."""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from kdlab.config_tree import ROOT
from kdlab.errors import ConfigError

EXPECTED = ROOT / "docs" / "results" / "default_run.json"


def load(path: Path = EXPECTED) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def compare(results: dict, expected: dict | None) -> str | None:
    """One line: this run's student against the README's for the same seed; None where the README has no such run
    (another experiment, or a seed it does not list)."""
    if not expected or results.get("experiment") != expected.get("experiment"):
        return None
    ref = (expected.get("seeds") or {}).get(str(results.get("seed")))
    stages = results.get("stages") or []
    if ref is None or not stages:
        return None
    student = stages[-1]
    where = f"{expected['machine']}, {expected['precision']}"
    if student.get("store_key") != ref["student_key"]:
        return (f"README figure: seed {results['seed']}'s student {100 * ref['test_acc']:.2f} % ({where}) is another "
                f"configuration (its store key {ref['student_key']}, this run's {student.get('store_key')}: a setting, "
                f"the data or the precision differs), so no comparison")
    acc = float(student["test_acc"])
    delta = 100 * (acc - ref["test_acc"])
    tol = float(expected["tolerance_pp"])
    verdict = "within" if abs(delta) <= tol else "OUTSIDE"
    return (f"README figure for seed {results['seed']}: student {100 * ref['test_acc']:.2f} % ({where}); this run "
            f"{100 * acc:.2f} % ({delta:+.2f} pp), {verdict} the ±{tol:g} pp expected on another x86 CPU "
            f"(README, 'The default run')")


def write(sweep_dir: Path, machine: str, tolerance_pp: float, path: Path = EXPECTED) -> dict:
    """The README's figures from a finished sweep of the default run (one results.json per seed)."""
    seeds, meta = {}, {}
    for f in sorted(sweep_dir.glob("*/results.json")):
        r = json.loads(f.read_text(encoding="utf-8"))
        if r.get("status") != "completed":
            continue
        student = r["stages"][-1]
        seeds[str(r["seed"])] = {"student_key": student["store_key"], "test_acc": student["test_acc"],
                                 "test_acc_last": student["test_acc_last"]}
        precision = (r.get("config") or {}).get("trainer.precision", "auto")
        if precision == "auto":  # what auto gave on the machine that ran it (this one)
            import torch

            from kdlab.pipeline.runtime import resolve_precision

            precision = resolve_precision(precision, torch.device("cpu"))
        meta = {"experiment": r["experiment"], "precision": str(precision)}
    if not seeds:
        raise ConfigError(f"no completed run under {sweep_dir} (a sweep directory of the default run: */results.json)")
    out = {**meta, "machine": machine, "tolerance_pp": tolerance_pp, "seeds": dict(sorted(seeds.items()))}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kdlab.cli.expected", description=__doc__.split("\n\n")[0])
    p.add_argument("--write", type=Path, required=True, help="the sweep directory of the README's default runs")
    p.add_argument("--machine", required=True, help="the CPU the README's figures were measured on")
    p.add_argument("--tolerance-pp", type=float, required=True, help="the measured spread across CPUs, in pp")
    a = p.parse_args(argv)
    try:
        out = write(a.write, a.machine, a.tolerance_pp)
    except ConfigError as e:
        from kdlab.cli.report import report_error

        return report_error("kdlab.cli.expected", e)
    print(f"wrote {EXPECTED}: seeds {', '.join(out['seeds'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
