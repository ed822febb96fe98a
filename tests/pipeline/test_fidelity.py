"""Fidelity and calibration in results.json (kdlab/pipeline/fidelity.py): every stage keeps its test-split outputs in
the store, later stages read them (no source runs for its metrics), a stage stored without them (an older kdlab) is
run once and they are added to its entry without breaking ``lookup``; the numbers equal a hand computation from the
stored outputs, and (slow, the CLI) a recomputation from the stored weights."""
from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from kdlab.pipeline import fidelity
from kdlab.pipeline.runner import run_pipeline
from kdlab.store import StageStore
from tests.helpers.cli import SYNTH, read_results, run_kdlab
from tests.helpers.config import compose_config, compose_dictconfig

N_TEST = 48
TINY = ["preset=none", "data=synthetic", "data.n_train=128", f"data.n_test={N_TEST}", "data.batch_size=32",
        "data.batch_size_eval=32", "data.image_size=16", "logger=none", "callbacks.progress=none",
        "trainer.max_epochs=1", "trainer.accelerator=cpu", "optimizer.lr=0.01", "pipeline=dense",
        "pipeline.chain=[plain4,plain2,plain2]", "distill=dgkd"]
FIELDS = ("agreement", "agreement_teacher", "kl_teacher", "teacher_stages")


# -- hand computations (numpy, plain loops) ----------------------------------------------------------------------
def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def hand_metrics(student: np.ndarray, labels: np.ndarray, sources: dict[str, np.ndarray],
                 teachers: list[np.ndarray]) -> dict:
    """The fields of a results.json stage entry, by hand: ECE over 15 bins [i/15, (i+1)/15) (1.0 on its own)."""
    ps = softmax(student)
    conf, pred = ps.astype(np.float32).max(1), ps.argmax(1)
    bins: dict[int, list[int]] = {}
    for i, c in enumerate(conf):
        c = Fraction(float(c))
        bins.setdefault(15 if c >= 1 else max(b for b in range(15) if c >= Fraction(b, 15)), []).append(i)
    ece = sum(len(ix) / len(conf) * abs(np.mean(pred[ix] == labels[ix]) - np.mean(conf[ix].astype(np.float64)))
              for ix in bins.values())
    out = {"ece": ece}
    if sources:
        pt = np.mean([softmax(t) for t in teachers], axis=0)
        out["agreement"] = {n: float(np.mean(pred == softmax(s).argmax(1))) for n, s in sources.items()}
        out["agreement_teacher"] = float(np.mean(pred == pt.argmax(1)))
        kl = [sum(pt[i, k] * (math.log(pt[i, k]) - math.log(ps[i, k])) for k in range(pt.shape[1]) if pt[i, k] > 0)
              for i in range(len(pt))]
        out["kl_teacher"] = float(np.mean(kl))
    return out


def stored(store: Path, key: str) -> dict:
    return torch.load(store / key / "cache" / "test.pt", weights_only=True)


def check_against_stored(results: dict, store: Path) -> None:
    """Every stage's fields equal the hand computation from the stored test outputs; those outputs are the ones
    that measured its reported test_acc."""
    outs = {s["name"]: stored(store, s["store_key"]) for s in results["stages"]}
    for s in results["stages"]:
        mine = outs[s["name"]]
        logits, labels = mine["logits"].float().numpy(), mine["labels"].numpy()
        assert abs(float(np.mean(logits.argmax(1) == labels)) - s["test_acc"]) <= 1 / len(labels) + 1e-6, s["name"]
        teachers = [outs[t]["logits"].float().numpy() for t in s.get("teacher_stages", [])]
        want = hand_metrics(logits, labels, {n: outs[n]["logits"].float().numpy() for n in s["sources"]}, teachers)
        assert set(want) <= set(s) and s["ece"] == pytest.approx(want["ece"], abs=1e-6), s["name"]
        if s["sources"]:
            assert s["agreement"] == pytest.approx(want["agreement"], abs=1e-12)
            assert s["agreement_teacher"] == pytest.approx(want["agreement_teacher"], abs=1e-12)
            assert s["kl_teacher"] == pytest.approx(want["kl_teacher"], rel=1e-9, abs=1e-12)
        else:
            assert not set(FIELDS) & set(s)


@pytest.fixture()
def forwards(monkeypatch) -> dict[str, int]:
    """Forward calls, by stage, of the models the metrics build to run a stored stage over the test split."""
    calls: dict[str, int] = {}
    real = fidelity.build_stage_model

    def counted(spec, dm):
        model = real(spec, dm)
        model.register_forward_pre_hook(lambda *_: calls.__setitem__(spec.name, calls.get(spec.name, 0) + 1))
        return model

    monkeypatch.setattr(fidelity, "build_stage_model", counted)
    return calls


def test_stored_test_outputs_serve_every_later_stage_and_an_older_store_gets_them_once(tmp_path, forwards):
    store = tmp_path / "store"
    cfg = compose_dictconfig(*TINY, f"paths.store_dir={store}")
    first = run_pipeline(cfg, tmp_path / "run1")
    assert first["status"] == "completed"
    assert forwards == {}  # each stage's own test pass kept its outputs: no source ran again for the metrics
    names = [s["name"] for s in first["stages"]]
    assert names == ["teacher", "ta1", "student"]
    student = first["stages"][-1]
    assert set(student["agreement"]) == {"teacher", "ta1"} and student["teacher_stages"] == ["teacher"]
    assert all(0.0 <= v <= 1.0 for v in [*student["agreement"].values(), student["agreement_teacher"], student["ece"]])
    assert student["agreement_teacher"] == student["agreement"]["teacher"] and student["kl_teacher"] >= 0.0
    check_against_stored(first, store)

    # a store written by an older kdlab: the teacher has no test outputs. Its entry is still found (the outputs
    # are a cache beside it, not in DONE), it runs once over the test split (two batches of 32 for 48 images),
    # and its outputs are added to its entry; the next run reads them
    teacher = first["stages"][0]["store_key"]
    done_before = (store / teacher / "DONE").read_bytes()
    for f in (store / teacher / "cache").glob("test.*"):
        f.unlink()
    second = run_pipeline(cfg, tmp_path / "run2")
    assert [s["cached"] for s in second["stages"]] == [True, True, True]
    assert forwards == {"teacher": math.ceil(N_TEST / 32)}
    assert (store / teacher / "DONE").read_bytes() == done_before
    assert StageStore(store).lookup(teacher) is not None and (store / teacher / "cache" / "test.sha256").exists()
    for a, b in zip(first["stages"], second["stages"]):  # recomputed under the stage's autocast: its own numbers
        for k in ("ece", "agreement_teacher", "kl_teacher"):
            assert b.get(k) == pytest.approx(a.get(k), abs=2 / N_TEST), (a["name"], k)
    check_against_stored(second, store)
    third = run_pipeline(cfg, tmp_path / "run3")
    assert forwards == {"teacher": math.ceil(N_TEST / 32)}
    assert [{k: s.get(k) for k in (*FIELDS, "ece")} for s in third["stages"]] == \
        [{k: s.get(k) for k in (*FIELDS, "ece")} for s in second["stages"]]

    # a damaged file is dropped and computed again, never trusted
    path = store / teacher / "cache" / "test.pt"
    path.write_bytes(path.read_bytes()[:-8] + b"\0" * 8)
    run_pipeline(cfg, tmp_path / "run4")
    assert forwards == {"teacher": 2 * math.ceil(N_TEST / 32)}


def test_an_ensemble_teacher_is_the_mean_of_its_members(tmp_path):
    store = tmp_path / "store"
    cfg = compose_dictconfig(*TINY[:-2], "pipeline.topology=ensemble", "pipeline.ensemble=2",
                             "pipeline.chain=[plain2,plain2]", "distill=kd", f"paths.store_dir={store}")
    results = run_pipeline(cfg, tmp_path / "run")
    student = results["stages"][-1]
    assert student["teacher_stages"] == ["teacher1", "teacher2"] and set(student["agreement"]) == {"teacher1",
                                                                                                    "teacher2"}
    check_against_stored(results, store)  # the hand KL and agreement use the mean of the two softmax outputs


def test_a_data_free_student_reports_its_last_epoch_and_an_imported_teacher_keeps_its_outputs(tmp_path):
    from kdlab.models import build_model

    torch.manual_seed(0)
    ckpt = tmp_path / "lenet5.pt"
    torch.save(build_model("lenet5", 10, 1, input_size=28).state_dict(), ckpt)
    store = tmp_path / "store"
    cfg = compose_dictconfig(
        "pipeline=data_free", "distill=dafl", "preset=none", "data=synthetic", "data.n_train=256", "data.n_test=64",
        "data.batch_size=64", "logger=none", "callbacks.progress=none", "optimizer=adam", "trainer.max_epochs=2",
        "distill.dafl.batch_size=16", "distill.dafl.iters_per_epoch=3", "distill.dafl.latent_dim=8",
        "distill.dafl.teacher_tap=stage3", f"pipeline.teacher_checkpoint={ckpt}", f"paths.store_dir={store}")
    results = run_pipeline(cfg, tmp_path / "run")
    student = results["stages"][-1]
    assert student["data_free"] is True and student["teacher_stages"] == ["teacher"]
    check_against_stored(results, store)  # the stored outputs measured test_acc: the last epoch's


# -- the CLI, recomputed from the stored weights ------------------------------------------------------------------
@pytest.mark.slow
def test_results_json_fidelity_matches_a_recomputation_from_the_stored_weights(tmp_path):
    from kdlab.data import build_datamodule
    from kdlab.pipeline.assemble import model_from_entry

    args = ["pipeline.chain=[plain4,plain2,plain2]", "trainer.precision=32-true"]
    r = run_kdlab(args, tmp_path / "out", run_dir=tmp_path / "run")
    assert r.returncode == 0, r.stderr[-3000:]
    results = read_results(tmp_path / "run")
    cfg = compose_config(*SYNTH, *args)
    dm = build_datamodule({k: v for k, v in cfg["data"].items() if k != "batch_size"},
                          batch_size=int(cfg["data"]["batch_size"]), seed=int(cfg["seed"]))
    dm.setup()
    logits = {}
    for s in results["stages"]:
        meta = json.loads((Path(s["checkpoint"]).parent / "meta.json").read_text())
        model = model_from_entry(meta["model"], dm.num_classes, dm.in_channels, dm.image_size)
        model.load_state_dict(torch.load(s["checkpoint"], weights_only=True))
        model.eval()
        with torch.no_grad():
            logits[s["name"]] = model(dm.normalizer(dm.test_images)).numpy()
    labels = dm.test_labels.numpy()
    n = len(labels)
    for s in results["stages"]:
        assert float(np.mean(logits[s["name"]].argmax(1) == labels)) == pytest.approx(s["test_acc"], abs=1e-6)
        want = hand_metrics(logits[s["name"]], labels, {x: logits[x] for x in s["sources"]},
                            [logits[t] for t in s.get("teacher_stages", [])])
        assert s["ece"] == pytest.approx(want["ece"], abs=2e-3), s["name"]  # the stored logits are fp16
        if s["sources"]:
            assert s["teacher_stages"] == ["teacher"]
            for x, a in want["agreement"].items():
                assert abs(s["agreement"][x] - a) <= 1 / n + 1e-9
            assert abs(s["agreement_teacher"] - want["agreement_teacher"]) <= 1 / n + 1e-9
            assert s["kl_teacher"] == pytest.approx(want["kl_teacher"], rel=1e-2, abs=1e-4)
