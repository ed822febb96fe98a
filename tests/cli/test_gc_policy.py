"""The garbage-collector policy of ``python -m kdlab`` (kdlab/cli/gc_policy.py): imports with the collector off,
the run with it on and the libraries frozen, the exit collections skipping everything."""
from __future__ import annotations

import gc
import sys

import pytest

import kdlab.cli.hydra_app
import kdlab.cli.main as cli
from kdlab.cli import gc_policy


@pytest.fixture
def restore_gc():
    """Each test leaves the collector as it found it: on, nothing frozen."""
    yield
    gc.unfreeze()
    gc.enable()


def test_hold_release_and_exit(restore_gc):
    gc.unfreeze()
    gc_policy.hold()
    assert not gc.isenabled()
    kept = [[i] for i in range(1000)]  # created while held: tracked objects the release freezes
    gc_policy.release()
    assert gc.isenabled()
    frozen = gc.get_freeze_count()
    assert frozen >= len(kept)
    # only the first release after a hold acts: a second one (or one without a hold) freezes nothing more
    more = [[i] for i in range(1000)]
    gc_policy.release()
    assert gc.get_freeze_count() == frozen and gc.isenabled()
    gc_policy.at_exit()
    assert gc.get_freeze_count() >= frozen + len(more)


def test_release_without_hold_leaves_the_collector_alone(restore_gc):
    """A launcher's worker (joblib, submitit) runs jobs without __main__'s hold: nothing is frozen there."""
    gc.unfreeze()
    assert gc.isenabled()
    gc_policy.release()
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_cli_runs_the_pipeline_with_the_collector_on(restore_gc, monkeypatch, tmp_path):
    """``python -m kdlab``: the config is checked with the collector off, the job runs with it on and the
    imported libraries frozen (a run that kept it off would never collect its garbage cycles)."""
    seen: dict[str, object] = {}

    def fake_entry():
        seen.update(enabled=gc.isenabled(), frozen=gc.get_freeze_count(), lightning="pytorch_lightning" in sys.modules)

    real_preflight = cli.preflight

    def preflight(argv):  # the real one (it composes and checks the config), watched
        seen["enabled_in_preflight"] = gc.isenabled()
        real_preflight(argv)

    gc.unfreeze()
    monkeypatch.setattr(kdlab.cli.hydra_app, "hydra_entry", fake_entry)
    monkeypatch.setattr(cli, "preflight", preflight)
    monkeypatch.setattr(sys, "argv", ["kdlab", "preset=none", "data=synthetic", f"paths.output_dir={tmp_path}"])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 0
    assert seen["enabled_in_preflight"] is False
    assert seen["enabled"] is True and seen["frozen"] > 0 and seen["lightning"]
