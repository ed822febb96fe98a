"""The converged-students study (studies/converged.yaml): the study loads, each recipe builds the stages it promises
(arches, widths, pinned seeds, crop+flip, 120 epochs, the papers' optimizer and schedule), and the temperature
sweep's rows get their own names and temperatures."""
from __future__ import annotations

import pytest

from kdlab.pipeline import build_stages
from kdlab.study import config as study_config
from kdlab.study import tables as study_tables
from tests.helpers.cli import ROOT
from tests.helpers.config import stage_keys

METHODS = ["alone", "kd", "takd", "dgkd", "sdgkd", "dgkd_mean"]
TEMPERATURES = [1, 2, 8, 20]  # T = 4 is conv_kd_fashion_mnist itself (conf/distill/kd.yaml)
TA_CHAIN = [("teacher", "resnet8", {}), ("ta1", "plain6", {"width_mult": 0.5}), ("ta2", "plain4", {"width_mult": 0.5})]


def recipe(method: str) -> str:
    return f"converged/conv_{method}_fashion_mnist"


def sweep_overrides(sweep: dict) -> list[str]:
    """A sweep's overrides as a single run takes them (``++gap.width`` is a multirun's spelling)."""
    return [o.removeprefix("++") for o in sweep.get("overrides", [])]


def test_the_converged_study_loads_with_two_widths_every_method_and_its_own_readme_block():
    cfg = study_config.load_study("converged")
    assert cfg["seeds"] == [0, 1, 2, 3, 4] and cfg["readme_marker"] == "converged"
    assert study_config.docs_dir(cfg) == ROOT / "docs" / "results" / "converged"
    assert set(cfg["parts"]) == {"w1", "w1_2"}
    for part, width in (("w1", "1.0"), ("w1_2", "0.5")):
        sweeps = [s for s in cfg["sweeps"] if s["part"] == part]
        assert all(f"++gap.width={width}" in s["overrides"] for s in sweeps), sweeps
        rows = {study_config.row_name(s["overrides"], e) for s in sweeps for e in s["experiments"]}
        assert rows == {f"conv_{m}_fashion_mnist" for m in METHODS} | \
            {f"conv_kd_t{t}_fashion_mnist" for t in TEMPERATURES}
        meta = cfg["parts"][part]
        assert meta["baseline"] == "conv_alone_fashion_mnist"
        assert {b for _, b in meta["pairs"]} <= rows and {a for a, _ in meta["pairs"]} <= rows
    gvg = cfg["gain_vs_gap"]
    assert gvg["baseline"] == "conv_alone_fashion_mnist" and len(gvg["methods"]) == 5
    assert set(cfg["curves"]["experiments"]) <= rows and cfg["readme_parts"] == ["gain_vs_gap", "curves"]
    readme = (ROOT / "README.md").read_text()
    assert all(m in readme for m in study_tables.markers("converged"))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("width", [1.0, 0.5])
def test_each_recipe_builds_converged_stages_with_the_teacher_and_tas_pinned(compose, method, width):
    cfg = compose(f"+experiment={recipe(method)}", f"gap.width={width}", "seed=3")
    assert cfg["experiment_name"] == f"conv_{method}_fashion_mnist"
    data = cfg["data"]
    assert (data["name"], data["subset"], data["val_split"], data["augment"], data["test_subset"]) == \
        ("fashion_mnist", 3000, 0.1, "crop_flip", None)
    specs = build_stages(cfg)
    student = specs[-1]
    assert (student.name, student.arch, student.model["kwargs"], student.seed) == \
        ("student", "plain2", {"width_mult": width}, 3)
    expected_chain = {"alone": [], "kd": TA_CHAIN[:1]}.get(method, TA_CHAIN)
    assert [(s.name, s.arch, s.model.get("kwargs") or {}) for s in specs[:-1]] == expected_chain
    assert all(s.seed == 0 for s in specs[:-1])  # teacher and TAs: trained once, whatever the run's seed
    for s in specs:  # every stage, the teacher too: the papers' recipe shape, to convergence, with crop+flip
        assert s.max_epochs == 120 and s.augment in (None, "crop_flip")
        assert (s.optimizer["lr"], s.optimizer["momentum"], s.optimizer["weight_decay"]) == (0.05, 0.9, 5e-4)
    assert cfg["scheduler"]["_target_"] == "kdlab.modules.schedulers.multistep"
    assert (cfg["scheduler"]["milestones"], cfg["scheduler"]["gamma"]) == ([0.5, 0.75], 0.1)
    sources = {"alone": [], "kd": ["teacher"], "takd": ["ta2"]}.get(method, ["teacher", "ta1", "ta2"])
    assert student.sources == sources
    if method != "alone":
        assert cfg["distill"]["cache"] == "views"  # the sources' outputs on every crop: computed once
    assert (student.stochastic or {}).get("mode", "none") == ("drop_k" if method == "sdgkd" else "none")
    strategies = {"alone": ["ce"], "kd": ["kd"], "takd": ["kd"], "dgkd_mean": ["kd"]}.get(method, ["dgkd"])
    assert [student.strategy_cls.name] == strategies  # DGKD averaged: KD's multi-source loss for the student
    if method in ("dgkd", "sdgkd", "dgkd_mean"):  # their TAs are DGKD's: taught by the sum
        assert [s.strategy_cls.name for s in specs[1:-1]] == ["dgkd", "dgkd"]


def test_one_teacher_and_one_ta_chain_per_method_for_the_whole_study(compose):
    """The store keys of the teacher and the TAs do not depend on the student's width, the run's seed or KD's
    temperature (each is trained once for the whole study); stochastic DGKD's TAs are DGKD's, TAKD's its own."""
    def keys(method, *over):
        return stage_keys(compose(f"+experiment={recipe(method)}", *over, "trainer.precision=32-true"))

    dgkd = keys("dgkd", "gap.width=1.0", "seed=0")
    for other in (keys("dgkd", "gap.width=0.5", "seed=4"), keys("sdgkd", "gap.width=0.5", "seed=2"),
                  keys("dgkd_mean", "gap.width=1.0", "seed=0")):
        assert {k: other[k] for k in ("teacher", "ta1", "ta2")} == {k: dgkd[k] for k in ("teacher", "ta1", "ta2")}
        assert other["student"] != dgkd["student"]
    takd = keys("takd", "gap.width=0.5", "seed=1")
    assert takd["teacher"] == dgkd["teacher"] and takd["ta1"] != dgkd["ta1"] and takd["ta2"] != dgkd["ta2"]
    assert keys("takd", "gap.width=1.0", "seed=3")["ta2"] == takd["ta2"]
    kd = [keys("kd", f"gap.width={w}", f"seed={s}", f"distill.temperature={t}") for w, s, t in
          ((1.0, 0, 4), (0.5, 3, 20), (1.0, 4, 1))]
    assert {k["teacher"] for k in kd} == {dgkd["teacher"]} and len({k["student"] for k in kd}) == 3


def test_the_temperature_sweep_rows_have_their_own_names_and_temperatures(compose):
    cfg = study_config.load_study("converged")
    kd = [s for s in cfg["sweeps"] if s["experiments"] == [recipe("kd")]]
    assert len(kd) == 2 * len(TEMPERATURES)
    seen = set()
    for sweep in kd:
        over = sweep_overrides(sweep)
        name = study_config.row_name(over, recipe("kd"))
        c = compose(f"+experiment={recipe('kd')}", *over, "seed=0")
        t = c["distill"]["temperature"]
        assert name == f"conv_kd_t{t:g}_fashion_mnist" == c["experiment_name"]
        assert build_stages(c)[-1].sources == ["teacher"]
        seen.add((sweep["part"], name, t))
    assert sorted(t for _, _, t in seen) == sorted(2 * TEMPERATURES)
    assert len({(p, n) for p, n, _ in seen}) == len(seen)  # distinct rows within each part
    assert compose(f"+experiment={recipe('kd')}")["distill"]["temperature"] == 4.0  # the plain KD row: T = 4


def test_the_dry_run_prints_every_sweep(capsys):
    from kdlab.study.cli import main

    assert main(["converged", "--dry-run"]) == 0
    out = capsys.readouterr().out
    lines = [x for x in out.splitlines() if x.startswith("python -m kdlab -m ")]
    assert len(lines) == 10 and "100 pipeline runs" in out
    assert sum("distill.temperature=20 experiment_name=conv_kd_t20_fashion_mnist" in x for x in lines) == 2


def test_the_curves_figure_averages_each_rows_curves_over_seeds_and_draws_them():
    from kdlab.study import curves

    def row(exp, train, val, test):
        return {"fields": {"experiment": exp}, "n": len(train), "student_test_acc_best_val_mean": test,
                "train_curves": {"student": train}, "val_curves": {"student": val}}

    rows = [row("alone", [[0.5, 0.7, 0.9], [0.7, 0.9, 0.95, 0.96]], [[0.6, 0.8, 0.8], [0.6, 0.7, 0.9]], 0.85),
            row("kd", [[0.4, 0.8, 0.9]], [[0.5, 0.8, 0.85]], 0.86), row("other", [[0.1]], [[0.1]], 0.1)]
    cfg = {"experiments": ["kd", "alone"], "labels": {"kd": "KD"}}
    data = curves.series({"w1": (rows, [])}, cfg)
    assert list(data["w1"]) == ["kd", "alone"]  # the block's order; rows it does not name are left out
    # hand computation: the epoch-wise mean over the epochs both seeds have (3)
    assert data["w1"]["alone"]["train"] == pytest.approx([0.6, 0.8, 0.925])
    assert data["w1"]["alone"]["val"] == pytest.approx([0.6, 0.75, 0.85])
    assert (data["w1"]["alone"]["test"], data["w1"]["alone"]["n"]) == (0.85, 2)
    assert curves.plot(data, cfg)[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_curves_block_naming_an_experiment_the_study_does_not_run_is_one_clear_error(tmp_path):
    from kdlab.errors import ConfigError

    text = (ROOT / "studies" / "converged.yaml").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("experiments: [conv_alone_fashion_mnist, conv_kd_fashion_mnist, conv_takd",
                                "experiments: [conv_nope_fashion_mnist, conv_kd_fashion_mnist, conv_takd"))
    with pytest.raises(ConfigError, match="curves experiment 'conv_nope_fashion_mnist' is not run by the study"):
        study_config.load_study(str(bad))
