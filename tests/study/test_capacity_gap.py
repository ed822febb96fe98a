"""The capacity-gap study: a stage trained with its own augmentation (pipeline.per_stage.<stage>.augment), the
gain-vs-gap table and figure (kdlab/compare/gain_vs_gap.py), the study config, and a tiny synthetic study end to end."""
from __future__ import annotations

import csv
import json

import pytest
import torch

from kdlab.compare import gain_vs_gap
from kdlab.compare.paired import paired_table
from kdlab.data import build_datamodule
from kdlab.errors import ConfigError
from kdlab.pipeline import build_stages
from kdlab.study import config as study_config
from kdlab.study import tables as study_tables
from tests.helpers.cli import ROOT, read_results, run_kdlab, run_study

SYNTH = {"name": "synthetic", "root": "data", "download": False, "subset": None, "test_subset": None,
         "val_split": 0.1, "split_seed": 0, "augment": "none", "pad": 4, "num_classes": 10, "channels": 1,
         "image_size": 28, "n_train": 200, "n_test": 50, "noise": 0.5, "batch_size_eval": None}


# -- a stage with its own augmentation ----------------------------------------------------------------------
def test_per_stage_augment_is_the_stages_own_and_changes_only_its_fingerprint():
    dm = build_datamodule(SYNTH, batch_size=32, seed=0)
    plain = dm.fingerprint()
    d = dm.for_stage(augment="crop_flip")
    assert d.augment == "crop_flip" and not d.deterministic_train
    flipped = d.fingerprint()
    augmented, *_ = next(iter(d.train_dataloader()))
    assert flipped != plain
    assert dm.augment == "none" and dm.fingerprint() == plain and dm.deterministic_train  # the data's own
    unaugmented, *_ = next(iter(dm.train_dataloader()))  # the same images in the same order, not cropped
    assert augmented.shape == unaugmented.shape and not torch.equal(augmented, unaugmented)
    assert dm.for_stage(augment="crop_flip").fingerprint() == flipped  # the same augmentation: the same store key
    assert dm.for_stage(augment=None).fingerprint() == plain
    with pytest.raises(ConfigError, match=r"pipeline.per_stage.teacher.augment 'rotate'.*known: none, flip, crop_flip"):
        dm.check_augment("rotate", "pipeline.per_stage.teacher.augment")


def test_per_stage_augment_reaches_the_teacher_spec_only(compose):
    cfg = compose("+experiment=capacity_gap/gap_takd_fashion_mnist", "gap.width=0.25")
    specs = build_stages(cfg)
    assert [(s.name, s.augment, s.seed) for s in specs] == [("teacher", "crop_flip", 0), ("ta1", None, 0),
                                                             ("ta2", None, 0), ("student", None, 0)]
    assert specs[-1].model["kwargs"] == {"width_mult": 0.25} and specs[0].max_epochs == 12
    assert [s.max_epochs for s in specs[1:]] == [5, 5, 5]
    cfg = compose("+experiment=capacity_gap/gap_sdgkd_fashion_mnist", "gap.width=0.0625", "seed=3")
    specs = build_stages(cfg)
    assert specs[-1].stochastic["mode"] == "drop_k" and specs[-1].sources == ["teacher", "ta1", "ta2"]
    assert [s.seed for s in specs] == [0, 0, 0, 3]  # teacher and TAs pinned, the student has the run's seed


@pytest.mark.slow  # a long CLI run: in make test-slow (CI runs both)
def test_a_teacher_trained_with_crop_flip_teaches_from_the_cache(tmp_path):
    """The teacher trains on augmented batches (its own store key), the student on plain ones: the teacher's
    outputs are cached once and reused; a bad per-stage augmentation is one line, exit 2, before any training."""
    args = ["pipeline=direct", "distill=kd", "pipeline.chain=[plain4,plain2]", "trainer.max_epochs=1",
            "data.n_train=320", "data.n_test=100", "logger=csv"]
    r = run_kdlab([*args, "+pipeline.per_stage.teacher.augment=crop_flip"], tmp_path, tmp_path / "a")
    assert r.returncode == 0, r.stderr[-3000:]
    a = read_results(tmp_path / "a")
    r = run_kdlab(args, tmp_path, tmp_path / "b")
    assert r.returncode == 0, r.stderr[-3000:]
    b = read_results(tmp_path / "b")
    assert a["stages"][0]["store_key"] != b["stages"][0]["store_key"]  # another teacher
    assert not b["stages"][0]["cached"]
    store = tmp_path / "store"
    metas = [json.loads((store / x["stages"][0]["store_key"] / "meta.json").read_text()) for x in (a, b)]
    # the teacher's data fingerprint is that of the crop+flip batches; the student's, of the plain ones
    dm = build_datamodule({**SYNTH, "n_train": 320, "n_test": 100}, batch_size=64, seed=0)
    plain, flipped = dm.fingerprint(), dm.for_stage(augment="crop_flip").fingerprint()
    assert [m["description"]["data"] for m in metas] == [flipped, plain]
    student = json.loads((store / a["stages"][1]["store_key"] / "meta.json").read_text())
    assert student["description"]["data"] == plain
    # the augmented teacher's outputs on the student's plain batches: one cache in the teacher's store entry
    assert list((store / a["stages"][0]["store_key"] / "cache").glob("*.pt")), sorted(map(str, store.rglob("*")))
    r = run_kdlab([*args, "+pipeline.per_stage.teacher.augment=rotate"], tmp_path, tmp_path / "c")
    assert r.returncode == 2
    line = [x for x in r.stderr.strip().splitlines() if x.strip()][-1]
    assert "pipeline.per_stage.teacher.augment 'rotate'" in line and "crop_flip" in line, r.stderr[-2000:]
    assert "training" not in r.stderr + r.stdout


# -- gain vs gap --------------------------------------------------------------------------------------------
def row(exp: str, accs: dict[int, float], teacher: float | None = None) -> dict:
    mean = sum(accs.values()) / len(accs)
    return {"group": f"experiment={exp}", "fields": {"experiment": exp}, "n": len(accs),
            "accuracies": sorted(accs.items()),
            "student_test_acc_mean": mean, "student_test_acc_best_val_mean": mean,
            "stages": {"teacher": {"mean": teacher, "std": 0.0}} if teacher is not None else {}}


def test_gain_vs_gap_points_are_the_paired_gains_at_teacher_minus_alone(tmp_path):
    cfg = {"baseline": "alone", "teacher_stage": "teacher", "methods": ["kd", "dgkd"], "labels": {"kd": "KD"}}
    collected = {}
    for part, alone, gain in (("wide", [0.90, 0.91, 0.89], 0.01), ("thin", [0.80, 0.82, 0.81], 0.03)):
        rows = [row("alone", dict(enumerate(alone))),
                row("kd", {s: a + gain + 0.001 * s for s, a in enumerate(alone)}, teacher=0.93),
                row("dgkd", {s: a + 2 * gain for s, a in enumerate(alone)}, teacher=0.93)]
        collected[part] = (rows, paired_table(rows, ["experiment"], "experiment=alone", []))
    pts = gain_vs_gap.points(collected, cfg)
    assert [(p["part"], p["method"]) for p in pts] == [("wide", "kd"), ("wide", "dgkd"), ("thin", "kd"), ("thin", "dgkd")]
    wide_kd = pts[0]
    assert wide_kd["gap"] == pytest.approx(0.93 - 0.90) and wide_kd["student_alone"] == pytest.approx(0.90)
    # hand computation: diffs 0.010, 0.011, 0.012 -> mean 0.011, t interval 0.011 +- t(0.975, 2) * 0.001 / sqrt(3)
    assert wide_kd["gain"] == pytest.approx(0.011)
    half = 4.302652729911275 * 0.001 / 3 ** 0.5
    assert (wide_kd["ci_t_low"], wide_kd["ci_t_high"]) == pytest.approx((0.011 - half, 0.011 + half))
    assert wide_kd["verdict"] == "better" and wide_kd["wins"] == 3 and wide_kd["n"] == 3
    dgkd = pts[1]  # the same gain at every seed: no spread (an interval of width ~0, or none)
    assert dgkd["gain"] == pytest.approx(0.02)
    assert dgkd["ci_t_low"] is None or dgkd["ci_t_high"] - dgkd["ci_t_low"] < 1e-9
    md = gain_vs_gap.markdown(pts, cfg)
    assert md.splitlines()[0].startswith("| student (part) | student alone % | teacher % | gap (pp) | KD: gain")
    assert "| thin | 81.00 | 93.00 | 12.00 | +3.10 [" in md
    written = gain_vs_gap.write(pts, cfg, tmp_path)
    assert written[-1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader(written[0].open()))
    assert [r["method"] for r in rows] == ["kd", "dgkd", "kd", "dgkd"] and float(rows[2]["gap"]) == pytest.approx(0.12)
    assert gain_vs_gap.y_scale(pts) == "linear"  # gains of 1-6 pp: a linear axis
    # a method whose students diverged (-35 pp) turns the axis symmetric-logarithmic; the figure is still drawn
    pts[1] = {**pts[1], "gain": -0.35, "ci_t_low": -0.80, "ci_t_high": 0.10}
    assert gain_vs_gap.y_scale(pts) == "symlog"
    assert gain_vs_gap.plot(pts, cfg)[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_capacity_gap_study_config_loads_with_its_figure_and_own_readme_block():
    cfg = study_config.load_study("capacity_gap")
    assert cfg["seeds"] == [0, 1, 2, 3, 4] and cfg["readme_marker"] == "capacity-gap"
    assert study_config.docs_dir(cfg) == ROOT / "docs" / "results" / "capacity_gap"
    widths = [next(o for o in s["overrides"] if o.startswith("++gap.width=")) for s in cfg["sweeps"]]
    assert len(set(widths)) == 3
    parts = {e for s in cfg["sweeps"] for e in s["experiments"]}  # the study's own recipes, in its folder
    assert all(e.startswith("capacity_gap/") for e in parts), parts
    methods = {study_config.row_name([], e) for e in parts}  # named by their stems in the tables
    assert set(cfg["gain_vs_gap"]["methods"]) | {cfg["gain_vs_gap"]["baseline"]} == methods
    readme = (ROOT / "README.md").read_text()
    assert all(m in readme for m in study_tables.markers("capacity-gap"))


@pytest.mark.slow  # a long CLI run: in make test-slow (CI runs both)
def test_tiny_capacity_gap_study_end_to_end(tmp_path):
    """Two student widths on synthetic data, two seeds, the student alone and KD: the gain-vs-gap table, CSV and
    figure are written from the runs, at x = teacher minus student alone and y = the paired gain."""
    spec = tmp_path / "gap.yaml"
    spec.write_text(
        "seeds: [0, 1]\nby: experiment\nlast_k: 1\noverrides: [logger=csv]\n"
        "gain_vs_gap: {baseline: gap_alone_fashion_mnist, methods: [gap_kd_fashion_mnist], labels: {gap_kd_fashion_mnist: KD}}\n"
        "parts:\n  wide: {baseline: gap_alone_fashion_mnist, title: Wide}\n  thin: {baseline: gap_alone_fashion_mnist, title: Thin}\n"
        "sweeps:\n"
        "  - {part: wide, experiments: [capacity_gap/gap_alone_fashion_mnist, capacity_gap/gap_kd_fashion_mnist],"
        " overrides: [++gap.width=0.5]}\n"
        "  - {part: thin, experiments: [capacity_gap/gap_alone_fashion_mnist, capacity_gap/gap_kd_fashion_mnist],"
        " overrides: [++gap.width=0.125]}\n")
    out = tmp_path / "results"
    r = run_study(str(spec), "--root", str(tmp_path / "root"), "--out", str(out), "--",
                  "data=synthetic", "data.n_train=320", "data.n_test=100", "trainer.max_epochs=1",
                  f"paths.output_dir={tmp_path}")  # the teacher keeps its 12 epochs: 5 batches each here
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = list(csv.DictReader((out / "gain_vs_gap.csv").open()))
    assert sorted(r["part"] for r in rows) == ["thin", "wide"] and {r["method"] for r in rows} == {"gap_kd_fashion_mnist"}
    for part, sweep in (("wide", "01-wide"), ("thin", "02-thin")):
        res = [read_results(p.parent) for p in sorted((tmp_path / "root" / sweep).rglob("results.json"))]
        alone = {x["seed"]: x["final"]["test_acc"] for x in res if x["experiment"] == "gap_alone_fashion_mnist"}
        kd = {x["seed"]: x["final"]["test_acc"] for x in res if x["experiment"] == "gap_kd_fashion_mnist"}
        teacher = {x["stages"][0]["test_acc"] for x in res if x["experiment"] == "gap_kd_fashion_mnist"}
        assert len(teacher) == 1 and sorted(alone) == sorted(kd) == [0, 1]  # one teacher for both seeds
        got = next(r for r in rows if r["part"] == part)
        assert float(got["gap"]) == pytest.approx(teacher.pop() - sum(alone.values()) / 2, abs=1e-9)
        assert float(got["gain"]) == pytest.approx(sum(kd[s] - alone[s] for s in (0, 1)) / 2, abs=1e-9)
    assert (out / "gain_vs_gap.png").is_file()
    md = (out / "results.md").read_text()
    assert "gap (pp) | KD: gain (pp) [95% CI], wins" in md and "![gain vs gap](gain_vs_gap.png)" in md
