"""A study's ``published`` block (kdlab/study/published.py): a paper's table beside kdlab's runs, checked on runs
built by hand, and the ZSKD study's config (studies/zskd.yaml) with its rows' recipes."""
from __future__ import annotations

import statistics

import pytest
from scipy import stats as sstats

from kdlab.compare.paired import paired_table
from kdlab.compare.runs import aggregate
from kdlab.errors import ConfigError
from kdlab.pipeline import build_stages
from kdlab.study import config as study_config
from kdlab.study import published


def run(exp: str, seed: int, acc: float, teacher: float | None = None, data_free: bool = False) -> dict:
    student = {"name": "student", "role": "student", "test_acc": acc, "test_acc_last": acc, "data_free": data_free}
    stages = ([{"name": "teacher", "role": "teacher", "test_acc": teacher}] if teacher is not None else []) + [student]
    return {"status": "completed", "seed": seed, "experiment": exp, "stages": stages, "final": {"test_acc": acc}}


ALONE = [0.890, 0.894, 0.892]
KD = [0.893, 0.899, 0.897]
CFG = {"title": "T", "part": "p", "baseline": "alone", "source": "Paper, Table 2",
       "rows": [{"label": "teacher", "published": 90.84, "experiment": "kd", "stage": "teacher"},
                {"label": "alone", "published": 89.43, "experiment": "alone"},
                {"label": "kd", "published": 89.66, "experiment": "kd"},
                {"label": "few-shot", "published": 72.50, "kdlab": "not run (no such method)"}]}


def table() -> list[list[str]]:
    runs = [run("alone", s, a) for s, a in enumerate(ALONE)] + [run("kd", s, a, 0.905) for s, a in enumerate(KD)]
    rows = aggregate(runs, ["experiment"])
    paired = paired_table(rows, ["experiment"], "experiment=alone")
    md = published.markdown(CFG, {"p": (rows, paired)})
    return [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines()
            if line.startswith("| ") and not line.startswith("| row")]


def test_each_row_holds_the_papers_figure_beside_kdlabs_mean_interval_and_paired_difference():
    cells = {r[0]: r for r in table()}
    assert cells["teacher"][1:3] == ["90.84", "90.50 (one network)"]
    mean, sd = statistics.fmean(KD), statistics.stdev(KD)
    assert cells["kd"][2] == f"{100 * mean:.2f} ± {100 * sd:.2f} (n=3)"
    lo, hi = sstats.t.interval(0.95, 2, loc=mean, scale=sd / 3 ** 0.5)  # by hand: mean ± t(0.975, 2) s / sqrt(n)
    assert cells["kd"][3] == f"[{100 * lo:.2f}, {100 * hi:.2f}]"
    assert cells["kd"][4] == "+0.23"  # 89.66 - 89.43, the paper's own difference
    diffs = [k - a for k, a in zip(KD, ALONE)]
    assert cells["kd"][5].startswith(f"{100 * statistics.fmean(diffs):+.2f} [") and cells["kd"][5].endswith("3/0/0")
    assert cells["alone"][4] == "-" and cells["alone"][5] == "-"
    assert cells["few-shot"][2] == "not run (no such method)" and cells["few-shot"][4] == "-16.93"


def test_the_zskd_study_runs_every_row_it_names_with_the_papers_models():
    study = study_config.load_study("zskd")
    assert study["published"]["part"] == "zskd" and len(study["seeds"]) >= 5
    named = {r["experiment"] for r in study["published"]["rows"] if r.get("experiment")}
    assert named == {"zskd_alone_fashion_mnist", "zskd_kd_fashion_mnist", "zskd_kd_ce_fashion_mnist",
                     "zskd_dafl_fashion_mnist"}


@pytest.mark.parametrize(("recipe", "arches", "method"), [
    ("zskd_alone_fashion_mnist", ["lenet5_half_conv"], "ce"),
    ("zskd_kd_fashion_mnist", ["lenet5", "lenet5_half_conv"], "kd"),
    ("zskd_kd_ce_fashion_mnist", ["lenet5", "lenet5_half_conv"], "kd"),
    ("zskd_dafl_fashion_mnist", ["lenet5", "lenet5_half_conv"], "dafl")])
def test_the_zskd_recipes_train_the_papers_models_and_share_one_teacher(compose, recipe, arches, method):
    cfg = compose(f"+experiment=zskd/{recipe}", "seed=3")
    specs = build_stages(cfg)
    assert [s.model["arch"] for s in specs] == arches and specs[-1].distill["strategy"] == method
    assert specs[-1].seed == 3 and (len(specs) == 1 or specs[0].seed == 0)  # one teacher for every seed
    assert cfg["data"]["subset"] is None and cfg["optimizer"]["_target_"] == "torch.optim.Adam"
    if method == "kd":  # the paper's tau; soft targets only, or half the labels' CE (the sensitivity row)
        lam = 0.5 if "_ce_" in recipe else 1.0
        assert (specs[-1].distill["temperature"], specs[-1].distill["lam"]) == (20.0, lam)


def test_a_published_row_must_name_a_run_of_its_part_or_say_why_not(tmp_path):
    base = ("seeds: [0]\nparts: {p: {title: p}}\nsweeps: [{part: p, experiments: [zskd/zskd_alone_fashion_mnist]}]\n"
            "published: {part: p, rows: [ROW]}\n")
    for row, match in [("{label: a, published: 1.0, experiment: zskd_kd_fashion_mnist}", "does not run"),
                       ("{label: a, published: 1.0}", "names no 'experiment'"),
                       ("{label: a, published: x, experiment: zskd_alone_fashion_mnist}", "a number 'published'")]:
        path = tmp_path / "s.yaml"
        path.write_text(base.replace("ROW", row))
        with pytest.raises(ConfigError, match=match):
            study_config.load_study(str(path))
