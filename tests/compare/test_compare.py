"""kdlab.compare: loading, aggregation against hand-computed statistics, CSV/HTML/PNG outputs, CLI exit
codes, and the HTML rendered in headless Chromium."""
from __future__ import annotations

import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from kdlab.compare import cli as compare
from kdlab.compare import runs as compare_runs
from kdlab.compare import tables as compare_tables
from kdlab.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# student test_acc / test_acc_last / val_curve per (method, seed); teacher and TA accuracies too
STUDENT = {
    ("kd", 0): (0.801, 0.795, [0.60, 0.70, 0.75, 0.78, 0.80, 0.79, 0.81]),
    ("kd", 1): (0.812, 0.800, [0.62, 0.71, 0.74, 0.80, 0.77, 0.82, 0.80]),
    ("kd", 2): (0.790, 0.788, [0.61, 0.69, 0.76, 0.77, 0.79, 0.78, 0.79]),
    ("dgkd", 0): (0.842, 0.839, [0.65, 0.75, 0.80, 0.82, 0.83, 0.84, 0.84]),
    ("dgkd", 1): (0.851, 0.845, [0.66, 0.76, 0.81, 0.83, 0.85, 0.84, 0.85]),
    ("dgkd", 2): (0.836, 0.830, [0.64, 0.74, 0.79, 0.81, 0.82, 0.83, 0.84]),
}
TA = {("kd", 0): 0.861, ("kd", 1): 0.866, ("kd", 2): 0.858,
      ("dgkd", 0): 0.871, ("dgkd", 1): 0.869, ("dgkd", 2): 0.875}
TEACHER = 0.912
TEMPERATURE = {0: 2, 1: 4, 2: 4}
WALL = {("kd", 0): 100.0, ("kd", 1): 110.0, ("kd", 2): 120.0,
        ("dgkd", 0): 200.0, ("dgkd", 1): 210.0, ("dgkd", 2): 190.0}


def _stage(name, role, acc, last, curve, params, sources):
    return {"name": name, "role": role, "arch": f"plain{params % 10}", "sources": sources, "params": params,
            "store_key": f"key-{name}", "cached": False, "epochs": len(curve), "best_epoch": len(curve) - 1,
            "val_acc": max(curve), "test_acc": acc, "test_acc_last": last, "train_seconds": 1.0,
            "samples_per_second": 100.0, "checkpoint": f"store/{name}/model.pt", "val_curve": curve,
            "csv_log": None}


def results_for(method: str, seed: int) -> dict:
    acc, last, curve = STUDENT[(method, seed)]
    stages = [
        _stage("teacher", "teacher", TEACHER, 0.910, [0.8, 0.88, 0.9, 0.91], 2_493_452, []),
        _stage("ta1", "ta", TA[(method, seed)], TA[(method, seed)] - 0.002, [0.7, 0.8, 0.85, 0.86], 600_000,
               ["teacher"]),
        _stage("student", "student", acc, last, curve, 101_234, ["teacher", "ta1"] if method == "dgkd" else ["ta1"]),
    ]
    return {"schema": 1, "kdlab_version": "0.1.0", "experiment": f"{method}_fashion_mnist", "method": method,
            "dataset": "fashion_mnist", "seed": seed, "overrides": [f"seed={seed}", "+experiment=x"],
            "status": "completed", "stages": stages, "final": {"stage": "student", "test_acc": acc},
            "wall_seconds": WALL[(method, seed)],
            "config": {"distill.temperature": TEMPERATURE[seed], "distill.lam": 0.5}}


@pytest.fixture()
def sweep(tmp_path: Path) -> Path:
    """A fake multirun dir: 3 seeds x 2 methods, one failed job, one corrupted results.json."""
    root = tmp_path / "multirun"
    job = 0
    for method in ("kd", "dgkd"):
        for seed in range(3):
            d = root / str(job)
            d.mkdir(parents=True)
            (d / "results.json").write_text(json.dumps(results_for(method, seed)))
            job += 1
    failed = results_for("dgkd", 0)  # seed 3 died in the student stage
    failed.update(seed=3, overrides=["seed=3"], config={"distill.temperature": 4}, status="failed", error="TrainingError: NaN loss in stage 'student' at epoch 2 step 17",
                  stages=failed["stages"][:2], final=None)
    (root / "6").mkdir()
    (root / "6" / "results.json").write_text(json.dumps(failed))
    (root / "7").mkdir()
    (root / "7" / "results.json").write_text('{"schema": 1, "status": "compl')  # truncated write
    return root


def _row(rows, group):
    return next(r for r in rows if r["group"] == group)


def test_aggregate_matches_hand_computed_statistics(sweep, capsys):
    skipped = []
    runs = compare_runs.load_runs([sweep], skipped)
    assert len(runs) == 7 and len(skipped) == 1 and skipped[0][0].endswith(os.path.join("7", "results.json"))
    assert "skipping corrupted" in capsys.readouterr().err
    rows = compare_runs.aggregate(runs, ["method"], last_k=4)
    assert [r["group"] for r in rows] == ["dgkd", "kd"]
    kd, dgkd = _row(rows, "kd"), _row(rows, "dgkd")
    assert (kd["n"], kd["n_failed"], dgkd["n"], dgkd["n_failed"]) == (3, 0, 3, 1)

    kd_acc = [0.801, 0.812, 0.790]
    mean = (0.801 + 0.812 + 0.790) / 3
    std = ((0.801 - mean) ** 2 + (0.812 - mean) ** 2 + (0.790 - mean) ** 2) ** 0.5 / (3 - 1) ** 0.5
    assert kd["student_test_acc_mean"] == pytest.approx(mean)
    assert kd["student_test_acc_std"] == pytest.approx(std)
    assert kd["student_test_acc_std"] == pytest.approx(statistics.stdev(kd_acc))
    assert (kd["student_test_acc_min"], kd["student_test_acc_max"]) == (0.790, 0.812)
    assert kd["student_test_acc_range"] == pytest.approx(0.812 - 0.790)
    assert kd["student_test_acc_last_mean"] == pytest.approx((0.795 + 0.800 + 0.788) / 3)
    assert kd["student_test_acc_last_std"] == pytest.approx(statistics.stdev([0.795, 0.800, 0.788]))
    assert dgkd["student_test_acc_mean"] == pytest.approx((0.842 + 0.851 + 0.836) / 3)
    assert dgkd["student_test_acc_std"] == pytest.approx(statistics.stdev([0.842, 0.851, 0.836]))
    assert dgkd["student_test_acc_range"] == pytest.approx(0.851 - 0.836)

    assert list(kd["stages"]) == ["teacher", "ta1", "student"]
    assert kd["stages"]["teacher"]["mean"] == pytest.approx(0.912)
    assert kd["stages"]["ta1"]["mean"] == pytest.approx((0.861 + 0.866 + 0.858) / 3)
    assert kd["student_params"] == 101_234
    assert kd["wall_seconds_mean"] == pytest.approx(110.0)
    assert dgkd["wall_seconds_mean"] == pytest.approx(200.0)  # the failed run does not count

    # fluctuation over the last 4 epochs: 3 consecutive differences per run, then averaged over runs
    kd_runs = [[0.78, 0.80, 0.79, 0.81], [0.80, 0.77, 0.82, 0.80], [0.77, 0.79, 0.78, 0.79]]
    per_run = [(abs(c[1] - c[0]) + abs(c[2] - c[1]) + abs(c[3] - c[2])) / 3 for c in kd_runs]
    assert per_run[0] == pytest.approx(0.05 / 3)
    assert kd["val_fluct_mean"] == pytest.approx(sum(per_run) / 3)
    assert kd["val_fluct_std"] == pytest.approx(statistics.stdev(per_run))
    assert kd["val_fluct_max"] == pytest.approx(max(per_run))


def test_fluctuation_and_stats_edge_cases():
    assert compare_runs.val_fluctuation([0.5, 0.6, 0.55], last_k=5) == pytest.approx((0.1 + 0.05) / 2)
    assert compare_runs.val_fluctuation([0.5], last_k=5) is None
    assert compare_runs.val_fluctuation([0.1, 0.9, 0.5, 0.6], last_k=2) == pytest.approx(0.1)
    one = compare_runs.stats([0.7])
    assert one["n"] == 1 and one["mean"] == 0.7 and one["std"] is None and one["range"] == 0
    assert compare_tables.pct_pm(0.7, None) == "70.00 ± -"
    assert compare_tables.pct_pm(0.84321, 0.00512) == "84.32 ± 0.51"


def test_group_by_config_field_and_override(sweep):
    runs = compare_runs.load_runs([sweep])
    rows = compare_runs.aggregate(runs, ["distill.temperature"])
    assert [r["fields"]["distill.temperature"] for r in rows] == [2, 4]
    t2, t4 = rows
    assert t2["n"] == 2 and t4["n"] == 4 and t4["n_failed"] == 1
    assert t2["student_test_acc_mean"] == pytest.approx((0.801 + 0.842) / 2)
    assert t4["student_test_acc_std"] == pytest.approx(statistics.stdev([0.812, 0.790, 0.851, 0.836]))
    # two fields; seed comes from the top level, experiment from an override-free top-level key
    rows = compare_runs.aggregate(runs, ["method", "seed"])
    assert len(rows) == 7 and _row(rows, "method=kd, seed=1")["student_test_acc_std"] is None
    assert _row(rows, "method=dgkd, seed=3")["n"] == 0
    # an override key (not in config): "+experiment=x" -> experiment is top-level; use the override key
    runs[0]["overrides"].append("trainer.max_epochs=7")
    assert compare_runs.get_field(runs[0], "trainer.max_epochs") == 7
    with pytest.raises(ConfigError, match="unknown --by field 'nope'.*known: .*distill.temperature"):
        compare_runs.aggregate(runs, ["nope"])


def test_csv_log_fallback(tmp_path):
    log = tmp_path / "metrics.csv"
    log.write_text("epoch,step,train/loss,val/acc\n0,10,1.0,\n0,10,,0.5\n1,20,0.8,\n1,20,,0.6\n2,30,,0.7\n")
    stage = {"name": "student", "val_curve": None, "csv_log": "metrics.csv"}
    assert compare_runs.val_curve(stage, str(tmp_path)) == [0.5, 0.6, 0.7]
    assert compare_runs.val_curve({"val_curve": [0.1, 0.2]}) == [0.1, 0.2]


def test_curve_plot_draws_train_curves_dashed_beside_val_curves():
    """A stage with a train_curve gets dashed lines (each run's and the group mean) beside its solid val lines;
    a stage recorded without one (an older store entry) only its val lines."""
    from kdlab.compare.plots import curves_figure, plot_val_curves

    train = {0: [0.50, 0.70, 0.90], 1: [0.60, 0.80, 1.00]}
    runs = []
    for seed in (0, 1):
        r = results_for("kd", seed)
        r["stages"][-1]["train_curve"] = train[seed]  # the student has one, the teacher and TA none
        r["_dir"] = None
        runs.append(r)
    rows = compare_runs.aggregate(runs, ["method"])
    assert rows[0]["train_curves"]["student"] == [train[0], train[1]]
    assert rows[0]["train_curves"]["teacher"] == [[], []]
    fig = curves_figure(rows, ["teacher", "ta1", "student"])
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}
    dashed = [ln for ln in panels["student"].get_lines() if ln.get_linestyle() == "--"]
    solid = [ln for ln in panels["student"].get_lines() if ln.get_linestyle() == "-"]
    want = [[v * 100 for v in train[0]], [v * 100 for v in train[1]], [55.0, 75.0, 95.0]]  # runs, then the mean
    assert [list(ln.get_ydata()) for ln in dashed] == [pytest.approx(w) for w in want]
    assert [ln.get_label() for ln in dashed][-1] == "kd (train)"
    assert len(solid) == 3 and list(solid[0].get_ydata()) == pytest.approx([v * 100 for v in STUDENT[("kd", 0)][2]])
    assert "train dashed" in panels["student"].get_ylabel()
    assert not [ln for ln in panels["teacher"].get_lines() if ln.get_linestyle() == "--"]
    assert plot_val_curves(rows, ["student"]).startswith(PNG_MAGIC)


def test_outputs_csv_html_png(sweep, tmp_path, capsys):
    out = tmp_path / "report"
    assert compare.main([str(sweep), "--out", str(out), "--last-k", "4"]) == 0
    printed = capsys.readouterr()
    assert "Student accuracy" in printed.out and "Stability" in printed.out and "Failed runs" in printed.out
    assert "80.10 ± 1.10" in printed.out  # kd: mean 80.10 %, sample std 1.10 pp
    assert "skipping corrupted" in printed.err and "1 of 7 run(s) failed" in printed.err

    with open(out / "comparison.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [r["group"] for r in table] == ["dgkd", "kd"]
    kd = table[1]
    assert kd["method"] == "kd" and kd["n"] == "3" and kd["n_failed"] == "0"
    assert float(kd["student_test_acc_mean"]) == pytest.approx((0.801 + 0.812 + 0.790) / 3)
    assert float(kd["student_test_acc_std"]) == pytest.approx(statistics.stdev([0.801, 0.812, 0.790]))
    assert float(kd["student_test_acc_range"]) == pytest.approx(0.022)
    assert float(kd["acc_teacher_mean"]) == pytest.approx(0.912)
    assert float(kd["acc_ta1_mean"]) == pytest.approx((0.861 + 0.866 + 0.858) / 3)
    assert kd["student_params"] == "101234" and kd["last_k"] == "4"
    assert float(kd["wall_seconds_mean"]) == pytest.approx(110.0)
    # the last 4 epochs of kd's curves: |differences| .02 .01 .02, .03 .05 .02, .02 .01 .01 (as in the aggregate)
    assert float(kd["val_fluct_mean"]) == pytest.approx((0.05 + 0.10 + 0.04) / 9)

    for name in ("chain", "student", "val_curves"):
        png = (out / f"comparison_{name}.png").read_bytes()
        assert png.startswith(PNG_MAGIC) and len(png) > 5000
    page = (out / "comparison.html").read_text()
    assert page.count("data:image/png;base64,") == 3
    assert "<script" not in page.lower() and "http://" not in page and "https://" not in page
    assert "NaN loss in stage" in page and "Failed runs (1)" in page and "Skipped corrupted" in page
    assert "80.10 ± 1.10" in page


def _cli(*args, cwd=REPO):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "kdlab.compare", *map(str, args)], cwd=cwd, env=env,
                          check=False, capture_output=True, text=True, timeout=120)


def test_cli_exit_codes(sweep, tmp_path):
    ok = _cli(sweep, "--by", "method,distill.temperature", "--no-plots")
    assert ok.returncode == 0, ok.stderr
    assert (sweep / "comparison.csv").exists() and (sweep / "comparison.html").exists()  # default --out
    assert "Traceback" not in ok.stderr

    empty = tmp_path / "empty"
    empty.mkdir()
    r = _cli(empty)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"kdlab.compare: error: no results.json found under {empty}"]

    bad = tmp_path / "bad"
    for i, text in enumerate(['{"status": ', "[1, 2]", "\x00\xff garbage", '{"status": "completed", "stages": []}']):
        (bad / str(i)).mkdir(parents=True)
        (bad / str(i) / "results.json").write_text(text)
    r = _cli(bad, "--no-plots")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert sum("skipping corrupted" in line for line in lines) == 4
    assert lines[-1].startswith("kdlab.compare: error: no valid results.json")

    r = _cli(sweep / "0" / "results.json", "--by", "nope", "--no-plots")
    assert r.returncode == 2 and "unknown --by field 'nope'" in r.stderr and "Traceback" not in r.stderr
    r = _cli(tmp_path / "missing")
    assert r.returncode == 2 and "path does not exist" in r.stderr


def test_all_failed_sweep_is_a_message_not_a_crash(tmp_path, capsys):
    res = results_for("kd", 0)
    res.update(status="failed", error="DataError: no data", stages=[])
    (tmp_path / "results.json").write_text(json.dumps(res))
    assert compare.main([str(tmp_path), "--no-plots"]) == 0
    err = capsys.readouterr().err
    assert "1 of 1 run(s) failed" in err and "no completed run" in err
    assert "DataError: no data" in (tmp_path / "comparison.html").read_text()


CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
def test_html_in_headless_chromium(sweep, tmp_path):
    from PIL import Image

    out = tmp_path / "report"
    assert compare.main([str(sweep), "--out", str(out)]) == 0
    url = (out / "comparison.html").resolve().as_uri()
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", "--hide-scrollbars", "--enable-logging=stderr", "--v=0",
             f"--user-data-dir={tmp_path / 'profile'}"]
    shot = tmp_path / "shot.png"
    r = subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1280,2000", url],
                       check=False, capture_output=True, text=True, timeout=120)
    assert shot.exists(), r.stderr[-2000:]
    assert "Uncaught" not in r.stderr and "SyntaxError" not in r.stderr
    img = Image.open(shot).convert("RGB")
    colors = img.getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 50, "screenshot looks blank"
    white = max(count for count, c in colors if c == (255, 255, 255)) if any(
        c == (255, 255, 255) for _, c in colors) else 0
    assert white < 0.98 * img.width * img.height, "screenshot is (almost) all white"

    r = subprocess.run([*flags, "--dump-dom", url], check=False, capture_output=True, text=True, timeout=120)
    dom = r.stdout
    assert "<table" in dom and "Student accuracy" in dom and "Stability" in dom
    assert dom.count("data:image/png;base64,") == 3 and "Uncaught" not in r.stderr


# ------------------------------------------------------------------ data-free runs: their generated images

def dafl_results(seed: int, cached: bool = False, last: float = 0.60, best_val: float = 0.62) -> dict:
    """results.json of a dafl_fashion_mnist run, in the runner's format (kdlab/pipeline/runner.py): a data-free
    student's test_acc is its last epoch's, test_acc_best_val the epoch picked on the real validation split."""
    teacher = _stage("teacher", "teacher", 0.86, 0.86, [0.80, 0.84, 0.86], 61_706, [])
    student = {**_stage("student", "student", last, last, [0.31, 0.55, 0.63, 0.61], 15_738, ["teacher"]),
               "arch": "lenet5_half", "cached": cached, "extra_params": 856_065, "best_epoch": 2, "epochs": 11,
               "val_acc": 0.61, "data_free": True, "test_acc_best_val": best_val, "val_acc_best": 0.63}
    return {"schema": 1, "kdlab_version": "0.1.0", "experiment": "dafl_fashion_mnist", "method": "dafl",
            "dataset": "fashion_mnist", "seed": seed, "overrides": [f"seed={seed}"], "status": "completed",
            "stages": [teacher, student],
            "final": {"stage": "student", "test_acc": last, "test_acc_last": last, "val_acc": 0.61},
            "wall_seconds": 120.0, "config": {}}


def save_grid(path: Path, value: float) -> bytes:
    """A real 8x8 grid of 1x28x28 images, as DataFreeModule.save_grid writes it."""
    import torch
    from torchvision.utils import save_image

    path.parent.mkdir(parents=True, exist_ok=True)
    images = torch.full((64, 1, 28, 28), value)
    images[:, :, ::3] = 0.0  # not constant, so that normalize=True keeps the picture
    save_image(images, str(path), nrow=8, normalize=True)
    return path.read_bytes()


@pytest.fixture()
def dafl_sweep(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """Two trained DAFL runs (grids of epochs 0, 9 and 10, and a stray file), one whose student came from
    the store (no grids in its directory), and a KD run (not data-free)."""
    import base64

    root = tmp_path / "multirun"
    last: dict[str, bytes] = {}
    for job, seed in ((0, 0), (1, 1)):
        d = root / str(job)
        d.mkdir(parents=True)
        (d / "results.json").write_text(json.dumps(dafl_results(seed, last=0.60 + seed / 100)))
        grids = d / "generated" / "student"
        for epoch in (0, 9):
            save_grid(grids / f"epoch_{epoch:03d}.png", 0.1 * (epoch + 1) + seed)
        last[str(grids / "epoch_010.png")] = save_grid(grids / "epoch_010.png", 5.0 + seed)
        (grids / "epoch_latest.png").write_bytes(PNG_MAGIC)  # not a grid name: ignored
    (root / "2").mkdir()
    (root / "2" / "results.json").write_text(json.dumps(dafl_results(2, cached=True)))
    (root / "3").mkdir()
    (root / "3" / "results.json").write_text(json.dumps(results_for("kd", 0)))
    return root, {p: base64.b64encode(b).decode("ascii") for p, b in last.items()}


def test_generated_grids_of_data_free_runs(dafl_sweep):
    root, last = dafl_sweep
    runs = {r["_dir"]: r for r in compare_runs.load_runs([root])}
    assert compare_runs.generated_grids(runs[str((root / "3").resolve())]) == []  # KD: no data-free stage
    g = compare_runs.generated_grids(runs[str((root / "0").resolve())])
    assert g == [{"stage": "student", "epochs": 11, "cached": False, "epoch": 10,
                  "path": str((root / "0" / "generated" / "student" / "epoch_010.png").resolve())}]
    assert compare_runs.generated_grids(runs[str((root / "2").resolve())]) == [
        {"stage": "student", "epochs": 11, "cached": True, "epoch": None, "path": None}]

    rows = compare_runs.aggregate(list(runs.values()), ["method"])
    dafl, kd = _row(rows, "dafl"), _row(rows, "kd")
    assert dafl["data_free"] is True and kd["data_free"] is False
    # the reported number of a data-free student is its last epoch; best-on-val is labelled, not reported
    assert dafl["student_test_acc_mean"] == pytest.approx((0.60 + 0.61 + 0.60) / 3)
    assert dafl["student_test_acc_best_val_mean"] == pytest.approx(0.62)
    assert kd["student_test_acc_best_val_mean"] == kd["student_test_acc_mean"] == 0.801
    assert sorted(dafl["generated_grids"]) == sorted(str(Path(p).resolve()) for p in last)


def test_html_embeds_the_last_grid_of_each_data_free_run(dafl_sweep, tmp_path, capsys):
    root, last = dafl_sweep
    out = tmp_path / "report"
    assert compare.main([str(root), "--out", str(out), "--no-plots"]) == 0
    printed = capsys.readouterr().out
    assert "Generated images" in printed and "reused from the store" in printed
    assert "data-free students (dafl)" in printed and "62.00 ± 0.00" in printed  # the best-on-val, labelled

    page = (out / "comparison.html").read_text()
    assert "<h2>Generated images</h2>" in page
    assert page.count("data:image/png;base64,") == 2  # the two trained runs' last grids, nothing else
    for b64 in last.values():  # the last grid's own bytes, embedded: the page needs no run directory
        assert f"data:image/png;base64,{b64}'" in page
    for seed in (0, 1):  # epoch_010.png (0-based) is the 11th and last epoch, after epoch_009 by number
        assert f"dafl_fashion_mnist, seed {seed}, stage student: epoch 11 of 11 (" in page
    assert "dafl_fashion_mnist, seed 2, stage student: no grid (reused from the store" in page
    assert "<script" not in page.lower() and "file://" not in page and "src='/" not in page

    with open(out / "comparison.csv", newline="") as fh:
        table = {r["group"]: r for r in csv.DictReader(fh)}
    assert sorted(table["dafl"]["generated_grids"].split(";")) == sorted(str(Path(p).resolve()) for p in last)
    assert table["dafl"]["data_free"] == "True" and table["kd"]["generated_grids"] == ""
    assert float(table["dafl"]["student_test_acc_best_val_mean"]) == pytest.approx(0.62)

    # a report without data-free runs has no such section (and the grids cost nothing)
    shutil.rmtree(out)
    assert compare.main([str(root / "3"), "--out", str(out), "--no-plots"]) == 0
    assert "Generated images" not in (out / "comparison.html").read_text()
