"""Pipelines: topology wiring, stage specs, the store, and the CLI end to end on synthetic data."""
from __future__ import annotations

import copy
import csv
import json

import pytest
import torch
from pytorch_lightning.callbacks import Callback

from kdlab.errors import ConfigError, StoreError
from kdlab.models import build_model, count_params
from kdlab.pipeline import TOPOLOGIES, build_stages
from kdlab.pipeline.runner import run_pipeline
from kdlab.store import StageStore, stage_key
from tests.helpers.cli import read_results, run_kdlab, trained
from tests.helpers.config import compose_dictconfig

CHAIN = ["plain10", "plain8", "plain6", "plain4", "plain2"]
BASE = {
    "seed": 0, "data": {"batch_size": 8}, "trainer": {"max_epochs": 3},
    "optimizer": {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1},
    "scheduler": {"_target_": "kdlab.modules.schedulers.constant", "_partial_": True},
    "distill": {"strategy": "dgkd", "temperature": 4.0, "lam": 0.5,
                "stochastic": {"mode": "drop_k", "k": 1, "stages": ["student"]}},
}


def cfg(**pipeline):
    c = copy.deepcopy(BASE)
    c["pipeline"] = {"topology": "dense", "chain": CHAIN, **pipeline}
    return c


def wiring(specs):
    return {s.name: s.sources for s in specs}


def test_dense_topology_every_earlier_stage_teaches():
    specs = build_stages(cfg(topology="dense"))
    assert [s.name for s in specs] == ["teacher", "ta1", "ta2", "ta3", "student"]
    assert [s.role for s in specs] == ["teacher", "ta", "ta", "ta", "student"]
    assert wiring(specs) == {"teacher": [], "ta1": ["teacher"], "ta2": ["teacher", "ta1"],
                             "ta3": ["teacher", "ta1", "ta2"], "student": ["teacher", "ta1", "ta2", "ta3"]}


def test_sequential_topology_predecessor_teaches():
    specs = build_stages(cfg(topology="sequential"))
    assert wiring(specs) == {"teacher": [], "ta1": ["teacher"], "ta2": ["ta1"], "ta3": ["ta2"],
                             "student": ["ta3"]}


def test_direct_topology_teacher_teaches():
    specs = build_stages(cfg(topology="direct", chain=["plain10", "plain2"]))
    assert wiring(specs) == {"teacher": [], "student": ["teacher"]}
    assert TOPOLOGIES.get("direct")(4) == [[], [0], [0], [0]]


def test_custom_topology_and_names():
    stages = [{"name": "big", "model": "plain10", "sources": []},
              {"name": "mid", "model": {"arch": "plain6"}, "sources": ["big"]},
              {"name": "small", "model": "plain2", "sources": ["mid", "big"]}]
    specs = build_stages(cfg(topology="custom", stages=stages))
    assert wiring(specs) == {"big": [], "mid": ["big"], "small": ["mid", "big"]}
    assert [s.role for s in specs] == ["teacher", "ta", "student"]
    bad = stages[:2] + [{"name": "small", "model": "plain2", "sources": ["later"]}]
    with pytest.raises(ConfigError, match="not an earlier stage"):
        build_stages(cfg(topology="custom", stages=bad))


def test_stochastic_applies_to_the_student_only_by_default():
    specs = build_stages(cfg())
    assert [s.name for s in specs if s.stochastic] == ["student"]
    assert specs[-1].stochastic["mode"] == "drop_k"
    assert specs[0].distill == {"strategy": "ce", "label_smoothing": 0.0}  # the teacher learns from labels


def test_per_stage_overrides_touch_one_stage():
    specs = build_stages(cfg(per_stage={"student": {"distill": {"temperature": 2.0}, "max_epochs": 7}}))
    assert specs[-1].distill["temperature"] == 2.0 and specs[-1].max_epochs == 7
    assert all(s.distill.get("temperature") in (None, 4.0) for s in specs[:-1])
    with pytest.raises(ConfigError, match="unknown stage 'studnet'"):
        build_stages(cfg(per_stage={"studnet": {}}))


def test_bad_pipelines_are_config_errors():
    with pytest.raises(ConfigError, match="at least 2 models"):
        build_stages(cfg(chain=["plain10"]))
    with pytest.raises(ConfigError, match="known: custom, dense, direct, ensemble, sequential, single"):
        build_stages(cfg(topology="star"))


def test_store_commit_lookup_and_corruption(tmp_path):
    store = StageStore(tmp_path)
    key = stage_key({"a": 1})
    assert key == stage_key({"a": 1}) and key != stage_key({"a": 2})
    assert store.lookup(key) is None
    sd = {"w": torch.arange(6.0).reshape(2, 3)}
    store.commit(key, sd, {"name": "teacher", "test_acc": 0.5})
    rec = store.lookup(key)
    assert rec is not None and rec.meta["test_acc"] == 0.5 and torch.equal(rec.state_dict()["w"], sd["w"])
    # flip bytes of the weights: detected, quarantined, and reported as missing (so it retrains)
    path = tmp_path / key / "model.pt"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    assert store.lookup(key) is None
    assert not (tmp_path / key).exists() and list(tmp_path.glob(f"{key}.corrupt-*"))
    # with on_corrupt=fail it is an error instead
    store.commit(key, sd, {"name": "teacher"})
    (tmp_path / key / "meta.json").write_text("{}")
    with pytest.raises(StoreError, match="corrupted: meta.json fails its checksum"):
        StageStore(tmp_path, on_corrupt="fail").lookup(key)


def test_incomplete_stage_is_not_done(tmp_path):
    store = StageStore(tmp_path)
    key = stage_key({"b": 1})
    store.commit(key, {"w": torch.ones(2)}, {"name": "x"})
    (tmp_path / key / "DONE").unlink()  # as if the process died before the marker
    assert store.lookup(key) is None


# -- end to end through the CLI ----------------------------------------------------------------------
@pytest.mark.slow  # a long CLI run: in make test-slow (CI runs both)
def test_cli_three_stage_pipeline_then_cache_then_student_only(tmp_path):
    out = tmp_path / "out"
    args = ["pipeline.chain=[plain6,plain4,plain2]", "+experiment=dgkd_synthetic_test"]
    r = run_kdlab(args, out, tmp_path / "run1")
    assert r.returncode == 0, r.stderr[-3000:]
    res = read_results(tmp_path / "run1")
    assert res["status"] == "completed" and res["method"] == "dgkd" and res["dataset"] == "synthetic"
    assert [s["name"] for s in res["stages"]] == ["teacher", "ta1", "student"]
    assert [s["sources"] for s in res["stages"]] == [[], ["teacher"], ["teacher", "ta1"]]
    assert [s["arch"] for s in res["stages"]] == ["plain6", "plain4", "plain2"]
    for s in res["stages"]:
        assert not s["cached"]
        assert 0.0 <= s["test_acc"] <= 1.0 and 0.0 <= s["test_acc_last"] <= 1.0 and 0.0 <= s["val_acc"] <= 1.0
        assert s["epochs"] == 2 and s["best_epoch"] in (0, 1)
        # the trained model's size: the zoo model for synthetic's 10 classes, 1 channel, 28 x 28
        assert s["params"] == count_params(build_model(s["arch"], 10, in_channels=1, input_size=28)), s
        assert len(s["val_curve"]) == 2 and s["val_acc"] == pytest.approx(max(s["val_curve"]))
        assert (tmp_path / "run1" / "csv" / s["name"] / "metrics.csv").exists()
        # the training curves: one epoch mean per epoch, the values Lightning's CSV logger wrote for the epoch
        assert len(s["train_curve"]) == s["epochs"] and all(0.0 <= v <= 1.0 for v in s["train_curve"])
        assert len(s["train_loss_curve"]) == s["epochs"] and all(v > 0.0 for v in s["train_loss_curve"])
        with open(tmp_path / "run1" / "csv" / s["name"] / "metrics.csv", newline="") as fh:
            logged = [row for row in csv.DictReader(fh) if row.get("train/acc")]
        assert [float(row["train/acc"]) for row in logged] == pytest.approx(s["train_curve"], abs=1e-6)
        assert [float(row["train/loss"]) for row in logged] == pytest.approx(s["train_loss_curve"], rel=1e-5)
    assert res["stages"][0]["params"] > res["stages"][2]["params"]
    assert res["final"]["stage"] == "student"
    assert res["final"]["test_acc"] == res["stages"][-1]["test_acc"]
    header = (tmp_path / "run1" / "csv" / "student" / "metrics.csv").read_text().splitlines()[0]
    for metric in ("train/loss", "train/loss_ce", "train/loss_kd", "train/acc", "val/loss", "val/acc",
                   "val/acc_best", "test/acc", "train/sources_kept"):
        assert metric in header, metric
    assert (tmp_path / "run1" / ".hydra" / "config.yaml").exists()

    # the same command again trains nothing
    r = run_kdlab(args, out, tmp_path / "run2")
    assert r.returncode == 0, r.stderr[-3000:]
    res2 = read_results(tmp_path / "run2")
    assert trained(res2) == [] and all(s["cached"] for s in res2["stages"])
    assert [s["test_acc"] for s in res2["stages"]] == [s["test_acc"] for s in res["stages"]]

    # a different student temperature retrains only the student
    r = run_kdlab(args + ["+pipeline.per_stage.student.distill.temperature=2.0"], out, tmp_path / "run3")
    assert r.returncode == 0, r.stderr[-3000:]
    assert trained(read_results(tmp_path / "run3")) == ["student"]

    # a changed TA retrains the TA and everything downstream, nothing upstream
    r = run_kdlab(args + ["+pipeline.per_stage.ta1.max_epochs=1"], out, tmp_path / "run4")
    assert r.returncode == 0, r.stderr[-3000:]
    assert trained(read_results(tmp_path / "run4")) == ["ta1", "student"]


@pytest.mark.slow  # a long CLI run: in make test-slow (CI runs both)
def test_cli_teacher_checkpoint_is_loaded_and_checked(tmp_path):
    out = tmp_path / "out"
    from kdlab.models import build_model

    good = tmp_path / "teacher.pt"
    torch.save(build_model("plain4", num_classes=10, in_channels=1, input_size=28).state_dict(), good)
    args = ["pipeline=direct", "pipeline.chain=[plain4,plain2]", "trainer.max_epochs=1"]
    r = run_kdlab(args + [f"pipeline.teacher_checkpoint={good}"], out, tmp_path / "ok")
    assert r.returncode == 0, r.stderr[-3000:]
    res = read_results(tmp_path / "ok")
    assert res["stages"][0]["epochs"] == 0 and trained(res) == ["teacher", "student"]

    wrong_classes = tmp_path / "t100.pt"
    torch.save(build_model("plain4", num_classes=100, in_channels=1, input_size=28, variant="cifar10").state_dict(),
               wrong_classes)
    r = run_kdlab(args + [f"pipeline.teacher_checkpoint={wrong_classes}"], out, tmp_path / "bad1")
    assert r.returncode == 2
    assert "has 100 classes; the data set has 10" in r.stderr and "Traceback" not in r.stderr

    wrong_arch = tmp_path / "t6.pt"
    torch.save(build_model("plain6", num_classes=10, in_channels=1, input_size=28).state_dict(), wrong_arch)
    r = run_kdlab(args + [f"pipeline.teacher_checkpoint={wrong_arch}"], out, tmp_path / "bad2")
    assert r.returncode == 2 and "does not match architecture 'plain4'" in r.stderr
    assert json.loads((tmp_path / "bad2" / "results.json").read_text())["status"] == "failed"


def test_per_stage_seed_fixes_one_stage():
    c = cfg(per_stage={"teacher": {"seed": 0}})
    c["seed"] = 5
    specs = build_stages(c)
    assert specs[0].seed == 0 and all(s.seed == 5 for s in specs[1:])


@pytest.mark.slow  # 15-30 s of CLI runs: in make test-slow (CI runs both)
def test_store_key_holds_the_resolved_precision(tmp_path):
    """trainer.precision=auto is keyed by what it resolves to here (fp32 on a CPU): auto reuses the stage of the
    explicit precision it stands for, and fp32 weights are never reused for a bf16 run."""
    args = ["pipeline=single", "distill=none", "model=plain2", "data.n_train=320", "data.n_test=100",
            "trainer.max_epochs=1"]
    r = run_kdlab([*args, "trainer.precision=32-true"], tmp_path, tmp_path / "fp32")
    assert r.returncode == 0, r.stderr
    r = run_kdlab(args, tmp_path, tmp_path / "auto")  # precision: auto
    assert r.returncode == 0, r.stderr
    assert read_results(tmp_path / "auto")["stages"][0]["cached"] is True
    r = run_kdlab([*args, "trainer.precision=bf16-mixed"], tmp_path, tmp_path / "bf16")
    assert r.returncode == 0, r.stderr
    assert read_results(tmp_path / "bf16")["stages"][0]["cached"] is False


FITTED: list[tuple[str, int, str, bool]] = []  # (stage, seed, augment, views) of the data each fit got


class DataRecorder(Callback):
    def setup(self, trainer, pl_module, stage):
        if stage == "fit":
            dm = trainer.datamodule
            FITTED.append((pl_module.stage_name, dm.seed, dm.augment, dm.train_views))


def test_each_stage_fits_on_its_own_view_of_the_data_and_the_run_s_is_unchanged(tmp_path, monkeypatch):
    """A teacher with a pinned seed and its own augmentation, a student with a seed offset: Lightning fits each on
    data with the stage's seed and augmentation; the run's data module keeps the run's settings throughout."""
    from kdlab.pipeline import runner

    built = []
    real = runner.build_datamodule
    monkeypatch.setattr(runner, "build_datamodule", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    FITTED.clear()
    cfg = compose_dictconfig("preset=none", "data=synthetic", "data.n_train=128", "data.n_test=32",
                             "data.batch_size=64", "data.augment=none", "pipeline=direct",
                             "pipeline.chain=[plain2,plain2]", "distill=kd", "trainer.max_epochs=1", "seed=3",
                             "logger=none", "callbacks.progress=none", f"paths.store_dir={tmp_path / 'store'}",
                             "+pipeline.per_stage.teacher.seed=11", "+pipeline.per_stage.teacher.augment=flip",
                             "+pipeline.per_stage.student.seed_offset=1",
                             f"+callbacks.data._target_={__name__}.DataRecorder")
    assert run_pipeline(cfg, tmp_path / "run")["status"] == "completed"
    assert FITTED == [("teacher", 11, "flip", False), ("student", 4, "none", False)]
    (dm,) = built
    assert (dm.seed, dm.augment, dm.train_views) == (3, "none", False)


def test_one_stage_record_for_a_trained_and_an_imported_stage():
    """StageOutcome.meta is every stage's meta.json: the fields results.json reads, for both kinds of stage."""
    from kdlab.pipeline.runner import OPTIONAL_STAGE_FIELDS, STAGE_FIELDS
    from kdlab.pipeline.train import StageOutcome

    teacher, student = build_stages(cfg(topology="direct", chain=["plain4", "plain2"]))
    trained = StageOutcome(params=10, extra_params=3, epochs=2, best_epoch=1, val_acc=0.5, test_acc=0.4,
                           test_acc_last=0.3, val_curve=[0.2, 0.5], train_seconds=1.5, samples_per_second=8.0,
                           extra={"data_free": True, "test_acc_best_val": 0.4, "val_acc_best": 0.5}
                           ).meta(student, {"seed": 0}, stage_seconds=2.0004)
    imported = StageOutcome(params=10, val_acc=0.6, test_acc=0.7, test_acc_last=0.7, val_curve=[0.6],
                            extra={"pretrained": True, "imported_from": "/w.pt"}).meta(teacher, {}, 1.0)
    for meta in (trained, imported):
        assert set(STAGE_FIELDS) <= set(meta)
    assert {k: trained[k] for k in ("name", "sources", "epochs", "best_epoch", "stage_seconds")} == \
        {"name": "student", "sources": ["teacher"], "epochs": 2, "best_epoch": 1, "stage_seconds": 2.0}
    assert [k for k in trained if k in OPTIONAL_STAGE_FIELDS] == ["data_free", "test_acc_best_val", "val_acc_best"]
    assert (imported["epochs"], imported["extra_params"], imported["train_seconds"], imported["best_epoch"],
            imported["samples_per_second"], imported["sources"]) == (0, 0, 0.0, None, None, [])
    assert list(imported)[-2:] == ["pretrained", "imported_from"] and imported["description"] == {}
