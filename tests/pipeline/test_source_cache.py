"""distill.cache=views: every (image, crop offset, flip) of the augmented training split computed once per
source, memory-mapped from the store, looked up by the views the loader drew; cached == live."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from kdlab.data.augment import crop_flip
from kdlab.distill.base import StrategyContext, build_strategy
from kdlab.errors import ConfigError
from kdlab.models import FeatureTaps, build_model
from kdlab.modules import DistillModule, SourceBank
from kdlab.pipeline import assemble, source_cache, view_plan
from kdlab.pipeline.context import RunContext
from kdlab.pipeline.runner import run_pipeline
from kdlab.pipeline.spec import build_stages
from kdlab.store import StageRecord, StageStore, stage_key
from tests.helpers.cli import run_kdlab, trained
from tests.helpers.config import compose_config, compose_dictconfig, stage_keys

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
    loader = iter(dm.for_stage(views=True).train_dataloader())
    return [next(loader) for _ in range(n)]


def test_the_loader_reports_the_views_it_drew_and_its_batches_are_unchanged(dm):
    plain = list(dm.train_dataloader())
    with_views = list(dm.for_stage(views=True).train_dataloader())
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
    data = next(manifest.parent.glob("*.views.0.bin"))
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
    monkeypatch.setattr(view_plan.shutil, "disk_usage", lambda p: type("U", (), {"free": 10_000})())
    with pytest.raises(ConfigError, match=r"needs 0\.\d+ GB for 2 source view cache\(s\).*0\.00 GB free") as err:
        run_pipeline(compose_dictconfig(*TINY, "distill.cache=views", f"paths.store_dir={store}"), tmp_path / "c")
    assert "\n" not in str(err.value)
    assert not list(store.glob("*/DONE"))  # nothing was trained
    # views drawn per sample by a worker (imagefolder's random-resized crop) cannot be enumerated
    from kdlab.data import build_datamodule
    from tests.helpers.data import write_pngs

    write_pngs(tmp_path / "img", "train", {"cat": 3, "dog": 3})
    write_pngs(tmp_path / "img", "test", {"cat": 1, "dog": 1})
    folder = build_datamodule({"name": "imagefolder", "root": str(tmp_path / "img"), "image_size": 8,
                               "num_workers": 0, "augment": "crop_flip"}, 4, 0)
    with pytest.raises(ConfigError, match="needs enumerable views"):
        source_cache.require_view_space(folder)
    auto = context(folder, tmp_path / "s")
    auto.cfg["distill"]["cache"] = "auto"
    assert view_plan.plan_views([], auto) == frozenset()  # auto: those sources simply run live


# -- top-k storage (distill.view_topk) ----------------------------------------------------------------------------
def topk_reference(z: torch.Tensor, k: int) -> torch.Tensor:
    """The stated reconstruction, computed here from its definition: softmax(z) kept on the top k classes, the
    rest of the mass spread evenly over the other classes (one row at a time, in float64)."""
    out = []
    for row in z.double():
        p = torch.softmax(row, 0)
        top = set(torch.argsort(row, descending=True)[:k].tolist())
        rest = 1.0 - sum(p[j].item() for j in top)
        out.append(torch.tensor([p[j].item() if j in top else rest / (len(row) - k) for j in range(len(row))],
                                dtype=torch.float64))
    return torch.stack(out)


def test_topk_logits_keep_the_top_k_probabilities_and_spread_the_rest_of_the_mass():
    from kdlab.store.view_cache import TopKLogits

    torch.manual_seed(0)
    c, k = 100, 10
    z = torch.randn(64, c) * 3
    codec = TopKLogits(c, k)
    rows = {name: torch.from_numpy(a) for name, a in codec.encode(z).items()}
    assert rows["logits/topk_indices"].dtype == torch.int16 and rows["logits/topk_values"].dtype == torch.float16
    assert rows["logits/rest"].shape == (64,)
    z_hat = codec.decode(rows).float()
    assert z_hat.shape == (64, c)
    p, p_hat, ref = torch.softmax(z.double(), 1), torch.softmax(z_hat.double(), 1), topk_reference(z, k)
    torch.testing.assert_close(p_hat, ref, rtol=0, atol=2e-3)  # fp16 storage of the values and the rest logit
    # the stated error: L1 <= 2 m and KL(p || p_hat) <= m log(C - k), m = the mass outside the top k
    m = 1 - torch.sort(p, 1, descending=True).values[:, :k].sum(1)
    assert bool(((p_hat - p).abs().sum(1) <= 2 * m + 2e-3).all())
    kl = (p * (p.log() - p_hat.log())).sum(1)
    assert bool((kl <= m * np.log(c - k) + 2e-3).all())
    assert float(m.max()) > 0.05  # a case where the rest matters, not a trivially peaked one
    # more than 32768 classes: int32 indices
    assert TopKLogits(40_000, 5).layout()["logits/topk_indices"] == ((5,), "int32")


def test_topk_view_caches_are_smaller_checked_and_another_cache_than_fp16(dm, tmp_path, capsys):
    k = 3
    ctx = context(dm, tmp_path)
    full = view_tables(ctx, sources(1))["teacher"]
    ctx.cfg["distill"]["view_topk"] = k
    table = view_tables(ctx, sources(1))["teacher"]
    cache = tmp_path / "key-teacher" / "cache"
    manifests = sorted(cache.glob("*.views.json"))
    assert len(manifests) == 2  # a different k is a different cache (another data key), the fp16 one stays
    m = json.loads(next(p for p in manifests if "topk" in p.read_text()).read_text())
    assert m["logits"] == {"codec": "topk", "k": k}
    rows = dm.train_size * 50
    sizes = {name: (cache / e["file"]).stat().st_size for name, e in m["arrays"].items()}
    # values fp16 (2 bytes each), indices int16 (2 bytes), one fp16 rest logit per view; fp16 full: 10 x 2 bytes
    assert sizes == {"logits/topk_values": rows * k * 2, "logits/topk_indices": rows * k * 2, "logits/rest": rows * 2}
    assert (cache / json.loads(next(p for p in manifests if "topk" not in p.read_text()).read_text())
            ["arrays"]["logits"]["file"]).stat().st_size == rows * 10 * 2
    model = sources(1)["teacher"]
    for x, _, idx, views in augmented_batches(dm):
        with torch.inference_mode():
            live = model(x)
        logits, _ = table.lookup(idx, views)
        full_logits, _ = full.lookup(idx, views)
        torch.testing.assert_close(torch.softmax(logits.double(), 1), topk_reference(live, k), rtol=0, atol=2e-3)
        # the top k are the live ones (fp16), where they are
        top = live.topk(k, 1).indices
        torch.testing.assert_close(logits.float().gather(1, top), live.gather(1, top), **TOL)
        torch.testing.assert_close(full_logits.float(), live, **TOL)
    # the indices are checked like every array: a flipped byte is caught, the cache dropped
    data_key = next(p for p in manifests if "topk" in p.read_text()).name.split(".")[0]
    idx_file = cache / m["arrays"]["logits/topk_indices"]["file"]
    raw = bytearray(idx_file.read_bytes())
    raw[5] ^= 0x01
    idx_file.write_bytes(bytes(raw))
    assert ctx.store.load_view_cache("key-teacher", data_key) is None
    assert "fails its checksum; recomputing it" in capsys.readouterr().err


def planned_keys(store, tmp_path, *extra):
    """The run's view plan and every stage's store key under it, as the runner computes them."""
    cfg = compose_config(*TINY, f"paths.store_dir={store}", *extra)
    ctx = run_context(cfg, tmp_path)
    specs = build_stages(cfg)
    assemble.check_stages(specs, ctx)
    ctx.view_plan = view_plan.plan_views(specs, ctx)
    keys: dict[str, str] = {}
    for spec in specs:
        keys[spec.name] = stage_key(assemble.stage_description(spec, ctx, [keys[s] for s in spec.sources]))
    return ctx, keys


def test_a_student_taught_from_topk_views_is_another_stage(tmp_path):
    """The top-k reconstruction changes what the student learns: its key says so (its sources' do not)."""
    store = tmp_path / "store"

    def keys(*extra):
        return planned_keys(store, tmp_path, *extra)[1]

    full, top5, top3 = (keys("distill.cache=views"), keys("distill.cache=views", "distill.view_topk=5"),
                        keys("distill.cache=views", "distill.view_topk=3"))
    assert full["teacher"] == top5["teacher"] == top3["teacher"]
    assert len({full["ta1"], top5["ta1"], top3["ta1"]}) == 3 and len({full["student"], top5["student"]}) == 2
    # live sources: view_topk is not used, so the keys are those of a plain run
    assert keys("distill.cache=off", "distill.view_topk=5") == keys("distill.cache=off") == full
    # a run trains and stores exactly those stages, its student taught from top-3 views
    res = run_pipeline(compose_dictconfig(*TINY, "distill.cache=views", "distill.view_topk=3",
                                          f"paths.store_dir={store}"), tmp_path / "run")
    assert [s["store_key"] for s in res["stages"]] == list(top3.values())
    meta = json.loads((store / top3["student"] / "meta.json").read_text())
    assert meta["description"]["source_logits"] == "top3" and "source_logits" not in json.loads(
        (store / top3["teacher"] / "meta.json").read_text())["description"]
    codecs = {json.loads(p.read_text())["logits"]["codec"] for p in store.glob("*/cache/*.views.json")}
    assert codecs == {"topk"}


# -- distill.cache=auto: views where they pay -----------------------------------------------------------------
def run_context(cfg: dict, tmp_path: Path) -> RunContext:
    from kdlab.data import build_datamodule

    dm = build_datamodule({k: v for k, v in cfg["data"].items() if k != "batch_size"},
                          batch_size=int(cfg["data"]["batch_size"]), seed=int(cfg["seed"]))
    return RunContext(cfg=cfg, run_dir=tmp_path, store=StageStore(cfg["paths"]["store_dir"]), dm=dm, method="m",
                      dataset="d", group="g")


def test_the_auto_rule_builds_views_when_they_cost_fewer_forwards_than_teaching_live():
    # n x views forwards to build, n x (epochs the source teaches) live: views iff views < epochs, or stored
    assert view_plan.views_pay(views=162, taught_epochs=240 * 4, stored=False)  # CIFAR teacher of a 3-TA chain
    assert view_plan.views_pay(views=162, taught_epochs=163, stored=False)
    assert not view_plan.views_pay(views=162, taught_epochs=162, stored=False)  # a tie: live (no disk, no build)
    assert not view_plan.views_pay(views=162, taught_epochs=30, stored=False)  # few epochs
    assert view_plan.views_pay(views=162, taught_epochs=1, stored=True)  # already computed: a lookup is free
    assert view_plan.VIEW_RULES["views"](162, 1, False) and not view_plan.VIEW_RULES["off"](2, 1000, True)


def test_auto_picks_views_per_source_from_the_epochs_it_teaches(tmp_path, monkeypatch, capsys):
    """Dense chain teacher -> ta1 -> student, 50 views: the teacher teaches ta1 and the student, ta1 only the
    student; each source is decided on its own sum of epochs."""
    store = tmp_path / "store"

    def plan(*extra):
        ctx, keys = planned_keys(store, tmp_path, "distill.cache=auto", *extra)
        names = {v: k for k, v in keys.items()}
        return sorted(names[src] for src, _ in ctx.view_plan)

    # teacher: 30 + 30 = 60 epochs taught > 50 views; ta1: 30 < 50
    assert plan("trainer.max_epochs=30") == ["teacher"]
    assert plan("trainer.max_epochs=60") == ["ta1", "teacher"]
    assert plan("trainer.max_epochs=25") == []  # 50 epochs taught = 50 views: live
    # the student's epochs alone decide ta1 (per-stage epochs count)
    assert plan("trainer.max_epochs=5", "+pipeline.per_stage.student.max_epochs=51") == ["ta1", "teacher"]
    # unaugmented data: the per-image cache as before, never views; views drawn per sample: live, no error
    assert plan("trainer.max_epochs=60", "data.augment=none") == []
    # a disk that cannot hold them: one warning, the sources run live
    monkeypatch.setattr(view_plan.shutil, "disk_usage", lambda p: type("U", (), {"free": 10_000})())
    assert plan("trainer.max_epochs=60") == []
    assert "distill.cache=auto: the view caches would need" in capsys.readouterr().err


def test_auto_uses_stored_views_and_views_where_they_pay_in_a_run(tmp_path, monkeypatch):
    """flip: 2 views per image. The teacher teaches ta1 (1 epoch) and the student (2): 3 > 2, views; ta1 teaches
    the student's 2 epochs: 2 = 2, live. A second run (another T) reuses the teacher's stored views."""
    from kdlab.pipeline import train

    modules, computed = [], []
    real_build, real_compute = train.build_module, source_cache.compute_views
    monkeypatch.setattr(train, "build_module", lambda *a, **k: modules.append(real_build(*a, **k)) or modules[-1])
    monkeypatch.setattr(source_cache, "compute_views", lambda *a: (computed.append(1), real_compute(*a))[1])
    args = [*TINY, "data.augment=flip", "distill.cache=auto", "+pipeline.per_stage.student.max_epochs=2",
            f"paths.store_dir={tmp_path / 'store'}"]
    results = run_pipeline(compose_dictconfig(*args), tmp_path / "run")
    assert results["status"] == "completed"
    ta1, student = [m for m in modules if isinstance(m, DistillModule)]
    assert sorted(ta1.bank.views) == ["teacher"] and ta1.bank.forward_calls == {"teacher": 0}
    assert sorted(student.bank.views) == ["teacher"]
    assert student.bank.forward_calls["teacher"] == 0 and student.bank.forward_calls["ta1"] > 0  # ta1 live
    assert len(computed) == 1
    # another T, the teacher reused: it teaches one stage of 1 epoch and one of 5 (1 + 5 > 2 anyway), from its
    # stored views; ta1's (new, 5 epochs taught > 2) are computed
    again = run_pipeline(compose_dictconfig(*args[:-2], "+pipeline.per_stage.student.max_epochs=5",
                                            "distill.temperature=2.0", args[-1]), tmp_path / "run2")
    assert [s["cached"] for s in again["stages"]] == [True, False, False]
    ta1, student = [m for m in modules[3:] if isinstance(m, DistillModule)]
    assert sorted(student.bank.views) == ["ta1", "teacher"] and len(computed) == 2
    assert all(c == 0 for m in (ta1, student) for c in m.bank.forward_calls.values())



# -- resume, DDP ------------------------------------------------------------------------------------------------
class CrashAfterFirstStudentEpoch(pl.Callback):
    """Kills the student stage as its second epoch starts (its first epoch's checkpoint is written)."""

    def on_train_epoch_start(self, trainer, pl_module):
        if pl_module.stage_name == "student" and trainer.current_epoch == 1:
            raise RuntimeError("killed after the first epoch")


EPOCHS_RUN: list[tuple[str, int]] = []


class RecordEpochs(pl.Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        EPOCHS_RUN.append((pl_module.stage_name, trainer.current_epoch))


def test_a_student_with_view_cached_sources_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    from kdlab.pipeline import runner, train

    computed, modules = [], []
    real_compute, real_build = source_cache.compute_views, train.build_module
    monkeypatch.setattr(source_cache, "compute_views", lambda *a: (computed.append(1), real_compute(*a))[1])
    monkeypatch.setattr(train, "build_module", lambda *a, **k: modules.append(real_build(*a, **k)) or modules[-1])
    args = [*TINY, "distill.cache=views", "+pipeline.per_stage.student.max_epochs=3"]
    whole = run_pipeline(compose_dictconfig(*args, f"paths.store_dir={tmp_path / 'whole'}"), tmp_path / "w")
    assert whole["status"] == "completed" and len(computed) == 2

    store = tmp_path / "store"
    crash = f"+callbacks.crash._target_={__name__}.CrashAfterFirstStudentEpoch"
    with pytest.raises(RuntimeError, match="killed after the first epoch"):
        run_pipeline(compose_dictconfig(*args, crash, f"paths.store_dir={store}"), tmp_path / "a")
    assert len(computed) == 4 and len(list(store.glob("*/DONE"))) == 2  # teacher, ta1; the student was killed
    n_modules = len(modules)
    resumes = []
    real_resume = runner.resume_point
    monkeypatch.setattr(runner, "resume_point", lambda *a: resumes.append(real_resume(*a)) or resumes[-1])
    EPOCHS_RUN.clear()
    resumed = run_pipeline(compose_dictconfig(*args, f"+callbacks.epochs._target_={__name__}.RecordEpochs",
                                              f"paths.store_dir={store}"), tmp_path / "b")
    assert resumes[-1] is not None and resumes[-1].endswith("last.ckpt")
    assert EPOCHS_RUN == [("student", 1), ("student", 2)]  # epoch 0 was not trained again
    assert [s["cached"] for s in resumed["stages"]] == [True, True, False]
    assert len(computed) == 4  # the resumed student reads the stored views; no source runs
    student = modules[n_modules]
    assert sorted(student.bank.views) == ["ta1", "teacher"]
    assert all(c == 0 for c in student.bank.forward_calls.values())
    # the same student as the uninterrupted run: same key, same weights, same curve and accuracies
    a, b = whole["stages"][-1], resumed["stages"][-1]
    assert a["store_key"] == b["store_key"]
    assert (a["val_curve"], a["test_acc"], a["test_acc_last"]) == (b["val_curve"], b["test_acc"], b["test_acc_last"])
    wa = StageStore(tmp_path / "whole").lookup(a["store_key"]).state_dict()
    wb = StageStore(store).lookup(b["store_key"]).state_dict()
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_ddp_ranks_read_the_view_caches_rank_0_computed(tmp_path):
    """trainer=ddp, 2 CPU processes: rank 0 computes and stores every view cache, rank 1 reads the same files
    (no private copy), at the first trained stage (before Lightning starts rank 1) and at later stages (a
    barrier). Run 1: teacher, ta1, student; run 2 (top-k views: new caches, the teacher reused): ta1 first."""
    args = ["preset=none", "data=synthetic", "data.n_train=256", "data.n_test=64", f"data.image_size={SIZE}",
            f"data.pad={PAD}", "data.augment=crop_flip", "callbacks.progress=plain", "logger=csv",
            "trainer.max_epochs=1", "pipeline=dense", "pipeline.chain=[plain4,plain2,plain2]", "distill=dgkd",
            "distill.cache=views", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
            "data.batch_size=32"]
    out = tmp_path / "out"
    for run, extra, trained_stages in (("one", [], ["teacher", "ta1", "student"]),
                                       ("two", ["distill.view_topk=3"], ["ta1", "student"])):
        run_dir = tmp_path / run
        r = run_kdlab(args + extra, out, run_dir, synth=False)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "GLOBAL_RANK: 1, MEMBER: 2/2" in r.stdout + r.stderr  # rank 1 really ran
        res = json.loads((run_dir / "results.json").read_text())
        assert res["status"] == "completed" and trained(res) == trained_stages
        rank1 = (run_dir / "train_ddp_process_1.log").read_text()
        rank0 = (r.stdout + r.stderr).replace(rank1, "")
        assert rank1.count("read from the store") == 3, rank1[-3000:]  # teacher (ta1), teacher + ta1 (student)
        assert "computed once" not in rank1
        assert rank0.count("computed once") == 2  # teacher's and ta1's, by rank 0
    store = out / "store"
    manifests = sorted(store.glob("*/cache/*.views.json"))
    assert len(manifests) == 4  # run 1: teacher's and ta1's fp16; run 2: teacher's and its (other) ta1's top-3
    assert not list(store.rglob("*.tmp-*"))


def test_two_processes_needing_one_sources_views_at_once_compute_them_once(dm, tmp_path, monkeypatch):
    """Two jobs of a sweep (here two threads, each with its own store object: the lock is a file lock) that need
    the same source's view cache at the same time: the first computes it, the second waits and reads it."""
    import threading
    import time

    calls = []
    real = source_cache.compute_views

    def slow(*args, **kwargs):
        calls.append(threading.get_ident())
        time.sleep(0.5)  # long enough that the other job asks meanwhile
        return real(*args, **kwargs)

    monkeypatch.setattr(source_cache, "compute_views", slow)
    srcs = sources(1)
    tables, errors = [], []

    def job():
        try:
            tables.append(view_tables(context(dm, tmp_path / "store"), srcs)["teacher"])
        except Exception as e:  # noqa: BLE001 -- reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=job) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not errors and len(tables) == 2, errors
    assert len(calls) == 1  # computed once; without the lock both jobs computed it
    idx, views = torch.tensor([0, 5, 9]), torch.tensor([0, 7, 49])
    assert torch.equal(tables[0].lookup(idx, views)[0], tables[1].lookup(idx, views)[0])
