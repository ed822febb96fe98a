"""A key the chosen strategy does not read, through the real CLI (``python -m kdlab -m``): one line naming the key
meant, exit status 2, before any job starts or anything is written, in a sweep over the key and in a sweep over
methods where only a later job's method does not read it. (The check itself: tests/distill/test_keys.py; the
command line and per-stage cases: the catalog, tests/cli/test_bad_inputs.py.)"""
from __future__ import annotations

import pytest

from tests.helpers.cli import run_kdlab

LINE = "kdlab: error: distill.temperature is not read by dkd; did you mean distill.dkd.temperature?"


@pytest.mark.parametrize("args", [
    ["distill=dkd", "distill.temperature=2,4"],  # a sweep over the key
    ["distill=kd,dkd", "distill.temperature=2"],  # a sweep over methods: the second job's does not read it
], ids=["sweep_over_the_key", "sweep_over_methods"])
@pytest.mark.slow  # a long CLI run: in make test-slow (CI runs both)
def test_a_sweep_with_a_key_the_strategy_does_not_read(args, tmp_path):
    run_dir = tmp_path / "run"
    r = run_kdlab(args, tmp_path / "out", run_dir=run_dir, multirun=True)
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.strip().splitlines() == [LINE]
    assert not run_dir.exists() and not (tmp_path / "out").exists()  # nothing ran, nothing was written
