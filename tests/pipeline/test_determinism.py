"""Determinism: the same command with the same seed, run twice on CPU, gives identical results."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.helpers.cli import read_results, run_kdlab

# A dense chain with stochastic teaching (drop_k) and the source-output cache: every random draw counts.
ARGS = ["preset=none", "data=synthetic", "data.n_train=384", "data.n_test=128", "data.batch_size=32",
        "logger=csv", "callbacks.progress=plain", "trainer.max_epochs=2", "trainer.deterministic=true",
        "optimizer=adam", "optimizer.lr=0.003", "pipeline=dense", "pipeline.chain=[plain4,plain2,plain2]",
        "distill.stochastic.mode=drop_k", "distill.stochastic.k=1", "seed=3"]
METRICS = ("test_acc", "test_acc_last", "val_acc", "val_curve", "best_epoch", "epochs", "params")


@pytest.mark.slow
def test_same_command_same_seed_gives_identical_results(tmp_path):
    runs = []
    for i in (1, 2):  # separate stores: both runs train every stage
        r = run_kdlab(ARGS, tmp_path / f"out{i}", tmp_path / f"run{i}", synth=False)
        assert r.returncode == 0, r.stderr[-3000:]
        runs.append(read_results(tmp_path / f"run{i}"))
    a, b = runs
    assert [s["cached"] for s in a["stages"] + b["stages"]] == [False] * 6
    for sa, sb in zip(a["stages"], b["stages"]):
        assert sa["store_key"] == sb["store_key"]
        assert {k: sa[k] for k in METRICS} == {k: sb[k] for k in METRICS}, sa["name"]
        digests = [hashlib.sha256(Path(s["checkpoint"]).read_bytes()).hexdigest() for s in (sa, sb)]
        assert digests[0] == digests[1], f"{sa['name']}: weights differ"
    assert a["final"] == b["final"]
