"""distill.cache=views: every (image, crop offset, flip) of the augmented training split computed once per
source, memory-mapped from the store, looked up by the views the loader drew; cached == live."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kdlab.data.augment import crop_flip
from kdlab.distill.base import StrategyContext, build_strategy
from kdlab.errors import ConfigError
from kdlab.models import FeatureTaps, build_model
from kdlab.modules import DistillModule, SourceBank
from kdlab.pipeline import assemble, source_cache
from kdlab.pipeline.context import RunContext
from kdlab.pipeline.runner import run_pipeline
from kdlab.store import StageRecord, StageStore
from tests.conftest import compose_config, compose_dictconfig, stage_keys

SIZE, PAD = 16, 2  # 5 x 5 crop offsets x 2 flips = 50 views per image
TINY = ["preset=none", "data=synthetic", "data.n_train=128", "data.n_test=32", "data.batch_size=64",
        f"data.image_size={SIZE}", f"data.pad={PAD}", "data.augment=crop_flip", "logger=none",
        "callbacks.progress=none", "trainer.max_epochs=1", "trainer.accelerator=cpu", "trainer.precision=32-true",
        "optimizer.lr=0.01", "pipeline=dense", "pipeline.chain=[plain4,plain2,plain2]", "distill=dgkd"]
TOL = {"rtol": 2e-3, "atol": 2e-3}  # fp16 storage


@pytest.fixture(scope="module")
def dm(synthetic_dm):
    return synthetic_dm(n_train=64, n_test=32, augment="crop_flip", pad=PAD, image_size=SIZE, batch_size=16, seed=0)


def context(dm, store_dir: Path) -> RunContext:
    cfg = {"distill": {"cache": "views"}, "trainer": {"accelerator": "cpu", "precision": "32-true"}}
    return RunContext(cfg=cfg, run_dir=store_dir, store=StageStore(store_dir), dm=dm, method="m", dataset="d",
                      group="g")


def sources(n=2):
    torch.manual_seed(0)
    return {name: build_model(arch, num_classes=10, in_channels=1, input_size=SIZE).eval()
            for name, arch in zip(["teacher", "ta1"][:n], ["plain4", "plain2"])}


def view_tables(ctx, srcs, taps=()):
    return {name: source_cache.source_view_cache(ctx, StageRecord(f"key-{name}", ctx.store.stage_dir(f"key-{name}"),
                                                                  {}), m, list(taps))
            for name, m in srcs.items()}


def augmented_batches(dm, n=2):
    dm.train_views = True
    try:
        loader = iter(dm.train_dataloader())
        return [next(loader) for _ in range(n)]
    finally:
        dm.train_views = False


def test_the_loader_reports_the_views_it_drew_and_its_batches_are_unchanged(dm):
    plain = list(dm.train_dataloader())
    dm.train_views = True
    try:
        with_views = list(dm.train_dataloader())
    finally:
        dm.train_views = False
    space = dm.view_space()
    assert (space.pad, space.count) == (PAD, (2 * PAD + 1) ** 2 * 2)
    assert len(plain) == len(with_views) and all(len(b) == 3 for b in plain)
    seen = set()
    for (x, y, idx), (x2, y2, idx2, views) in zip(plain, with_views):
        assert torch.equal(x, x2) and torch.equal(y, y2) and torch.equal(idx, idx2)  # bit-identical batches
        offsets, flip = space.decode(views)
        assert torch.equal(dm.normalizer(crop_flip(dm.train_images[idx], PAD, offsets, flip)), x)
        seen.update(views.tolist())
    assert len(seen) > 10 and max(seen) < space.count


def test_cached_views_equal_the_live_outputs_of_the_same_augmented_batch(dm, tmp_path, monkeypatch, capsys):
    ctx = context(dm, tmp_path)
    srcs = sources(1)
    table = view_tables(ctx, srcs, taps=["prepool"])["teacher"]
    assert isinstance(table.arrays["logits"], np.memmap)  # read from disk, not held in RAM
    assert table.arrays["logits"].shape == (dm.train_size, 50, 10)
    model = srcs["teacher"]
    for x, _, idx, views in augmented_batches(dm):
        with torch.inference_mode(), FeatureTaps(model, ["prepool"]) as taps:
            live = model(x)
            live_feat = taps.features["prepool"]
        logits, feats = table.lookup(idx, views)
        assert logits.dtype == torch.float16
        torch.testing.assert_close(logits.float(), live, **TOL)
        torch.testing.assert_close(feats["prepool"].float(), live_feat, **TOL)
    # stored next to the source with a checksum per array; a second lookup reads it without a forward pass
    manifest = next((tmp_path / "key-teacher" / "cache").glob("*.views.json"))
    assert all(len(e["sha256"]) == 64 for e in json.loads(manifest.read_text())["arrays"].values())
    monkeypatch.setattr(source_cache, "compute_views", lambda *a: pytest.fail("recomputed"))
    again = view_tables(ctx, srcs, taps=["prepool"])["teacher"]
    assert np.array_equal(again.arrays["logits"], table.arrays["logits"])
    # a damaged array fails its checksum: dropped with a warning (and recomputed by the caller)
    data = next(manifest.parent.glob("*.views.0.f16"))
    raw = bytearray(data.read_bytes())
    raw[0] ^= 0xFF
    data.write_bytes(bytes(raw))
    assert ctx.store.load_view_cache("key-teacher", manifest.name.split(".")[0]) is None
    assert "fails its checksum; recomputing it" in capsys.readouterr().err
    assert not manifest.exists()


def test_a_dgkd_step_with_view_cached_sources_has_the_live_losses(dm, tmp_path):
    ctx = context(dm, tmp_path)
    srcs = sources(2)
    tables = view_tables(ctx, srcs)

    def module(**bank):
        torch.manual_seed(1)
        student = build_model("plain2", num_classes=10, in_channels=1, input_size=SIZE)
        strat = build_strategy({"strategy": "dgkd", "temperature": 4.0, "lam": 0.7},
                               StrategyContext("student", list(srcs), 10))
        return DistillModule(student, 10, functools.partial(torch.optim.SGD, lr=0.05), None,
                             sources=SourceBank(srcs, **bank), strategy=strat, max_epochs=1, stage="student")

    live, cached = module(), module(views=tables)
    for x, y, idx, views in augmented_batches(dm):
        _, t_live, w_live = live.compute_terms(x, y, idx)
        _, t_cached, w_cached = cached.compute_terms(x, y, idx, views)
        assert w_live == w_cached and set(t_live) == set(t_cached)
        for k in t_live:
            assert t_cached[k].item() == pytest.approx(t_live[k].item(), rel=2e-3, abs=1e-4), k
    assert cached.bank.forward_calls == {n: 0 for n in srcs}
    assert live.bank.forward_calls == {n: 2 for n in srcs}


def test_a_pipeline_computes_each_sources_views_once_and_never_runs_a_source(tmp_path, monkeypatch):
    from kdlab.pipeline import train

    computed, modules = [], []
    real_compute, real_build = source_cache.compute_views, train.build_module
    monkeypatch.setattr(source_cache, "compute_views", lambda *a: (computed.append(1), real_compute(*a))[1])
    monkeypatch.setattr(train, "build_module", lambda *a, **k: modules.append(real_build(*a, **k)) or modules[-1])
    cfg = compose_dictconfig(*TINY, "distill.cache=views", f"paths.store_dir={tmp_path / 'store'}")
    results = run_pipeline(cfg, tmp_path / "run")
    assert results["status"] == "completed"
    # the teacher teaches ta1 and the student: its views are computed once (for ta1) and reused; ta1's once
    assert len(computed) == 2
    distilled = [m for m in modules if isinstance(m, DistillModule)]
    assert [sorted(m.bank.views) for m in distilled] == [["teacher"], ["ta1", "teacher"]]
    assert all(calls == 0 for m in distilled for calls in m.bank.forward_calls.values())
    # a sweep job over T retrains ta1 and the student: the teacher's stored views teach both, only the new
    # ta1's views are computed
    again = run_pipeline(compose_dictconfig(*TINY, "distill.cache=views", "distill.temperature=2.0",
                                            f"paths.store_dir={tmp_path / 'store'}"), tmp_path / "run2")
    assert [s["cached"] for s in again["stages"]] == [True, False, False]
    assert len(computed) == 3 and all(c == 0 for m in modules[-2:] for c in m.bank.forward_calls.values())
    # the store keys do not depend on distill.cache
    keys = {mode: stage_keys(compose_config(*TINY, f"distill.cache={mode}")) for mode in ("off", "views", "auto")}
    assert keys["off"] == keys["views"] == keys["auto"]


def test_bad_view_settings_fail_before_anything_trains(tmp_path, monkeypatch, dm):
    store = tmp_path / "store"
    with pytest.raises(ConfigError, match=r"data.augment=none has one view per image") as err:
        run_pipeline(compose_dictconfig(*TINY, "data.augment=none", "distill.cache=views",
                                        f"paths.store_dir={store}"), tmp_path / "a")
    assert err.value.exit_code == 2 and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="known: auto, on, off, views"):
        run_pipeline(compose_dictconfig(*TINY, "distill.cache=view", f"paths.store_dir={store}"), tmp_path / "b")
    # a disk that cannot hold the views: one line with the size needed and the free space
    monkeypatch.setattr(assemble.shutil, "disk_usage", lambda p: type("U", (), {"free": 10_000})())
    with pytest.raises(ConfigError, match=r"needs 0\.\d+ GB for 2 source view cache\(s\).*0\.00 GB free") as err:
        run_pipeline(compose_dictconfig(*TINY, "distill.cache=views", f"paths.store_dir={store}"), tmp_path / "c")
    assert "\n" not in str(err.value)
    assert not list(store.glob("*/DONE"))  # nothing was trained
    # views drawn per sample by a worker (imagefolder's random-resized crop) cannot be enumerated
    from kdlab.data import build_datamodule
    from tests.test_data import write_pngs

    write_pngs(tmp_path / "img", "train", {"cat": 3, "dog": 3})
    write_pngs(tmp_path / "img", "test", {"cat": 1, "dog": 1})
    folder = build_datamodule({"name": "imagefolder", "root": str(tmp_path / "img"), "image_size": 8,
                               "num_workers": 0, "augment": "crop_flip"}, 4, 0)
    with pytest.raises(ConfigError, match="needs enumerable views"):
        source_cache.views_enabled(context(folder, tmp_path / "s"))
