"""A short run on real Fashion-MNIST through the CLI: it must beat chance (10 %) by a wide margin."""
from __future__ import annotations

import pytest

from tests.helpers.cli import FASHION_MNIST_DIR, read_results, run_kdlab


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(),
                    reason="Fashion-MNIST absent: apt-get install dataset-fashion-mnist")
@pytest.mark.slow  # a long CLI run: in make test-slow (CI runs both)
def test_real_fashion_mnist_run_beats_chance(tmp_path):
    args = ["pipeline=single", "model=plain2", "distill=none", "data=fashion_mnist", "data.subset=3000",
            "data.test_subset=2000", "data.augment=none", "trainer.max_epochs=2", "optimizer.lr=0.05",
            "logger=csv", "callbacks.progress=plain"]
    r = run_kdlab(args, tmp_path / "out", tmp_path / "run", synth=False)
    assert r.returncode == 0, r.stderr[-3000:]
    res = read_results(tmp_path / "run")
    assert res["status"] == "completed" and res["dataset"] == "fashion_mnist"
    assert res["final"]["test_acc"] > 0.6, res["final"]  # chance is 0.1
