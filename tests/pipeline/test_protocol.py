"""The protocols (kdlab/pipeline/protocol.py): protocol=reference trains on the whole training split in fp32, runs the
per-epoch evaluation on the test split and reports it under its own names (test_acc_best_on_test, test_curve), never
as validation; each stage keeps the checkpoint its protocol / recipe says, and the kept weights are that epoch's."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kdlab.errors import ConfigError
from kdlab.pipeline import build_stages, protocol
from tests.helpers.cli import SYNTH, read_results, run_kdlab
from tests.helpers.config import compose_config, stage_keys

# a three-stage TAKD recipe under the reference protocol, shrunk to synthetic data: the fields it changes are
# recorded as the user's deviations from the card (results.json reference.changed)
REFERENCE_RUN = ["+experiment=takd_cifar100_resnet", "protocol=reference",
                 *[a for a in SYNTH if not a.startswith(("optimizer.lr=", "trainer.max_epochs="))],
                 "pipeline.chain=[plain4,plain2,plain2]", "trainer.max_epochs=4", "optimizer.lr=0.2", "data.noise=2.0"]


def composed(*overrides: str) -> dict:
    return compose_config(*SYNTH, *overrides)


# -- config: the protocol group, keep, checks -------------------------------------------------------------------
def test_the_default_protocol_is_heldout_and_reference_sets_split_precision_keep():
    heldout = compose_config("+experiment=dkd_cifar100")
    assert heldout["protocol"]["name"] == "heldout" and heldout["data"]["val_split"] == 0.1
    assert heldout["trainer"]["precision"] == "auto"  # the recipe no longer pins it: the protocol wins
    ref = compose_config("+experiment=dkd_cifar100", "protocol=reference")
    assert ref["protocol"]["name"] == "reference" and ref["data"]["val_split"] == 0
    assert ref["trainer"]["precision"] == "32-true"
    assert [protocol.stage_keep(ref, s) for s in build_stages(ref)] == ["last", "last"]
    assert [protocol.stage_keep(heldout, s) for s in build_stages(heldout)] == ["best_on_val", "best_on_val"]


def test_best_is_the_protocols_best_and_a_recipe_keeps_it():
    takd = compose_config("+experiment=takd_cifar100_resnet", "protocol=reference")
    assert {protocol.stage_keep(takd, s) for s in build_stages(takd)} == {"best_on_test"}
    held = compose_config("+experiment=takd_cifar100_resnet")
    assert {protocol.stage_keep(held, s) for s in build_stages(held)} == {"best_on_val"}
    dafl = compose_config("+experiment=dafl_cifar10", "protocol=reference")
    assert [protocol.stage_keep(dafl, s) for s in build_stages(dafl)] == ["last", "best_on_test"]
    held = compose_config("+experiment=dafl_cifar10")  # a data-free student never chooses on real data
    assert [protocol.stage_keep(held, s) for s in build_stages(held)] == ["best_on_val", "last"]


def test_imagenet_recipes_hold_out_their_own_split_only_under_heldout():
    assert compose_config("+experiment=kd_imagenet", "data.root=/x")["data"]["val_split"] == 0.01
    assert compose_config("+experiment=kd_imagenet", "data.root=/x", "protocol=reference")["data"]["val_split"] == 0


@pytest.mark.parametrize(("overrides", "needles"), [
    (["data.val_split=0"], ["keeps its best epoch on the validation split", "data.val_split=0", "keep=last"]),
    (["protocol.keep=best_on_test"], ["protocol=heldout never chooses on the test split"]),
    (["protocol=reference", "data.val_split=0.1", "+experiment=dkd_cifar100", "protocol.keep=best"],
     ["keeps its best test epoch", "data.val_split=0"]),
    (["protocol.keep=sometimes"], ["unknown protocol.keep 'sometimes'", "best_on_test", "last"]),
    (["+pipeline.per_stage.student.keep=bestest"], ["unknown pipeline.per_stage.student.keep 'bestest'"]),
    (["protocol.name=paper"], ["unknown protocol 'paper'; known: heldout, reference"]),
])
def test_bad_protocol_settings_are_one_line_config_errors(overrides, needles):
    from kdlab.pipeline.checks import validate_config

    cfg = composed(*overrides)
    with pytest.raises(ConfigError) as e:
        validate_config(cfg)
    for needle in needles:
        assert needle in str(e.value), str(e.value)


def test_optuna_under_no_validation_split_is_refused():
    cfg = composed("data.val_split=0", "protocol.keep=last")
    protocol.check_sweeper(cfg, None)
    with pytest.raises(ConfigError, match="hparams_search=dgkd_optuna maximizes the final stage's best val_acc"):
        protocol.check_sweeper(cfg, "dgkd_optuna")
    protocol.check_sweeper(composed(), "dgkd_optuna")  # heldout: its validation split


def test_store_keys_differ_exactly_where_the_stage_differs():
    base = ["+experiment=takd_cifar100_resnet", "trainer.precision=32-true"]
    heldout = stage_keys(compose_config(*base))
    reference = stage_keys(compose_config(*base, "protocol=reference"))
    assert not set(heldout.values()) & set(reference.values())  # another split: every stage differs
    last = stage_keys(compose_config(*base, "protocol=reference", "protocol.keep=last"))
    assert last["teacher"] != reference["teacher"]  # same training, another kept checkpoint
    # the heldout protocol spelled out is the default: its keys are the default's
    spelled = stage_keys(compose_config(*base, "protocol=heldout", "protocol.keep=best_on_val"))
    assert spelled == heldout


def test_accuracy_fields_on_the_test_split_choose_nothing():
    curve = [0.2, 0.6, 0.5, 0.55]
    f = protocol.accuracy_fields(curve, on_test=True, keep="last", data_free=False, best_score=0.6, test_best=None,
                                 test_last=0.55)
    assert f["val_acc"] is None and f["val_curve"] is None and f["best_epoch"] is None
    assert f["test_acc"] == f["test_acc_last"] == 0.55  # the last epoch: chosen on nothing
    assert f["test_acc_best_on_test"] == 0.6 and f["best_epoch_on_test"] == 1 and f["test_curve"] == curve
    assert f["kept"] == "last" and f["kept_epoch"] == 3
    f = protocol.accuracy_fields(curve, True, "best_on_test", False, 0.6, None, 0.55)
    assert f["kept"] == "best_on_test" and f["kept_epoch"] == 1 and f["test_acc"] == 0.55
    f = protocol.accuracy_fields([0.3, 0.7, 0.7], False, "best_on_val", False, 0.7, 0.66, 0.64)
    assert (f["best_epoch"], f["val_acc"], f["test_acc"], f["kept_epoch"]) == (1, 0.7, 0.66, 1)  # ties: the first


# -- end to end ---------------------------------------------------------------------------------------------------
def _test_accuracy(weights: Path, meta: dict, data_cfg: dict) -> float:
    """The test accuracy of stored weights, computed here from the data and the model, apart from kdlab's loop."""
    from kdlab.data import build_datamodule
    from kdlab.pipeline.assemble import model_from_entry

    dm = build_datamodule({k: v for k, v in data_cfg.items() if k != "batch_size"}, batch_size=64, seed=0)
    dm.setup()
    model = model_from_entry(meta["model"], dm.num_classes, dm.in_channels, dm.image_size)
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    mean, std = torch.tensor(dm.mean).view(1, -1, 1, 1), torch.tensor(dm.std).view(1, -1, 1, 1)
    x = (dm.test_images.float() / 255 - mean) / std
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + 100]).argmax(1) for i in range(0, len(x), 100)])
    return float((pred == dm.test_labels).float().mean())


@pytest.mark.slow  # two 3-stage CLI runs on synthetic data (~40 s)
def test_reference_run_end_to_end(tmp_path):
    out = tmp_path / "out"
    r = run_kdlab(REFERENCE_RUN, out, tmp_path / "run", synth=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "640 train / 0 val / 200 test" in r.stdout + r.stderr  # the whole training split trains
    res = read_results(tmp_path / "run")
    assert res["protocol"] == "reference" and res["status"] == "completed"
    ref = res["reference"]
    assert ref["card"] == "cards/takd_cifar100_resnet.yaml" and ref["reported"] == "test_acc_best_on_test"
    changed = {c["field"] for c in ref["changed"]}
    assert {"stages.teacher.arch", "stages.student.lr_schedule", "normalization.mean"} <= changed
    assert "data.val_split" not in changed and "trainer.precision" not in changed  # the protocol's own
    assert "reference run of cards/takd_cifar100_resnet.yaml" in r.stderr and "you changed:" in r.stderr
    data_cfg = compose_config(*REFERENCE_RUN)["data"]
    for s in res["stages"]:
        curve = s["test_curve"]
        assert len(curve) == 4 and s["val_acc"] is None and s["val_curve"] is None and s["best_epoch"] is None
        assert s["test_acc"] == s["test_acc_last"] == pytest.approx(curve[-1], abs=1e-6)
        assert s["test_acc_best_on_test"] == pytest.approx(max(curve)) and s["best_epoch_on_test"] == int(np.argmax(curve))
        assert s["kept"] == "best_on_test" and s["kept_epoch"] == s["best_epoch_on_test"]
        meta = json.loads((Path(s["checkpoint"]).parent / "meta.json").read_text())
        assert meta["description"]["trainer"]["precision"] == "32-true" and meta["description"]["keep"] == "best_on_test"
        # the stored weights are the best test epoch's: their test accuracy, computed here, is that epoch's
        assert _test_accuracy(Path(s["checkpoint"]), meta, data_cfg) == pytest.approx(s["test_acc_best_on_test"], abs=1e-6)
    assert res["final"]["test_acc_best_on_test"] == res["stages"][-1]["test_acc_best_on_test"]
    header = (tmp_path / "run" / "csv" / "student" / "metrics.csv").read_text().splitlines()[0]
    assert "test/acc_epoch" in header and "test/acc_best_on_test" in header and "val/acc" not in header
    # at least one stage's best test epoch is not its last: then keep=last stores other weights (another key)
    assert any(s["best_epoch_on_test"] != len(s["test_curve"]) - 1 for s in res["stages"]), \
        "every best epoch is the last one: change REFERENCE_RUN so that the kept checkpoints differ"

    r = run_kdlab([*REFERENCE_RUN, "protocol.keep=last"], out, tmp_path / "last", synth=False)
    assert r.returncode == 0, r.stderr[-3000:]
    last = read_results(tmp_path / "last")
    teacher, teacher_last = res["stages"][0], last["stages"][0]
    assert teacher_last["store_key"] != teacher["store_key"] and not teacher_last["cached"]
    assert teacher_last["test_curve"] == teacher["test_curve"]  # the same training
    for s in last["stages"]:
        assert s["kept"] == "last" and s["kept_epoch"] == len(s["test_curve"]) - 1
        meta = json.loads((Path(s["checkpoint"]).parent / "meta.json").read_text())
        assert _test_accuracy(Path(s["checkpoint"]), meta, data_cfg) == pytest.approx(s["test_acc_last"], abs=1e-6)


@pytest.mark.slow  # a two-stage CLI run (~15 s)
def test_an_imported_teacher_without_a_validation_split(tmp_path):
    """data.val_split=0 keep=last under the default protocol (no card needed): the whole training split, the
    imported teacher evaluated on the test split alone, nothing chosen on it."""
    from kdlab.models import build_model

    teacher = tmp_path / "teacher.pt"
    torch.save(build_model("plain4", num_classes=10, in_channels=1, input_size=28).state_dict(), teacher)
    r = run_kdlab(["pipeline=direct", "pipeline.chain=[plain4,plain2]", "data.val_split=0", "protocol.keep=last",
                   f"pipeline.teacher_checkpoint={teacher}"], tmp_path / "out", tmp_path / "run")
    assert r.returncode == 0, r.stderr[-3000:]
    res = read_results(tmp_path / "run")
    assert res["protocol"] == "heldout" and res["reference"] is None
    imported, student = res["stages"]
    assert imported["val_acc"] is None and imported["kept"] is None and imported["epochs"] == 0
    assert student["kept"] == "last" and student["test_acc"] == student["test_acc_last"]
    assert student["test_acc_best_on_test"] == pytest.approx(max(student["test_curve"]))
