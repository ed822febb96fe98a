"""optimizer.lr_scaling (kdlab/pipeline/lr_scaling.py): the lr for the run's global batch (linear, sqrt, none), its
place in the stage specs and store keys, and a bad setting as one line."""
from __future__ import annotations

import pytest

from tests.helpers.cli import run_kdlab
from tests.helpers.config import compose_config, stage_keys

BASE = ["preset=none", "data=synthetic", "pipeline=direct", "pipeline.chain=[plain4,plain2]", "data.batch_size=64"]



def test_lr_scaling_arithmetic():
    from kdlab.pipeline.lr_scaling import global_batch, scale_factor, scaled_optimizer, world_size

    assert world_size({"devices": 4, "num_nodes": 2}) == 8
    assert world_size({"devices": [0, 1, 2]}) == 3 and world_size({"devices": "0,1"}) == 2
    assert world_size({"devices": "auto", "accelerator": "cpu"}) == 1
    cfg = {"data": {"batch_size": 64}, "trainer": {"devices": 4, "num_nodes": 2, "accumulate_grad_batches": 2}}
    assert global_batch(cfg) == 64 * 4 * 2 * 2 == 1024
    assert scale_factor("linear", 1024, 256) == 4.0 and scale_factor("sqrt", 1024, 256) == 2.0
    node = {"_target_": "torch.optim.SGD", "lr": 0.1, "momentum": 0.9, "lr_scaling": "linear", "reference_batch": 256}
    out, info = scaled_optimizer(node, cfg)
    assert out == {"_target_": "torch.optim.SGD", "lr": pytest.approx(0.4), "momentum": 0.9}
    assert info == {"rule": "linear", "base_lr": 0.1, "global_batch": 1024, "reference_batch": 256, "lr": pytest.approx(0.4)}
    out, _ = scaled_optimizer({**node, "lr_scaling": "sqrt", "reference_batch": 4096}, cfg)
    assert out["lr"] == pytest.approx(0.1 * 0.5)
    out, info = scaled_optimizer({**node, "lr_scaling": "none"}, cfg)
    assert out["lr"] == 0.1 and info is None and "lr_scaling" not in out



def test_lr_scaling_in_the_stage_specs_and_keys():
    from kdlab.pipeline import build_stages

    one = compose_config(*BASE, "optimizer.lr=0.1", "optimizer.lr_scaling=linear", "optimizer.reference_batch=256")
    four = compose_config(*BASE, "optimizer.lr=0.1", "optimizer.lr_scaling=linear", "optimizer.reference_batch=256",
                          "trainer=ddp", "trainer.devices=4")
    assert [s.optimizer["lr"] for s in build_stages(one)] == [pytest.approx(0.025)] * 2  # 64 / 256
    assert [s.optimizer["lr"] for s in build_stages(four)] == [pytest.approx(0.1)] * 2   # 64 x 4 / 256
    assert all("lr_scaling" not in s.optimizer for s in build_stages(four))
    assert stage_keys(one) != stage_keys(compose_config(*BASE, "optimizer.lr=0.1", "optimizer.lr_scaling=linear",
                                                        "optimizer.reference_batch=128"))
    # the same world size and lr: only the scaling differs -> different stages
    ddp2 = ["trainer=ddp", "trainer.devices=2"]
    lin2 = compose_config(*BASE, *ddp2, "optimizer.lr=0.1", "optimizer.lr_scaling=linear")
    lin4 = compose_config(*BASE, "trainer=ddp", "trainer.devices=4", "optimizer.lr=0.1", "optimizer.lr_scaling=linear")
    none2 = compose_config(*BASE, *ddp2, "optimizer.lr=0.1")
    assert stage_keys(lin2) != stage_keys(lin4) and stage_keys(lin2) != stage_keys(none2)
    # a scaled lr is hashed as the lr itself: 0.1 x 128/256 is the stage trained with lr 0.05 written by hand
    assert stage_keys(lin2) == stage_keys(compose_config(*BASE, *ddp2, "optimizer.lr=0.05"))
    # none keeps the keys of a config without the new keys (what they were before they existed)
    plain = compose_config(*BASE, "optimizer.lr=0.1")
    legacy = {**plain, "optimizer": {k: v for k, v in plain["optimizer"].items()
                                     if k not in ("lr_scaling", "reference_batch")}}
    assert stage_keys(plain) == stage_keys(legacy)



@pytest.mark.slow  # a long CLI run: in make test-slow (CI runs both)
def test_bad_lr_scaling_is_one_line_exit_2(tmp_path):
    r = run_kdlab([*BASE, "optimizer.lr_scaling=cubic"], tmp_path / "out", tmp_path / "run", synth=False)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert lines == ["kdlab: error: unknown optimizer.lr_scaling 'cubic'; known: none, linear, sqrt"], r.stderr

