"""Distributed training: ``trainer=ddp`` with 2 CPU processes (gloo) runs a whole pipeline.

Lightning's DDP launcher re-runs ``python -m kdlab`` (same overrides, same Hydra run dir) for rank 1.
Every rank walks the same stages and trains the same ones together; rank 0 alone looks the store up
(under its lock), commits the stages, writes results.json and logs to W&B (kdlab/store/stage_store.py RankSync).
"""
from __future__ import annotations

import json
import subprocess
import time

import pytest
import torch

from kdlab.store import StageStore
from tests.helpers.cli import read_results, run_kdlab, trained

pytestmark = pytest.mark.slow

# Learnable in two epochs with Adam; batch 32 in one process = 16 per rank x 2 ranks (the same steps).
ARGS = ["preset=none", "data=synthetic", "data.n_train=1024", "data.n_test=256", "callbacks.progress=plain",
        "trainer.max_epochs=2", "optimizer=adam", "optimizer.lr=0.003", "pipeline=dense",
        "pipeline.chain=[plain4,plain2,plain2]"]
DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "data.batch_size=16"]


def _stage_dirs(store):
    return sorted(p for p in store.iterdir() if p.is_dir())


def _leftover_ranks(run_dir) -> list[str]:
    """kdlab processes still running for this run dir (a rank left behind would show up here)."""
    r = subprocess.run(["pgrep", "-af", f"hydra.run.dir=.*{run_dir}"], check=False, capture_output=True, text=True)
    return [ln for ln in r.stdout.splitlines() if "kdlab" in ln and "pgrep" not in ln]


def test_ddp_two_cpu_processes_run_a_three_stage_pipeline(tmp_path):
    single = run_kdlab(ARGS + ["data.batch_size=32", "logger=csv"], tmp_path / "one", tmp_path / "one_run",
                       synth=False)
    assert single.returncode == 0, single.stderr[-3000:]

    run_dir = tmp_path / "ddp_run"
    r = run_kdlab(ARGS + DDP + ["logger=wandb"], tmp_path / "ddp", run_dir, synth=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "kdlab: error" not in r.stderr
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in r.stdout + r.stderr  # rank 1 really ran (its log shares the terminal)
    assert (run_dir / "train_ddp_process_1.log").exists()

    # exactly one results.json, complete
    assert sorted(tmp_path.rglob("results.json")) == [run_dir / "results.json", tmp_path / "one_run" / "results.json"]
    res = read_results(run_dir)
    assert res["status"] == "completed" and trained(res) == ["teacher", "ta1", "student"]

    # one copy of each stored stage, written whole by rank 0, no leftovers
    store = tmp_path / "ddp" / "store"
    dirs = _stage_dirs(store)
    assert [d.name for d in dirs] == sorted(s["store_key"] for s in res["stages"])
    check = StageStore(store, on_corrupt="fail")
    for d in dirs:
        assert sorted(p.name for p in d.iterdir() if p.name != "cache") == ["DONE", "meta.json", "model.pt"]
        assert check.lookup(d.name) is not None
        # its test-split outputs, gathered from both ranks' shards by its test pass: no stage ran again for them
        assert sorted(p.name for p in (d / "cache").glob("test.*")) == ["test.pt", "test.sha256"]
    assert not list(store.rglob("*.tmp-*"))
    assert "computing them once" not in r.stdout + r.stderr
    student = res["stages"][-1]
    assert set(student["agreement"]) == {"teacher", "ta1"} and all(0.0 <= s["ece"] <= 1.0 for s in res["stages"])
    # the stored outputs measured the reported test_acc (every test image, once)
    outs = torch.load(store / student["store_key"] / "cache" / "test.pt", weights_only=True)
    acc = float((outs["logits"].float().argmax(1) == outs["labels"]).double().mean())
    assert abs(acc - student["test_acc"]) <= 1 / len(outs["labels"]) + 1e-6

    # one W&B run per stage (offline), from rank 0 only
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 3, runs
    assert sorted((run_dir / "csv").iterdir()) == [run_dir / "csv" / n for n in ("student", "ta1", "teacher")]

    # accuracy comparable to one process (same data, same number of optimizer steps)
    one = read_results(tmp_path / "one_run")
    for s_one, s_ddp in zip(one["stages"], res["stages"]):
        assert s_ddp["test_acc"] > 0.4, (s_one, s_ddp)  # learned (10 classes: chance is 0.1)
        assert abs(s_ddp["test_acc"] - s_one["test_acc"]) < 0.2, (s_one["name"], s_one["test_acc"], s_ddp["test_acc"])
    assert len(res["stages"][-1]["val_curve"]) == 2
    # the training curve is the mean over both ranks' batches (one value per epoch, as sync_dist logs it)
    assert len(res["stages"][-1]["train_curve"]) == 2 and all(0 <= v <= 1 for v in res["stages"][-1]["train_curve"])

    # the other rank exits with rank 0
    t0 = time.monotonic()
    while _leftover_ranks(run_dir) and time.monotonic() - t0 < 30:
        time.sleep(0.5)
    assert not _leftover_ranks(run_dir)

    # a changed student: teacher and TA come from the store on both ranks, only the student trains
    # (Lightning starts rank 1 at the student; it learns from rank 0 that the stages before were reused)
    r2 = run_kdlab(ARGS + DDP + ["logger=csv", "+pipeline.per_stage.student.distill.temperature=2.0"],
                   tmp_path / "ddp", tmp_path / "ddp_run2", synth=False)
    assert r2.returncode == 0, r2.stderr[-3000:]
    res2 = read_results(tmp_path / "ddp_run2")
    assert trained(res2) == ["student"] and res2["status"] == "completed"
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in r2.stdout + r2.stderr
    assert len(_stage_dirs(store)) == 4
    assert json.loads((store / res2["stages"][-1]["store_key"] / "meta.json").read_text())["name"] == "student"
