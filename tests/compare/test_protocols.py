"""kdlab.compare and protocols: every row says its protocol, runs of two protocols are never one group, a baseline
is compared within its own protocol (the others left out with a warning), and --pairs across protocols is one line,
exit 2 (docs/compare.md#protocols)."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from kdlab.compare import cli as compare
from kdlab.compare import runs as compare_runs
from kdlab.compare import tables as compare_tables
from kdlab.compare.paired import paired_table
from kdlab.errors import ConfigError
from tests.compare.test_compare import results_for

# the student's test curve of a reference run per (method, seed): its last epoch is test_acc, its max the best on test
CURVES = {("kd", 0): [0.70, 0.78, 0.77], ("kd", 1): [0.71, 0.80, 0.79], ("dgkd", 0): [0.72, 0.83, 0.81],
          ("dgkd", 1): [0.70, 0.82, 0.84]}


def reference_results(method: str, seed: int) -> dict:
    run = results_for(method, seed)
    curve = CURVES[(method, seed)]
    for s in run["stages"]:
        s.update(val_acc=None, val_curve=None, best_epoch=None, test_curve=curve, test_acc=curve[-1],
                 test_acc_last=curve[-1], test_acc_best_on_test=max(curve), best_epoch_on_test=curve.index(max(curve)))
    run.update(protocol="reference", final={"stage": "student", "test_acc": curve[-1]})
    return run


@pytest.fixture()
def mixed(tmp_path: Path) -> Path:
    """kd and dgkd, seeds 0 and 1, under both protocols (the heldout runs written before protocols existed)."""
    root = tmp_path / "mixed"
    job = 0
    for method in ("kd", "dgkd"):
        for seed in (0, 1):
            for run in (results_for(method, seed), reference_results(method, seed)):
                (root / str(job)).mkdir(parents=True)
                (root / str(job) / "results.json").write_text(json.dumps(run))
                job += 1
    return root


def test_runs_of_two_protocols_are_never_one_group(mixed):
    rows = compare_runs.aggregate(compare_runs.load_runs([mixed]), ["method"])
    assert [(r["group"], r["protocol"], r["n"]) for r in rows] == [
        ("dgkd", "heldout", 2), ("kd", "heldout", 2), ("dgkd [reference]", "reference", 2),
        ("kd [reference]", "reference", 2)]
    ref = next(r for r in rows if r["group"] == "kd [reference]")
    last = [CURVES[("kd", s)][-1] for s in (0, 1)]
    best = [max(CURVES[("kd", s)]) for s in (0, 1)]
    assert ref["student_test_acc_mean"] == pytest.approx(statistics.fmean(last))  # the last epoch
    assert ref["student_test_acc_best_on_test_mean"] == pytest.approx(statistics.fmean(best))
    assert ref["student_test_acc_best_on_test_std"] == pytest.approx(statistics.stdev(best))
    held = next(r for r in rows if r["group"] == "kd")
    assert held["student_test_acc_best_on_test_mean"] is None
    assert held["val_curves"]["student"] and ref["val_curves"]["student"] == [CURVES[("kd", 0)], CURVES[("kd", 1)]]


def test_every_table_labels_its_numbers_with_the_protocol(mixed):
    rows = compare_runs.aggregate(compare_runs.load_runs([mixed]), ["method"])
    for title, (head, body) in compare_tables.table_specs(rows, ["method"]).items():
        assert head[:2] == ["method", "protocol"], title
        assert [line[1] for line in body] == ["heldout", "heldout", "reference", "reference"], title
    head, body = compare_tables.table_specs(rows, ["method"])["Student accuracy"]
    col = head.index("best-on-test acc %")
    best = [max(CURVES[("kd", s)]) for s in (0, 1)]
    assert [line[col] for line in body][:2] == ["-", "-"]
    assert body[3][col] == f"{100 * statistics.fmean(best):.2f} ± {100 * statistics.stdev(best):.2f}"
    note = compare_tables.table_note("Student accuracy", rows)
    assert "protocol reference" in note and "never one group" in note


def test_a_baseline_is_compared_within_its_protocol(mixed, capsys):
    rows = compare_runs.aggregate(compare_runs.load_runs([mixed]), ["method"])
    with pytest.raises(ConfigError, match=r"matches 2 groups .*runs of two protocols.*protocol=heldout\|reference"):
        paired_table(rows, ["method"], baseline="kd")
    out = paired_table(rows, ["method"], baseline="method=kd,protocol=reference")
    assert [(r["group"], r["baseline"]) for r in out] == [("dgkd [reference]", "kd [reference]")]
    diffs = [CURVES[("dgkd", s)][-1] - CURVES[("kd", s)][-1] for s in (0, 1)]  # the last epochs, paired by seed
    assert out[0]["diffs"] == pytest.approx(diffs)
    assert "the groups of another protocol are not compared with it (dgkd, kd)" in capsys.readouterr().err


def test_the_cli_refuses_pairs_across_protocols_in_one_line(mixed, capsys):
    code = compare.main([str(mixed), "--by", "protocol", "--no-plots", "--pairs", "reference,heldout"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("kdlab.compare: error: cannot compare protocol=reference (reference)")
    assert "runs of two protocols measure their numbers differently" in err[0]
    code = compare.main([str(mixed), "--by", "method", "--no-plots", "--baseline", "method=kd,protocol=heldout"])
    assert code == 0
    header = (mixed / "comparison.csv").read_text().splitlines()[0].split(",")
    assert header[:3] == ["group", "method", "protocol"] and "student_test_acc_best_on_test_mean" in header
