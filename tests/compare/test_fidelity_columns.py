"""kdlab.compare and the study tables show the student's fidelity and calibration (agreement with its teacher and
each source, KL to the teacher, ECE): the terminal table, comparison.csv, the HTML page, the paired columns of
--baseline / --pairs, and a study part's markdown; statistics against hand values. Runs of an older kdlab (no such
fields) keep the tables they had."""
from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest

from kdlab.compare import cli as compare
from kdlab.compare import runs as compare_runs
from kdlab.study.tables import part_markdown

# per (experiment, seed): student test_acc, agreement with teacher, with ta1, KL to the teacher, ECE
STUDENT = {
    ("alone", 0): (0.80, None, None, None, 0.050),
    ("alone", 1): (0.81, None, None, None, 0.060),
    ("alone", 2): (0.79, None, None, None, 0.040),
    ("kd", 0): (0.82, 0.900, 0.930, 0.120, 0.030),
    ("kd", 1): (0.83, 0.910, 0.950, 0.100, 0.020),
    ("kd", 2): (0.81, 0.880, 0.920, 0.140, 0.040),
    ("dgkd", 0): (0.84, 0.930, 0.960, 0.080, 0.025),
    ("dgkd", 1): (0.85, 0.940, 0.970, 0.070, 0.015),
    ("dgkd", 2): (0.83, 0.920, 0.950, 0.090, 0.035),
}


def results_for(exp: str, seed: int, fidelity: bool = True) -> dict:
    acc, agree_t, agree_ta, kl, ece = STUDENT[(exp, seed)]
    teacher = {"name": "teacher", "role": "teacher", "arch": "plain4", "sources": [], "params": 1000,
               "test_acc": 0.9, "test_acc_last": 0.9, "val_curve": [0.8, 0.9], **({"ece": 0.01} if fidelity else {})}
    ta = {"name": "ta1", "role": "ta", "arch": "plain3", "sources": ["teacher"], "params": 500, "test_acc": 0.88,
          "test_acc_last": 0.88, "val_curve": [0.8, 0.88]}
    student = {"name": "student", "role": "student", "arch": "plain2", "sources": [], "params": 100,
               "test_acc": acc, "test_acc_last": acc, "val_curve": [acc - 0.01, acc]}
    stages = [teacher, ta, student] if exp != "alone" else [student]
    if fidelity:
        ta.update(ece=0.02, agreement={"teacher": 0.95}, agreement_teacher=0.95, kl_teacher=0.05,
                  teacher_stages=["teacher"])
        student["ece"] = ece
        if exp != "alone":
            student.update(sources=["teacher", "ta1"], agreement={"teacher": agree_t, "ta1": agree_ta},
                           agreement_teacher=agree_t, kl_teacher=kl, teacher_stages=["teacher"])
    return {"schema": 1, "experiment": exp, "method": exp, "dataset": "synthetic", "seed": seed, "overrides": [],
            "status": "completed", "stages": stages, "final": {"stage": "student", "test_acc": acc}, "config": {},
            "wall_seconds": 10.0}


def write_runs(root: Path, fidelity: bool = True) -> Path:
    for i, (exp, seed) in enumerate(STUDENT):
        d = root / str(i)
        d.mkdir(parents=True)
        (d / "results.json").write_text(json.dumps(results_for(exp, seed, fidelity)))
    return root


def values(exp: str, k: int) -> list[float]:
    return [v[k] for (e, _), v in STUDENT.items() if e == exp]


def test_aggregate_fidelity_against_hand_statistics(tmp_path):
    rows = {r["group"]: r for r in compare_runs.aggregate(compare_runs.load_runs([write_runs(tmp_path)]),
                                                          ["experiment"])}
    kd = rows["experiment=kd"]
    assert kd["student_agreement_teacher_mean"] == pytest.approx(statistics.fmean(values("kd", 1)))
    assert kd["student_agreement_teacher_std"] == pytest.approx(statistics.stdev(values("kd", 1)))
    assert kd["student_kl_teacher_mean"] == pytest.approx(0.12)
    assert kd["student_ece_mean"] == pytest.approx(0.03) and kd["student_ece_std"] == pytest.approx(0.01)
    assert list(kd["student_agreement"]) == ["teacher", "ta1"]
    assert kd["student_agreement"]["ta1"]["mean"] == pytest.approx(statistics.fmean(values("kd", 2)))
    assert kd["stages"]["teacher"]["ece_mean"] == pytest.approx(0.01)
    alone = rows["experiment=alone"]  # a student without sources: its ECE only
    assert alone["student_agreement_teacher_mean"] is None and alone["student_agreement"] == {}
    assert alone["student_ece_mean"] == pytest.approx(0.05)


def test_terminal_csv_html_and_paired_columns(tmp_path, capsys):
    runs, out = write_runs(tmp_path / "runs"), tmp_path / "out"
    assert compare.main([str(runs), "--by", "experiment", "--baseline", "experiment=kd", "--pairs", "dgkd,alone",
                         "--out", str(out), "--no-plots"]) == 0
    printed = capsys.readouterr().out
    assert "Fidelity and calibration" in printed
    kd_cells = ["89.67 ± 1.53", "0.120 ± 0.020", "3.00 ± 1.00", "teacher 89.67, ta1 93.33"]
    assert all(c in printed for c in kd_cells), printed  # agreement %, KL in nats (3 decimals), ECE %
    with open(out / "comparison.csv", newline="") as fh:
        table = {r["group"]: r for r in csv.DictReader(fh)}
    kd = table["experiment=kd"]
    assert float(kd["student_agreement_teacher_mean"]) == pytest.approx(statistics.fmean(values("kd", 1)))
    assert float(kd["student_kl_teacher_std"]) == pytest.approx(statistics.stdev(values("kd", 3)))
    assert float(kd["student_agreement_ta1_mean"]) == pytest.approx(statistics.fmean(values("kd", 2)))
    assert float(kd["ece_teacher_mean"]) == pytest.approx(0.01) and float(kd["ece_student_mean"]) == pytest.approx(0.03)
    assert table["experiment=alone"]["student_agreement_teacher_mean"] == ""  # no sources: none
    page = (out / "comparison.html").read_text()
    assert "<h2>Fidelity and calibration</h2>" in page and all(c in page for c in kd_cells)
    assert "<th>agreement with teacher %</th><th>KL to teacher (nats)</th><th>ECE %</th>" in page  # per run

    # paired, runs sharing a seed: dgkd - kd per seed, by hand
    with open(out / "comparison_paired.csv", newline="") as fh:
        paired = {(r["group"], r["baseline"]): r for r in csv.DictReader(fh)}
    dg = paired[("experiment=dgkd", "experiment=kd")]
    diffs = {k: [a - b for a, b in zip(values("dgkd", k), values("kd", k))] for k in (1, 3, 4)}
    assert float(dg["agreement_teacher_mean"]) == pytest.approx(statistics.fmean(diffs[1]))  # +0.0333
    assert float(dg["kl_teacher_mean"]) == pytest.approx(statistics.fmean(diffs[3]))  # -0.04
    assert float(dg["ece_mean"]) == pytest.approx(statistics.fmean(diffs[4])) and dg["ece_n"] == "3"
    # diffs of ECE: -0.005 each seed: no spread, the interval is the value itself
    assert float(dg["ece_ci_t_low"]) == pytest.approx(-0.005) == float(dg["ece_ci_t_high"])
    # t interval of the agreement differences (0.03, 0.03, 0.04): mean 0.0333, sd 0.00577, t(0.975, 2) = 4.302653
    half = 4.302653 * statistics.stdev(diffs[1]) / 3 ** 0.5
    assert float(dg["agreement_teacher_ci_t_low"]) == pytest.approx(statistics.fmean(diffs[1]) - half, abs=1e-6)
    vs_alone = paired[("experiment=dgkd", "experiment=alone")]  # the student alone has no teacher: ECE only
    assert vs_alone["agreement_teacher_mean"] == "" and float(vs_alone["ece_mean"]) == pytest.approx(-0.025)
    assert "Paired comparison (student fidelity and calibration" in printed
    for text in (printed, page):
        assert "agreement Δ (pp) [95% CI]" in text and "KL Δ (nats) [95% CI]" in text and "ECE Δ (pp) [95% CI]" in text
        assert "+3.33 [+1.90, +4.77]" in text and "-0.040 [-0.065, -0.015]" in text and "-0.50 [-0.50, -0.50]" in text


def test_runs_of_an_older_kdlab_keep_their_tables(tmp_path, capsys):
    runs, out = write_runs(tmp_path / "runs", fidelity=False), tmp_path / "out"
    assert compare.main([str(runs), "--by", "experiment", "--baseline", "experiment=kd", "--out", str(out),
                         "--no-plots"]) == 0
    printed = capsys.readouterr().out
    assert "Fidelity and calibration" not in printed and "agreement Δ" not in printed
    page = (out / "comparison.html").read_text()
    assert "Fidelity" not in page and "ECE" not in page
    with open(out / "comparison.csv", newline="") as fh:
        assert all(r["student_ece_mean"] == "" for r in csv.DictReader(fh))


def test_a_study_part_shows_agreement_kl_and_ece_beside_the_accuracy(tmp_path):
    rows = compare_runs.aggregate(compare_runs.load_runs([write_runs(tmp_path)]), ["experiment"])
    md = part_markdown("Part", rows, {})
    head = next(line for line in md.splitlines() if line.startswith("| experiment"))
    cols = [c.strip() for c in head.strip("|").split("|")]
    at = cols.index("student last epoch %")
    assert cols[at + 2:at + 5] == ["agreement with teacher %", "KL to teacher (nats)", "ECE %"]
    kd = next(line for line in md.splitlines() if line.startswith("| kd"))
    cells = [c.strip() for c in kd.strip("|").split("|")]
    assert cells[at + 2:at + 5] == ["89.67 ± 1.53", "0.120 ± 0.020", "3.00 ± 1.00"]
    alone = next(line for line in md.splitlines() if line.startswith("| alone"))
    assert [c.strip() for c in alone.strip("|").split("|")][at + 2:at + 5] == ["-", "-", "5.00 ± 1.00"]
    assert "expected calibration error" in md
    old = compare_runs.aggregate(compare_runs.load_runs([write_runs(tmp_path / "old", fidelity=False)]),
                                 ["experiment"])
    assert "ECE" not in part_markdown("Part", old, {})
