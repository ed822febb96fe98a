"""Paired statistics (kdlab/compare/paired.py, ``python -m kdlab.compare --baseline / --pairs``) against hand values."""
from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from kdlab.compare.paired import compare_groups, paired_table, parse_baseline, t_interval
from kdlab.errors import ConfigError
from tests.helpers.cli import ROOT, kdlab_env


def row(name: str, accs: dict[int, float]) -> dict:
    return {"group": f"method={name}", "fields": {"method": name}, "n": len(accs),
            "accuracies": list(accs.items())}


def test_two_pairs_by_hand():
    # diffs 0.01, 0.03: mean 0.02, sd 0.0141421, se 0.01, t(0.975, 1 df) = 12.7062 -> 0.02 +- 0.127062
    r = compare_groups(row("kd", {0: 0.81, 1: 0.83}), row("alone", {0: 0.80, 1: 0.80}))
    assert r["paired"] and r["n"] == 2 and r["mean"] == pytest.approx(0.02)
    assert r["ci_t"][0] == pytest.approx(0.02 - 0.127062, abs=1e-5)
    assert r["ci_t"][1] == pytest.approx(0.02 + 0.127062, abs=1e-5)
    assert r["ci_bootstrap"] is None  # n < 5
    assert (r["wins"], r["ties"], r["losses"]) == (2, 0, 0) and r["verdict"] == "not distinguishable"


def test_ties_and_a_clear_gain_by_hand():
    # diffs 0, 0.02, 0.04: mean 0.02, sd 0.02, se 0.0115470, t(0.975, 2 df) = 4.302653 -> 0.02 +- 0.049683
    r = compare_groups(row("kd", {0: 0.80, 1: 0.82, 2: 0.84}), row("alone", {0: 0.80, 1: 0.80, 2: 0.80}))
    assert (r["wins"], r["ties"], r["losses"]) == (2, 1, 0)
    assert r["ci_t"] == pytest.approx((0.02 - 0.049683, 0.02 + 0.049683), abs=1e-5)
    # diffs 0.05, 0.06, 0.07: se 0.00577350 -> half width 0.0248414 -> [0.0351586, 0.0848414]: better
    g = compare_groups(row("dgkd", {0: 0.85, 1: 0.86, 2: 0.87}), row("alone", {0: 0.80, 1: 0.80, 2: 0.80}))
    assert g["ci_t"] == pytest.approx((0.0351586, 0.0848414), abs=1e-6) and g["verdict"] == "better"
    w = compare_groups(row("alone", {0: 0.80, 1: 0.80, 2: 0.80}), row("dgkd", {0: 0.85, 1: 0.86, 2: 0.87}))
    assert w["verdict"] == "worse" and w["mean"] == pytest.approx(-0.06)


def test_equal_differences_and_single_pairs():
    same = compare_groups(row("a", {0: 0.9, 1: 0.8}), row("b", {0: 0.8, 1: 0.7}))
    assert same["ci_t"] == pytest.approx((0.1, 0.1)) and same["verdict"] == "better"  # no spread: exact
    one = compare_groups(row("a", {0: 0.9}), row("b", {0: 0.8}))
    assert one["n"] == 1 and one["ci_t"] is None and one["verdict"] == "not distinguishable"
    assert t_interval([0.5]) is None


def test_bootstrap_from_five_pairs_is_seeded():
    a = row("a", {s: 0.80 + 0.01 * s for s in range(6)})
    b = row("b", {s: 0.80 + 0.004 * (s % 3) for s in range(6)})
    r1, r2 = compare_groups(a, b), compare_groups(a, b)
    lo, hi = r1["ci_bootstrap"]
    assert lo < r1["mean"] < hi and r1["ci_bootstrap"] == r2["ci_bootstrap"]


def test_pairs_never_mix_seeds():
    # the groups share seeds 1 and 2 only: seed 0 and 3 are left out of the pairs
    r = compare_groups(row("a", {0: 0.5, 1: 0.81, 2: 0.83}), row("b", {1: 0.80, 2: 0.80, 3: 0.99}))
    assert r["seeds"] == [1, 2] and r["mean"] == pytest.approx(0.02)
    # no seed in common: compared unpaired (Welch) and labelled so
    u = compare_groups(row("a", {0: 0.81, 1: 0.83}), row("b", {2: 0.80, 3: 0.79}))
    assert not u["paired"] and u["n"] == 0 and u["mean"] == pytest.approx(0.025) and u["ci_t"] is not None
    with pytest.raises(ConfigError, match="two completed runs with seed 0"):
        compare_groups({"group": "method=a", "accuracies": [(0, 0.8), (0, 0.81)]}, row("b", {0: 0.8}))


def test_baseline_and_pairs_selection():
    rows = [row("alone", {0: 0.8, 1: 0.8}), row("kd", {0: 0.81, 1: 0.82}), row("dgkd", {0: 0.83, 1: 0.84})]
    out = paired_table(rows, ["method"], baseline="method=alone", pairs=["dgkd,kd"])
    assert [(r["group"], r["baseline"]) for r in out] == [
        ("method=kd", "method=alone"), ("method=dgkd", "method=alone"), ("method=dgkd", "method=kd")]
    assert parse_baseline("alone", ["method"]) == {"method": "alone"}
    with pytest.raises(ConfigError, match="matches no group; groups: method=alone, method=kd, method=dgkd"):
        paired_table(rows, ["method"], baseline="method=nope")
    with pytest.raises(ConfigError, match="must name two groups"):
        paired_table(rows, ["method"], pairs=["kd"])


def _run_dir(root, name, exp, seed, acc):
    d = root / name
    d.mkdir(parents=True)
    st = {"name": "student", "role": "student", "arch": "plain2", "sources": [], "params": 10, "cached": False,
          "epochs": 2, "best_epoch": 1, "val_acc": acc, "test_acc": acc, "test_acc_last": acc,
          "val_curve": [acc - 0.01, acc]}
    (d / "results.json").write_text(json.dumps({
        "schema": 1, "experiment": exp, "method": exp, "dataset": "synthetic", "seed": seed, "overrides": [],
        "status": "completed", "stages": [st], "final": {"stage": "student", "test_acc": acc}, "config": {}}))


def test_compare_cli_writes_the_paired_table(tmp_path):
    for i, (exp, seed, acc) in enumerate([("alone", 0, 0.80), ("alone", 1, 0.82), ("kd", 0, 0.83),
                                          ("kd", 1, 0.84), ("other", 7, 0.9), ("other", 8, 0.91)]):
        _run_dir(tmp_path / "runs", str(i), exp, seed, acc)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "kdlab.compare", str(tmp_path / "runs"), "--by", "experiment",
                        "--baseline", "experiment=alone", "--pairs", "kd,other", "--out", str(out)],
                       cwd=ROOT, env=kdlab_env(), capture_output=True, text=True, timeout=180, check=False)
    assert r.returncode == 0, r.stderr
    assert "Paired comparison" in r.stdout
    with open(out / "comparison_paired.csv") as fh:
        got = {(x["group"], x["baseline"]): x for x in csv.DictReader(fh)}
    kd = got[("experiment=kd", "experiment=alone")]
    assert kd["paired"] == "True" and kd["n"] == "2" and float(kd["mean"]) == pytest.approx(0.025)
    assert kd["seeds"] == "0 1" and kd["wins"] == "2"
    assert got[("experiment=other", "experiment=alone")]["paired"] == "False"  # no shared seed
    page = (out / "comparison.html").read_text()
    assert "Paired comparison" in page and "alt='paired'" in page
    # a page that travels: run paths relative to the compared directory, the command, commit and environment
    assert str(tmp_path / "runs" / "0") not in page and "0/results.json" in page
    assert "Command: `python -m kdlab.compare " in page and "kdlab commit" in page
    bad = subprocess.run([sys.executable, "-m", "kdlab.compare", str(tmp_path / "runs"), "--by", "experiment",
                          "--baseline", "experiment=nope"], cwd=ROOT, env=kdlab_env(), capture_output=True,
                         text=True, timeout=180, check=False)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "matches no group" in bad.stderr
