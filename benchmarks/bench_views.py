"""(h) Sources cached under augmentation (``distill.cache=views``, issue 19): every (image, crop, flip) view of
every training image computed once per source, then looked up by the student's batches.

CIFAR-100-shaped synthetic data (3x32x32, 100 classes), crop + flip with pad 4 (162 views per image), a dense
DGKD chain of quarter-width plain CNNs (plain10 -> plain8 -> plain6 -> plain4 -> plain2, ``width_mult=0.25``)
at CPU sizes (128 training images before the 10 % validation split, 4 epochs per stage). Everything runs
through kdlab's real pipeline (``run_pipeline``: store, view caches, DistillModule, Lightning):

* job 1, the whole pipeline (teacher, 3 TAs, student), once with live sources (``distill.cache=off``) and
  once with views (``distill.cache=views``, each source's views built once, timed from outside);
* jobs 2-4 of a 4-job sweep over the student's temperature (``pipeline.per_stage.student.distill.temperature``
  = 1, 2, 8; job 1 has the default 4): the sources come from the store, so each job trains the student only,
  from live sources or from the stored views;
* the student alone (labels only, the same model and epochs).

Figures: the student stage with view-cached sources against the student alone (steady-state step time,
target <= 1.3x) and against live sources (the speed-up); the one-time cost of the views (seconds, and in
student epochs with live sources); the epochs of teaching after which the views pay; the whole pipeline and
the sweep with views against without.

    python benchmarks/bench_views.py            # or: make bench ARGS="--only views"   (~6 min on 2 loaded cores)
    python benchmarks/bench_views.py --quick    # seconds: a 3-model chain, 2 jobs (the smoke test)

The sizes are this script's own (``--subset`` and ``--epochs`` are not used).
"""
from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path
from typing import Any

import common
from common import Options, figure

CHAIN = ["plain10", "plain8", "plain6", "plain4", "plain2"]
WIDTH = 0.25
SIZES = {  # n_train (before the 10 % validation split), n_test, batch, epochs per stage, sweep jobs, chain, pad
    "default": {"n": 128, "test": 128, "batch": 32, "epochs": 4, "jobs": 4, "chain": CHAIN, "pad": 4},
    "quick": {"n": 40, "test": 32, "batch": 8, "epochs": 1, "jobs": 2, "chain": ["plain6", "plain4", "plain2"],
              "pad": 2},
}
EVAL_BATCH = 256  # data.batch_size_eval: the views are built in batches of this size
TEMPERATURES = [4.0, 1.0, 2.0, 8.0]  # job 1 has the recipe's default (4)


def chain_override(chain: list[str]) -> str:
    return "pipeline.chain=[" + ",".join(f"{{arch:{a},kwargs:{{width_mult:{WIDTH}}}}}" for a in chain) + "]"


def overrides(o: Options, size: dict[str, Any], store: Path) -> list[str]:
    return ["preset=none", "data=synthetic", f"data.n_train={size['n']}", f"data.n_test={size['test']}",
            "data.num_classes=100", "data.channels=3", "data.image_size=32", "data.augment=crop_flip",
            f"data.pad={size['pad']}", f"data.batch_size={size['batch']}", f"data.batch_size_eval={EVAL_BATCH}",
            "logger=csv", "callbacks.progress=none",
            f"paths.output_dir={o.workdir / 'runs'}", f"paths.store_dir={store}",
            f"trainer.max_epochs={size['epochs']}", "pipeline=dense", "distill=dgkd"]


@contextlib.contextmanager
def timed_view_builds():
    """Seconds spent computing view caches (kdlab.pipeline.source_cache.compute_views), one entry per source."""
    from kdlab.pipeline import source_cache

    seconds: list[float] = []
    real = source_cache.compute_views

    def timed(*a, **k):
        t0 = time.perf_counter()
        try:
            return real(*a, **k)
        finally:
            seconds.append(time.perf_counter() - t0)

    source_cache.compute_views = timed
    try:
        yield seconds
    finally:
        source_cache.compute_views = real


def job(o: Options, size: dict[str, Any], store: Path, cache: str, temperature: float, name: str
        ) -> dict[str, Any]:
    """One sweep job: the whole pipeline (its finished stages reused from ``store``)."""
    ov = [*overrides(o, size, store), chain_override(size["chain"]), f"distill.cache={cache}",
          f"+pipeline.per_stage.student.distill.temperature={temperature}"]
    with timed_view_builds() as builds:
        results, rec = common.run_pipeline(ov, name, o)
    student = results["stages"][-1]
    timer = rec.train_timer()
    bank = getattr(rec.modules[-1], "bank", None) if rec.modules else None
    return {"wall_seconds": results["wall_seconds"], "trained": [s["name"] for s in results["stages"] if not s["cached"]],
            "student_stage_seconds": student["stage_seconds"], "student_fit_seconds": student["train_seconds"],
            "samples_per_second": round(timer.rate, 1) if timer and timer.rate else None,
            "build_seconds": [round(s, 2) for s in builds], "test_acc": student["test_acc"],
            "source_forward_calls": dict(bank.forward_calls) if bank is not None else {}}


def alone(o: Options, size: dict[str, Any], store: Path) -> dict[str, Any]:
    """The student (same model, epochs, data and augmentation) trained from labels only."""
    ov = [*overrides(o, size, store), "pipeline=single", chain_override(size["chain"][-1:]), "distill=none"]
    results, rec = common.run_pipeline(ov, "alone", o)
    stage = results["stages"][-1]
    common.drop_stage(o, stage["store_key"], store)
    timer = rec.train_timer()
    return {"stage_seconds": stage["stage_seconds"], "fit_seconds": stage["train_seconds"],
            "samples_per_second": round(timer.rate, 1) if timer and timer.rate else None}


def store_bytes(store: Path) -> int:
    return sum(p.stat().st_size for p in store.glob("*/cache/*.views.*.bin"))


def run(o: Options) -> dict[str, Any]:
    from kdlab.data.augment import ViewSpace
    from kdlab.store.view_cache import TopKLogits, view_cache_bytes

    size = SIZES["quick" if o.quick else "default"]
    root = o.workdir / ("views-quick" if o.quick else "views")
    shutil.rmtree(root, ignore_errors=True)  # every store starts empty: job 1 trains everything
    stores = {"live": root / "store-live", "views": root / "store-views"}
    modes = {"live": "off", "views": "views"}
    jobs: dict[str, list[dict[str, Any]]] = {"live": [], "views": []}
    for i, t in enumerate(TEMPERATURES[:size["jobs"]]):
        for side in ("live", "views"):  # interleaved: the machine's drift hits both sides alike
            jobs[side].append(job(o, size, stores[side], modes[side], t, f"views-{side}-job{i + 1}"))
    solo = [alone(o, size, root / "store-alone") for _ in range(1 if o.quick else 2)]
    views_bytes = store_bytes(stores["views"])
    shutil.rmtree(root, ignore_errors=True)

    later = {side: runs[1:] for side, runs in jobs.items()}  # jobs 2..: the student stage alone trains
    rate = {side: max(j["samples_per_second"] or 0 for j in runs) or None for side, runs in later.items()}
    rate_alone = max(s["samples_per_second"] or 0 for s in solo) or None
    stage = {side: min(j["student_stage_seconds"] for j in runs) for side, runs in later.items()}
    stage_alone = min(s["stage_seconds"] for s in solo)
    builds = jobs["views"][0]["build_seconds"]
    build = round(sum(builds), 2)
    n_train = int(size["n"] * 0.9)  # the 10 % validation split
    epoch = {side: n_train / r if r else None for side, r in rate.items()}  # steady-state seconds per epoch
    saved = epoch["live"] - epoch["views"] if epoch["live"] and epoch["views"] else None
    pipe = {side: runs[0]["wall_seconds"] for side, runs in jobs.items()}
    sweep = {side: round(sum(j["wall_seconds"] for j in runs), 1) for side, runs in jobs.items()}
    n_sources = len(size["chain"]) - 1
    space = ViewSpace(pad=size["pad"], crop=True)
    cifar_views = ViewSpace(pad=4, crop=True).count
    cifar = {"fp16": view_cache_bytes(50_000, cifar_views, {"logits": ((100,), "float16")}),
             **{f"top{k}": view_cache_bytes(50_000, cifar_views, TopKLogits(100, k).layout()) for k in (10, 20)}}

    views_vs_alone = common.ratio(rate_alone, rate["views"])
    figs = [
        figure("h_views_vs_alone", f"h. views: DGKD student step time, {n_sources} view-cached sources / student alone",
               views_vs_alone, "x", "<= 1.3", common.check(views_vs_alone, "<=", 1.3),
               f"{rate['views']} vs {rate_alone} samples/s; stage {stage['views']} s vs {stage_alone} s "
               f"({size['epochs']} epochs, {n_train} images, {space.count} views)"),
        figure("h_views_speedup", "h. views: DGKD student speed-up, view-cached sources vs live",
               common.ratio(rate["views"], rate["live"]), "x", None, None,
               f"{rate['views']} vs {rate['live']} samples/s; stage {stage['views']} s vs {stage['live']} s"),
        figure("h_build", f"h. views: one-time cost of building the views of {n_sources} sources", build, "s", None,
               None, f"per source {builds} s = {round(build / epoch['live'], 1) if epoch['live'] else None} student "
               f"epochs with live sources; {round(views_bytes / 1e6, 1)} MB on disk"),
        figure("h_breakeven", "h. views: student epochs of teaching after which the views pay",
               round(build / saved, 1) if saved and saved > 0 else None, "epochs", None, None,
               f"build {build} s / ({round(epoch['live'], 3)} - {round(epoch['views'], 3)}) s saved per epoch"
               if saved else "no saving measured"),
        figure("h_pipeline", f"h. views: whole pipeline (teacher, {n_sources - 1} TAs, student) wall time, views / live",
               common.ratio(pipe["views"], pipe["live"]), "x", None, None,
               f"{pipe['views']} s vs {pipe['live']} s, {size['epochs']} epochs per stage (the views' build included)"),
        figure("h_sweep", f"h. views: {size['jobs']}-job sweep over the student's T, wall time, views / live",
               common.ratio(sweep["views"], sweep["live"]), "x", None, None,
               f"{sweep['views']} s vs {sweep['live']} s (the sources trained and their views built once)"),
    ]
    return {"name": "views", "figures": figs,
            "details": {"jobs": jobs, "alone": solo, "sizes": {**size, "views": space.count,
                                                             "width_mult": WIDTH, "n_train_after_split": n_train},
                        "view_cache_bytes": views_bytes, "cifar100_bytes_per_source": cifar}}


if __name__ == "__main__":
    common.cli(run, __doc__.splitlines()[0])
