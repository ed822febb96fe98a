"""Pacemaker KD and on-the-fly (1 x N) students: the pipeline's wiring from the real YAML (which sources the
student gets in each mode, what each pacemaker kind is, a strategy per edge), the recipes' shared stages,
and the CLI end to end on synthetic data, with the stability report of kdlab.compare over real runs.

The transform itself (kernel shapes, parameter counts, one-row receptive field, every zoo model at 28x28
and 32x32, mixed mode, errors) is tested in tests/models/test_onthefly.py; `kdlab.zoo --on-the-fly` in
tests/models/test_zoo.py.
"""
from __future__ import annotations

import csv
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from kdlab.distill import STRATEGIES, SourceOutput, StudentOutput, build_strategy
from kdlab.distill.base import StrategyContext
from kdlab.errors import ConfigError
from kdlab.models import build_model, count_params, feature_shapes
from kdlab.pipeline import build_stages
from kdlab.pipeline.checks import validate_config
from kdlab.store.fileio import load_weights
from tests.helpers.cli import ROOT, kdlab_env, read_results, run_kdlab, trained
from tests.helpers.config import compose_config as composed
from tests.helpers.config import stage_keys, wiring


def _convs(model: nn.Module) -> list[nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def _model(spec_model: dict) -> nn.Module:
    return build_model(spec_model["arch"], 10, in_channels=1, input_size=28, on_the_fly=spec_model["on_the_fly"],
                       on_the_fly_n=spec_model["on_the_fly_n"], on_the_fly_mode=spec_model["on_the_fly_mode"],
                       **spec_model["kwargs"])


PM = "+experiment=pacemaker_fashion_mnist"


# -- wiring -----------------------------------------------------------------------------------------------------
def test_dense_default_student_learns_from_pacemaker_and_teacher():
    cfg = composed(PM)
    specs = build_stages(cfg)
    assert [(s.name, s.role) for s in specs] == [("teacher", "teacher"), ("pacemaker", "pacemaker"),
                                                 ("student", "student")]
    assert wiring(cfg) == {"teacher": [], "pacemaker": ["teacher"], "student": ["teacher", "pacemaker"]}
    teacher, pacemaker, student = specs
    assert teacher.model["arch"] == student.model["arch"] == "resnet8"
    assert not teacher.model["on_the_fly"] and student.model["on_the_fly"]
    assert student.model["on_the_fly_mode"] == "row"
    assert teacher.distill["strategy"] == "ce" and pacemaker.distill["strategy"] == student.distill["strategy"] == "kd"
    validate_config(cfg)


def test_sequential_student_learns_from_the_pacemaker_alone():
    cfg = composed(PM, "pipeline.topology=sequential")
    assert wiring(cfg) == {"teacher": [], "pacemaker": ["teacher"], "student": ["pacemaker"]}
    # the teacher and the pacemaker are the same stages as in dense mode (reused from the store); only the
    # student differs
    dense, seq = stage_keys(composed(PM)), stage_keys(cfg)
    assert dense["teacher"] == seq["teacher"] and dense["pacemaker"] == seq["pacemaker"]
    assert dense["student"] != seq["student"]


@pytest.mark.parametrize("kind", ["wide", "mixed", "nxn"])
def test_pacemaker_kinds(kind):
    cfg = composed(PM, f"pipeline.pacemaker={kind}")
    teacher, pacemaker, student = build_stages(cfg)
    assert pacemaker.role == "pacemaker" and pacemaker.sources == ["teacher"]
    t, p, s = _model(teacher.model), _model(pacemaker.model), _model(student.model)
    kernels = {c.kernel_size for c in _convs(p)} - {(1, 1)}
    assert {c.kernel_size for c in _convs(s)} - {(1, 1)} == {(1, 3)}  # the student: 1 x N everywhere
    assert {c.kernel_size for c in _convs(t)} - {(1, 1)} == {(3, 3)}  # the teacher: N x N
    if kind == "wide":  # the 1xN student's architecture made wider
        assert kernels == {(1, 3)} and count_params(s) < count_params(p) < count_params(t)
        assert [c.out_channels for c in _convs(p)][:1] == [24]  # 1.5 x 16
    elif kind == "mixed":  # same architecture, alternating 1xN / Nx1
        assert kernels == {(1, 3), (3, 1)} and count_params(p) == count_params(s)
    else:  # an N x N net between teacher and student in size
        assert kernels == {(3, 3)} and count_params(s) < count_params(p) < count_params(t)
    with torch.no_grad():
        assert p.eval()(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def _prepool(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    from kdlab.models import FeatureTaps

    with torch.no_grad(), FeatureTaps(model.eval(), "prepool") as taps:
        model(x)
    return taps.features["prepool"]


def test_fashion_student_sees_one_row_and_the_mixed_pacemaker_does_not():
    """The recipe's own models at 28x28 (test_onthefly.py proves the property on other models at 32x32):
    prepool row r of the 1xN resnet8 depends on input row 4r only; the mixed 1xN/Nx1 pacemaker's does not."""
    torch.manual_seed(0)
    _, pacemaker, student = (_model(s.model) for s in build_stages(composed(PM)))
    x = torch.randn(1, 1, 28, 28)
    base_s, base_p = _prepool(student, x), _prepool(pacemaker, x)
    assert base_s.shape[2] == 7
    for r in range(7):
        other = x.clone()
        rows = [i for i in range(28) if i != 4 * r]
        other[:, :, rows] += torch.randn(1, 1, 27, 28)
        assert torch.equal(_prepool(student, other)[:, :, r], base_s[:, :, r])
        assert (_prepool(pacemaker, other)[:, :, r] - base_p[:, :, r]).abs().max() > 1e-3


def test_on_the_fly_options_from_the_command_line():
    cfg = composed("pipeline=single", "distill=none", "model=resnet8", "model.on_the_fly=true",
                   "model.on_the_fly_n=5")
    (spec,) = build_stages(cfg)
    assert (spec.model["on_the_fly"], spec.model["on_the_fly_n"]) == (True, 5)
    assert {c.kernel_size for c in _convs(_model(spec.model))} == {(1, 5), (1, 1)}
    validate_config(cfg)
    cfg = composed(PM, "pipeline.student_model.on_the_fly_n=5")
    assert {c.kernel_size for c in _convs(_model(build_stages(cfg)[-1].model))} == {(1, 5), (1, 1)}


@pytest.mark.slow  # a long CLI run: in make test-slow (CI runs both)
def test_unknown_pacemaker_kind_lists_known_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown pipeline.pacemaker 'huge'; known: mixed, nxn, wide"):
        build_stages(composed(PM, "pipeline.pacemaker=huge"))
    r = run_kdlab([PM, "pipeline.pacemaker=huge"], tmp_path, synth=False)
    assert r.returncode == 2 and "unknown pipeline.pacemaker 'huge'; known: mixed, nxn, wide" in r.stderr
    assert "Traceback" not in r.stderr


def test_any_strategy_per_edge():
    cfg = composed(PM, "+pipeline.per_stage.student.distill.strategy=dgkd",
                   "+pipeline.per_stage.pacemaker.distill.temperature=2.0",
                   "+pipeline.per_stage.pacemaker.distill.lam=0.9")
    teacher, pacemaker, student = build_stages(cfg)
    assert student.distill["strategy"] == "dgkd" and student.distill["temperature"] == 4.0
    assert pacemaker.distill["strategy"] == "kd" and pacemaker.distill["temperature"] == 2.0
    assert pacemaker.distill["lam"] == 0.9 and student.distill["lam"] == 0.5
    validate_config(cfg)
    # every registered strategy can teach the student from its two sources (pacemaker + teacher)
    models = {s.name: _model(s.model) for s in (teacher, pacemaker, student)}
    for name in STRATEGIES.names():
        if STRATEGIES.get(name).data_free:  # DAFL learns from generated images, one teacher (tests/distill/test_dafl.py)
            continue
        if getattr(STRATEGIES.get(name), "self_distill", False):  # SPEQ: a stage without sources (test_quant.py)
            continue
        cfg = composed(PM, f"+pipeline.per_stage.student.distill.strategy={name}")
        spec = build_stages(cfg)[-1]
        validate_config(cfg)
        s_taps, t_taps = STRATEGIES.get(name).taps(spec.distill)
        shape = (1, 28, 28)
        ctx = StrategyContext("student", spec.sources, 10,
                              feature_shapes(models["student"], s_taps, shape) if s_taps else {},
                              {n: feature_shapes(models[n], t_taps, shape) for n in spec.sources} if t_taps else {},
                              num_train=64)  # CRD's memory is indexed by sample
        strategy = build_strategy(spec.distill, ctx)
        x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
        from kdlab.models import FeatureTaps

        outs = {}
        for n in spec.sources:
            with torch.no_grad(), FeatureTaps(models[n].eval(), t_taps) as taps:
                outs[n] = SourceOutput(models[n](x), dict(taps.features))
        with FeatureTaps(models["student"], s_taps) as taps:
            logits = models["student"](x)
            terms, weights = strategy.loss_terms(StudentOutput(logits, dict(taps.features), torch.arange(4)), outs,
                                                 y, 0.0)
        total = sum(weights[k] * v for k, v in terms.items())
        assert torch.isfinite(total) and total.requires_grad, name


def test_strategy_per_edge_from_a_custom_yaml_graph():
    # the same graph spelled out as topology=custom, with a different strategy on each edge
    stages = ("[{name:teacher,model:resnet8,sources:[]},"
              "{name:pacemaker,role:pacemaker,model:{arch:resnet8,on_the_fly:true,on_the_fly_mode:mixed},"
              "sources:[teacher],distill:{strategy:kd,temperature:2.0}},"
              "{name:student,model:{arch:resnet8,on_the_fly:true},sources:[pacemaker,teacher],"
              "distill:{strategy:dgkd}}]")
    cfg = composed(PM, "pipeline.topology=custom", f"pipeline.stages={stages}")
    specs = build_stages(cfg)
    assert wiring(cfg) == {"teacher": [], "pacemaker": ["teacher"], "student": ["pacemaker", "teacher"]}
    assert [s.role for s in specs] == ["teacher", "pacemaker", "student"]
    assert specs[1].distill["strategy"] == "kd" and specs[1].distill["temperature"] == 2.0
    assert specs[2].distill["strategy"] == "dgkd"


def test_baselines_share_the_teacher_and_the_student():
    pm, kd, alone = (composed(f"+experiment={e}") for e in
                     ("pacemaker_fashion_mnist", "otf_kd_fashion_mnist", "otf_alone_fashion_mnist"))
    assert (pm["method"], kd["method"], alone["method"]) == ("pacemaker", "otf_kd", "otf_alone")
    assert wiring(kd) == {"teacher": [], "student": ["teacher"]}
    assert wiring(alone) == {"student": []}
    # direct KD reuses the pacemaker pipeline's teacher (same store key)
    assert stage_keys(kd)["teacher"] == stage_keys(pm)["teacher"]
    students = [build_stages(c)[-1] for c in (pm, kd, alone)]
    assert all(s.model == students[0].model for s in students) and students[0].model["on_the_fly"]
    assert all(s.max_epochs == students[0].max_epochs and s.optimizer == students[0].optimizer for s in students)
    # `pipeline=single model=resnet8 model.on_the_fly=true` is the same student, trained alone
    single = composed("pipeline=single", "distill=none", "model=resnet8", "model.on_the_fly=true")
    (spec,) = build_stages(single)
    assert spec.sources == [] and spec.model == students[2].model
    # the CPU recipe's sizing (stated in the README, "CPU recipes and measured results")
    assert pm["data"]["subset"] == 6000 and pm["trainer"]["max_epochs"] == 4 and pm["data"]["augment"] == "none"


def test_cifar100_recipes():
    pm, kd = composed("+experiment=pacemaker_cifar100"), composed("+experiment=otf_kd_cifar100")
    t, _, s = build_stages(pm)
    assert (t.model["arch"], t.model["on_the_fly"]) == ("wrn_40_4", False)
    assert (s.model["arch"], s.model["on_the_fly"]) == ("wrn_40_4", True)
    assert s.sources == ["teacher", "pacemaker"] and s.max_epochs == 200
    assert pm["data"]["name"] == "cifar100" and pm["data"]["subset"] is None
    assert wiring(kd) == {"teacher": [], "student": ["teacher"]}
    assert build_stages(kd)[-1].model == s.model
    assert stage_keys(kd)["teacher"] == stage_keys(pm)["teacher"]


# -- end to end ---------------------------------------------------------------------------------------------
# the real recipes on tiny synthetic data (SYNTH in conftest; fewer images, one epoch: this checks the plumbing)
TINY = ["data.subset=null", "data.test_subset=null", "data.n_train=192", "data.n_test=64"]


@pytest.mark.slow  # a long CLI run: in make test-slow (CI runs both)
def test_cli_pacemaker_pipeline(tmp_path):
    out = tmp_path / "out"
    r = run_kdlab([PM, *TINY, "trainer.max_epochs=1"], out, tmp_path / "dense")
    assert r.returncode == 0, r.stderr[-3000:]
    res = read_results(tmp_path / "dense")
    assert res["status"] == "completed" and res["method"] == "pacemaker"
    assert [(s["name"], s["role"], s["sources"]) for s in res["stages"]] == [
        ("teacher", "teacher", []), ("pacemaker", "pacemaker", ["teacher"]),
        ("student", "student", ["teacher", "pacemaker"])]
    assert [s["on_the_fly"] for s in res["stages"]] == [False, True, True]
    assert trained(res) == ["teacher", "pacemaker", "student"]
    st = res["stages"][-1]
    assert st["params"] == count_params(build_model("resnet8", 10, 1, input_size=28, on_the_fly=True))
    assert res["final"]["stage"] == "student" and 0.0 <= st["test_acc"] <= 1.0 and st["extra_params"] == 0
    # the exported student is the 1xN net: every 3x3 kernel is stored as 1x3, and it loads strictly
    state = load_weights(st["checkpoint"], "student")
    assert {tuple(v.shape[2:]) for k, v in state.items() if v.ndim == 4} == {(1, 3), (1, 1)}
    bare = build_model("resnet8", 10, 1, input_size=28, on_the_fly=True)
    bare.load_state_dict(state, strict=True)
    # the pacemaker (mixed) is stored with its 1x3 and 3x1 kernels
    pm_state = load_weights(res["stages"][1]["checkpoint"], "pacemaker")
    assert {tuple(v.shape[2:]) for v in pm_state.values() if v.ndim == 4} == {(1, 3), (3, 1), (1, 1)}
    header = (tmp_path / "dense" / "csv" / "student" / "metrics.csv").read_text().splitlines()[0]
    assert "train/loss_kd" in header and "train/sources_kept" in header


def _csv_rows(path: Path) -> dict[str, dict]:
    with open(path, newline="") as fh:
        return {row["group"]: row for row in csv.DictReader(fh)}


def _sweep_results(sweep: Path) -> list[dict]:
    return [read_results(d) for d in sorted(p for p in sweep.iterdir() if (p / "results.json").exists())]


@pytest.mark.slow
def test_cli_stability_report_pacemaker_vs_direct_kd_over_seeds(tmp_path):
    """Pacemaker KD, direct KD and the 1xN student alone over two seeds (multiruns) on synthetic data, then
    kdlab.compare over the sweeps: mean, std, range and val fluctuation of the student, by method."""
    out = tmp_path / "out"
    tiny = [*TINY, "trainer.max_epochs=3", "seed=0,1"]
    sweeps = {}
    for exp in ("pacemaker_fashion_mnist", "otf_kd_fashion_mnist", "otf_alone_fashion_mnist"):
        sweeps[exp] = tmp_path / exp
        r = run_kdlab([f"+experiment={exp}", *tiny], out, sweeps[exp], multirun=True)
        assert r.returncode == 0, r.stderr[-3000:]
    runs = {exp: _sweep_results(d) for exp, d in sweeps.items()}
    assert all(len(v) == 2 for v in runs.values())
    # direct KD's teacher of seed s is the pacemaker pipeline's teacher of seed s (from the store)
    for pm_run, kd_run in zip(runs["pacemaker_fashion_mnist"], runs["otf_kd_fashion_mnist"]):
        assert trained(kd_run) == ["student"] and kd_run["stages"][0]["store_key"] == pm_run["stages"][0]["store_key"]
    assert runs["pacemaker_fashion_mnist"][0]["stages"][0]["store_key"] != \
        runs["pacemaker_fashion_mnist"][1]["stages"][0]["store_key"]  # seeds differ

    # sequential mode: the student learns from the pacemaker alone; teacher and pacemaker come from the store
    r = run_kdlab([PM, *TINY, "trainer.max_epochs=3", "seed=0", "pipeline.topology=sequential"], out,
                  tmp_path / "seq")
    assert r.returncode == 0, r.stderr[-3000:]
    seq = read_results(tmp_path / "seq")
    assert trained(seq) == ["student"] and seq["stages"][-1]["sources"] == ["pacemaker"]

    r = subprocess.run([sys.executable, "-m", "kdlab.compare", *map(str, sweeps.values()), "--out",
                        str(tmp_path / "cmp"), "--last-k", "3", "--no-plots"], check=False, cwd=ROOT,
                       env=kdlab_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for text in ("Stability", "pacemaker", "otf_kd", "otf_alone", "range max-min", "val fluct. last 3"):
        assert text in r.stdout, text
    rows = _csv_rows(tmp_path / "cmp" / "comparison.csv")
    assert set(rows) == {"pacemaker", "otf_kd", "otf_alone"}
    for exp, method in (("pacemaker_fashion_mnist", "pacemaker"), ("otf_kd_fashion_mnist", "otf_kd"),
                        ("otf_alone_fashion_mnist", "otf_alone")):
        students = [res["stages"][-1] for res in runs[exp]]
        acc = [s["test_acc"] for s in students]
        row = rows[method]
        assert int(row["n"]) == 2
        assert float(row["student_test_acc_mean"]) == pytest.approx(statistics.fmean(acc))
        assert float(row["student_test_acc_std"]) == pytest.approx(statistics.stdev(acc))
        assert float(row["student_test_acc_range"]) == pytest.approx(max(acc) - min(acc))
        fluct = [statistics.fmean(abs(b - a) for a, b in zip(c[-3:], c[-3:][1:]))
                 for c in (s["val_curve"] for s in students)]
        assert all(len(s["val_curve"]) == 3 for s in students)
        assert float(row["val_fluct_mean"]) == pytest.approx(statistics.fmean(fluct))
