"""Smoke test of `make bench` (benchmarks/): every benchmark script runs at tiny size and reports its figures.

The numbers are meaningless at this size; what is checked is that each script still drives kdlab's real
code path (pipeline runner, store, cache, DistillModule) and returns well-formed figures, and that the
no-wasted-work checks hold. torchdistill itself is not installed here (benchmarks/peer/peer_env.py takes
about a minute); its config template is rendered and parsed instead.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import string
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"
FASHION = Path("/usr/share/datasets/fashion-mnist")

pytestmark = pytest.mark.skipif(not (FASHION / "train-images-idx3-ubyte.gz").exists()
                                and not (ROOT / "data" / "FashionMNIST" / "raw").is_dir(),
                                reason="needs Fashion-MNIST (Debian package dataset-fashion-mnist)")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    sys.path.insert(0, str(BENCH))
    import common

    common.quiet()
    o = common.Options.make(quick=True, workdir=tmp_path_factory.mktemp("bench"), subset=300, test_subset=100)
    yield common, o
    sys.path.remove(str(BENCH))


def _figures(result: dict) -> dict[str, dict]:
    assert not result.get("error"), result.get("error")
    figs = {f["key"]: f for f in result["figures"]}
    for f in figs.values():
        assert set(f) == {"key", "label", "value", "unit", "target", "ok", "note", "any_size"}
    return figs


def _rate_matches(rate: float, samples: int, seconds: float) -> bool:
    """samples/s agrees with samples / seconds, up to the rounding of both (seconds to 1 ms, rate to 0.1)."""
    return math.isfinite(rate) and abs(rate * seconds - samples) <= rate * 5e-4 + 0.05 * seconds + 1e-6


@pytest.mark.slow  # a long CLI run: in make test-slow (CI runs both)
def test_student_stage_benchmarks(bench):
    common, o = bench
    import bench_stages

    result = bench_stages.run(o)
    figs = _figures(result)
    assert set(figs) == {"a_overhead", "a_overhead_fit", "c_cached_vs_alone", "c_speedup", "c_cold",
                         "f_scaling_cached", "f_scaling_uncached"}
    for f in figs.values():  # each a ratio of two timings of comparable work: finite, within ~an order of 1
        assert f["value"] is not None and math.isfinite(f["value"]) and 0.05 < f["value"] < 20, f
    details = result["details"]
    runs, K, train = details["runs"], len(details["sources"]), details["train_images"]
    assert K == len(o.chain) - 1 and train == 270  # 300 images less the 10 % validation split
    best_rate = {name: max(r["samples_per_second"] for r in rs) for name, rs in runs.items()}
    assert figs["a_overhead"]["value"] == pytest.approx(best_rate[f"uncached{K}"] / best_rate["hand"], abs=1e-3)
    bs = int(common.compose(common.base_overrides(o))["data"]["batch_size"])
    for name, rs in runs.items():
        for r in rs:
            epochs = r.get("epochs", details["live_epochs"])  # the hand loop runs live_epochs
            # the timer skips each epoch's first batch; it counts every other training image once
            assert r["timed_samples"] == epochs * (train - bs), (name, r)
            assert _rate_matches(r["samples_per_second"], r["timed_samples"], r["timed_seconds"]), (name, r)
            if name == "hand":
                continue
            assert 0.15 < r["test_acc"] <= 1.0, (name, r)  # learned something in one epoch (chance is 0.1)
            assert r["fit_seconds"] <= r["stage_seconds"] + 0.01, (name, r)  # the stage contains its fit
            calls = r["source_forward_calls"]
            if name.startswith("cached"):  # the caches answer: no source runs
                assert calls and set(calls.values()) == {0}, (name, r)
            elif name.startswith("uncached"):  # every source once per training batch
                assert set(calls.values()) == {epochs * math.ceil(train / bs)}, (name, r)


def test_no_wasted_work(bench):
    _, o = bench
    import bench_hotpath

    figs = _figures(bench_hotpath.run(o))
    for key in ("h_dropped", "h_inference", "h_eval", "h_syncs"):
        assert figs[key]["ok"] is True, figs[key]


@pytest.mark.slow  # a long CLI run: in make test-slow (CI runs both)
def test_knobs(bench, monkeypatch):
    _, o = bench
    import bench_knobs

    monkeypatch.setattr(bench_knobs, "VARIANTS", {k: bench_knobs.VARIANTS[k] for k in ("32-true", "bf16-mixed")})
    result = bench_knobs.run(o)
    figs = _figures(result)
    for name in ("32-true", "bf16-mixed"):
        measured = result["details"]["variants"][name]
        assert figs[f"k_{name}"]["value"] == measured["live"]["samples_per_second"]  # the figure: live sources
        for kind in ("live", "alone"):
            r = measured[kind]
            assert "error" not in r, (name, kind, r)
            # one epoch of ~140 timed images: a rate under 10/s would be minutes, not this smoke test's seconds
            assert math.isfinite(r["samples_per_second"]) and 10 < r["samples_per_second"] < 1e7, (name, kind, r)
            assert r["fit_seconds"] <= r["stage_seconds"] + 0.01, (name, kind, r)  # the stage contains its fit
            assert 0.0 <= r["test_acc"] <= 1.0
    formats = result["details"]["inference_formats"]
    assert set(formats) == {"plain10", "resnet8"}
    for arch, r in formats.items():
        assert figs[f"k_format_{arch}"]["value"] == r["fp32"]["speedup"]
        for p in ("fp32", "bf16"):
            assert r[p]["nchw"] > 0 and r[p]["channels_last"] > 0
            assert r[p]["rel_diff"] < 1e-2, (arch, p, r[p])  # the same logits in either memory format


def test_method_cost(bench):
    """Each method's student stage is trained (not reused) and its cost is KD's rate over its own."""
    _, o = bench
    import bench_methods

    result = bench_methods.run(o)
    figs = _figures(result)
    runs = result["details"]["runs"]
    assert len(figs) == 2 and {"kd", "kd (again)"} <= set(runs)
    for key, f in figs.items():
        method = key.removeprefix("g_")
        assert f["value"] == round(result["details"]["kd_samples_per_second"] / runs[method]["samples_per_second"], 3)


def test_orchestrator_data_benchmark(bench, monkeypatch, tmp_path):
    _, o = bench
    import run as bench_run

    out = tmp_path / "bench.json"
    monkeypatch.setattr(sys, "argv", ["run.py", "--quick", "--only", "data", "--workdir", str(o.workdir),
                                      "--out", str(out)])
    with pytest.raises(SystemExit) as exit_info:
        bench_run.main()
    assert exit_info.value.code == 0
    report = json.loads(out.read_text())
    assert report["figures"][0]["key"] == "b_data"
    data = report["benches"]["data"]["details"]
    for side in ("kdlab", "torchvision"):  # each timed for at least 1 s (--quick)
        assert data[side]["seconds"] >= 1.0, data
        assert _rate_matches(data[side]["samples_per_second"], data[side]["samples"], data[side]["seconds"]), data
    ratio = data["kdlab"]["samples_per_second"] / data["torchvision"]["samples_per_second"]
    assert report["figures"][0]["value"] == pytest.approx(ratio, abs=1e-3)
    # in-memory batched augmentation against PIL in 2 workers: ~30x on a quiet 2-core machine, > 2x even loaded
    assert 2 < report["figures"][0]["value"] < 1e4, data
    assert data["batches_agree"] is True and data["images"] == 54000
    assert report["machine"]["cores"] == os.cpu_count()
    assert "b. data path" in out.with_suffix(".md").read_text()


def test_quick_judges_only_the_targets_that_hold_at_any_size(bench):
    common, _ = bench
    figs = [common.figure("r", "a timing ratio", 0.5, "x", ">= 3", False, "measured"),
            common.figure("n", "a count", 2, "calls", "== 0", False, any_size=True),
            common.figure("t", "no target", 1.0)]
    common.judge(figs, quick=True)
    assert figs[0]["ok"] is None and figs[0]["note"] == "not judged at --quick size; measured"
    assert figs[1]["ok"] is False and figs[2]["ok"] is None  # an exact count is judged at any size
    full = [common.figure("r", "a timing ratio", 0.5, "x", ">= 3", False)]
    assert common.judge(full, quick=False)[0]["ok"] is False


def test_a_subset_or_a_quick_run_never_replaces_the_full_report(bench, monkeypatch, capsys):
    import run as bench_run

    results = bench_run.HERE / "results"
    assert bench_run.default_out(quick=False, partial=False) == results / "bench.json"
    assert bench_run.default_out(quick=False, partial=True) == results / "bench-partial.json"
    assert bench_run.default_out(quick=True, partial=True) == results / "bench-quick.json"
    for argv in (["--only", "data", "--docs"], ["--skip", "gpu", "--docs"], ["--quick", "--docs"]):
        monkeypatch.setattr(sys, "argv", ["run.py", *argv])
        with pytest.raises(SystemExit) as exit_info:
            bench_run.main()
        assert exit_info.value.code == 2 and "--docs writes a full run's figures" in capsys.readouterr().err


def test_docs_get_the_headline_in_the_readme_and_every_figure_in_the_manual(bench, tmp_path):
    """``make bench ARGS=--docs``: the README (a first-day page) gets the figures with a target, the performance
    page every figure; the text around the markers stays."""
    import run as bench_run

    def fig(key, target):
        return {"key": key, "label": f"figure {key}", "value": 1.5, "unit": "x", "target": target,
                "ok": True if target else None, "note": f"note {key}"}

    report = {"machine": {"cpu": "CPU", "cores": 2, "torch": "2", "torch_threads": 2, "cuda": None},
              "loadavg": [0.1, 0.2], "command": "make bench ARGS='--docs'", "seconds": 9.0,
              "benches": {"stages": {"figures": [fig("a", ">= 0.95"), fig("a_fit", "")]},
                          "views": {"error": "RuntimeError: boom", "figures": []}}}
    pages = {tmp_path / "README.md": True, tmp_path / "performance.md": False}
    for page in pages:
        page.write_text(f"before\n{bench_run.BEGIN}\nold table\n{bench_run.END}\nafter\n")
    bench_run.write_docs(report, pages)
    readme, manual = (p.read_text() for p in pages)
    for text in (readme, manual):
        assert text.startswith("before\n") and text.endswith("after\n") and "old table" not in text
        assert "| figure a | 1.5x | >= 0.95 | yes | note a |" in text
        assert "failed | | | RuntimeError: boom" in text  # a benchmark that did not run is never hidden
    assert "figure a_fit" not in readme and "all 2 figures of this run" in readme
    assert "| figure a_fit | 1.5x |  |  | note a_fit |" in manual and "all 2 figures" not in manual


def test_memory_poller_sees_a_child_process(bench):
    import bench_memory

    m = bench_memory.measure([sys.executable, "-c", "import time; b = bytearray(300 * 2**20); time.sleep(0.6)"],
                             env=None, period=0.05)
    assert m["returncode"] == 0
    assert m["peak_process_mib"] >= 300


def test_torchdistill_config_renders(bench):
    """The peer's torchdistill YAML: every field filled, the structure torchdistill's example script reads."""
    template = (BENCH / "peer" / "kd_fashion_mnist.yaml").read_text()
    text = string.Template(template).substitute(
        index_file="/x/split.pt", root="/x/tv", teacher_ckpt="/x/t.pt", student_ckpt="/x/s.pt", epochs=3,
        num_workers=2, teacher_arch="plain10", student_arch="plain2", lr=0.01, momentum=0.9, weight_decay=1e-4,
        temperature=4.0, alpha=0.5, batch_size=128, eval_batch_size=256, mean=[0.286], std=[0.353])

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: loader.construct_mapping(node, deep=True)
                                 if isinstance(node, yaml.MappingNode) else loader.construct_scalar(node))
    cfg = yaml.load(text, Loader=Loader)
    assert set(cfg["datasets"]) == {"fashion_mnist/train", "fashion_mnist/val", "fashion_mnist/test"}
    assert cfg["models"]["teacher_model"]["key"] == "plain10" and cfg["train"]["num_epochs"] == 3
    kd = cfg["train"]["criterion"]["kwargs"]["sub_terms"]["kd"]["criterion"]
    assert kd["key"] == "KDLoss" and kd["kwargs"]["temperature"] == 4.0 and kd["kwargs"]["alpha"] == 0.5
    assert cfg["train"]["train_data_loader"]["kwargs"]["batch_size"] == 128
    assert cfg["train"]["optimizer"]["kwargs"] == {"lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4}


@pytest.mark.slow
def test_peer_benchmark_interleaves_rounds(bench):
    """Figure d end to end at tiny size, with the classic loop as the peer (the tests install no torchdistill):
    every side runs once per round, each from nothing, and the figure is kdlab's best round over the peer's."""
    _, o = bench
    import bench_peer

    result = bench_peer.run(dataclasses.replace(o, repeats=2, peer_mode="classic"))
    figs, d = _figures(result), result["details"]
    assert {"d_peer_time", "d_peer_acc"} <= set(figs)
    assert len(d["rounds"]) == 2 and d["peer"]["framework"].startswith("classic")
    for label, k in d["kdlab"].items():
        walls = [r[label]["wall_seconds"] for r in d["rounds"]]
        peer_walls = [r["peer"]["wall_seconds"] for r in d["rounds"]]
        assert k["wall_seconds"] == min(walls) and d["peer"]["wall_seconds"] == min(peer_walls)
        suffix = "" if label == "default" else "_fp32"
        assert figs[f"d_peer_time{suffix}"]["value"] == pytest.approx(min(walls) / min(peer_walls), abs=1e-3)
        assert 0 <= k["test_acc"] <= 1 and k["teacher_test_acc"] == d["rounds"][0][label]["teacher_test_acc"]


def test_views_benchmark(bench):
    """distill.cache=views (issue 19): job 1 trains every stage and builds each source's views once; the later
    sweep jobs train only the student, from the stored views (no source forward) or from live sources."""
    _, o = bench
    import bench_views

    result = bench_views.run(o)
    figs = _figures(result)
    assert set(figs) == {"h_views_vs_alone", "h_views_speedup", "h_build", "h_breakeven", "h_pipeline", "h_sweep"}
    d = result["details"]
    chain = d["sizes"]["chain"]
    views, live = d["jobs"]["views"], d["jobs"]["live"]
    assert len(views) == len(live) == d["sizes"]["jobs"]
    assert views[0]["trained"] == live[0]["trained"] and len(views[0]["trained"]) == len(chain)
    assert len(views[0]["build_seconds"]) == len(chain) - 1  # each source's views built once, in job 1
    for v, lv in zip(views[1:], live[1:]):
        assert v["trained"] == lv["trained"] == ["student"] and v["build_seconds"] == []
        assert set(v["source_forward_calls"].values()) == {0}  # looked up, never run
        assert min(lv["source_forward_calls"].values()) > 0
    rate_views = max(j["samples_per_second"] for j in views[1:])
    rate_alone = max(s["samples_per_second"] for s in d["alone"])
    assert figs["h_views_vs_alone"]["value"] == round(rate_alone / rate_views, 3)
    assert figs["h_build"]["value"] == round(sum(views[0]["build_seconds"]), 2)
    walls = [round(sum(j["wall_seconds"] for j in side), 1) for side in (views, live)]  # the sweeps' wall times
    assert figs["h_sweep"]["value"] == round(walls[0] / walls[1], 3)
    assert figs["h_pipeline"]["value"] == round(views[0]["wall_seconds"] / live[0]["wall_seconds"], 3)
    # on disk: n_train x views x (100 fp16 logits) per source
    n, v = d["sizes"]["n_train_after_split"], d["sizes"]["views"]
    assert d["view_cache_bytes"] == (len(chain) - 1) * n * v * 100 * 2
    assert d["cifar100_bytes_per_source"] == {"fp16": 50_000 * 162 * 100 * 2,
                                              "top10": 50_000 * 162 * (10 * 2 + 10 * 2 + 2),
                                              "top20": 50_000 * 162 * (20 * 2 + 20 * 2 + 2)}


@pytest.mark.slow  # a long CLI run: in make test-slow (CI runs both)
def test_dafl_cost(bench):
    """A DAFL step against a KD step on real images of the same batch: every student stage trained (not
    reused) from one shared teacher, the DAFL one data-free with as many steps per epoch as KD has batches."""
    _, o = bench
    import bench_dafl

    result = bench_dafl.run(o)
    figs = _figures(result)
    assert set(figs) == {"i_dafl_ms", "i_kd_ms", "i_dafl_cost", "i_dafl_cost_cached"}
    details = result["details"]
    batch, steps, best = details["batch"], details["steps_per_epoch"], details["best"]
    train = 270  # 300 images less the 10 % validation split
    assert batch == bench_dafl.QUICK_BATCH and steps == math.ceil(train / batch)
    runs = [r for rs in details["runs"].values() for r in rs]
    assert len(runs) == 3 and len({r["teacher_key"] for r in runs}) == 1  # one teacher, from the store after the first
    assert [r["teacher_trained_here"] for r in runs][1:] == [False, False]
    assert best["dafl"]["data_free"] and best["dafl"]["extra_params"] > 0  # the generator
    assert not best["kd (live)"]["data_free"] and not best["kd (cached)"]["data_free"]
    for r in runs:
        assert r["steps_per_epoch"] == steps and 0.0 <= r["test_acc"] <= 1.0
        assert r["ms_per_step"] == pytest.approx(1000 * batch * r["timed_seconds"] / r["timed_samples"], rel=1e-2, abs=0.01)
    # the timer skips each epoch's first step; DAFL's steps are all full batches, KD's last one is partial
    assert best["dafl"]["timed_samples"] == best["dafl"]["epochs"] * (steps - 1) * batch
    assert best["kd (live)"]["timed_samples"] == best["kd (live)"]["epochs"] * (train - batch)
    assert figs["i_dafl_ms"]["value"] == best["dafl"]["ms_per_step"] and figs["i_dafl_ms"]["unit"] == "ms"
    assert figs["i_kd_ms"]["value"] == best["kd (live)"]["ms_per_step"]
    assert figs["i_dafl_cost"]["value"] == round(best["dafl"]["ms_per_step"] / best["kd (live)"]["ms_per_step"], 3)
    assert figs["i_dafl_cost_cached"]["value"] == round(
        best["dafl"]["ms_per_step"] / best["kd (cached)"]["ms_per_step"], 3)


@pytest.mark.slow  # a long CLI run: in make test-slow (CI runs both)
def test_quant_cost(bench):
    """Quantized students (figure j): float, QAT and SPEQ stages trained (not reused) through the pipeline, the
    SPEQ / QAT ratio against its 2x target, and the implementation rows (brevitas reported even when absent)."""
    _, o = bench
    import bench_quant

    result = bench_quant.run(o)
    figs = _figures(result)
    impls = ("kdlab", "torchao", "brevitas")
    assert set(figs) == {"j_float_ms", "j_qat_ms", "j_quant_cost", "j_speq_ms", "j_speq_cost", "j_crosscheck_ao",
                         *(f"j_cmp_{i}" for i in impls), *(f"j_cmp_{i}_switch" for i in impls)}
    d = result["details"]
    best, batch = d["best"], d["batch"]
    assert batch == bench_quant.QUICK_BATCH
    for r in best.values():
        assert r["ms_per_step"] == pytest.approx(1000 * batch * r["timed_seconds"] / r["timed_samples"],
                                                 rel=1e-2, abs=0.01)
        assert 0.0 <= r["test_acc"] <= 1.0
    assert (best["float"]["weight_bits"], best["float"]["act_bits"]) == (32, 32)
    for side in ("qat", "speq"):
        assert (best[side]["weight_bits"], best[side]["act_bits"]) == (2, 4), side
    assert best["speq"]["module"] == "SelfDistillModule" and best["qat"]["module"] != "SelfDistillModule"
    assert set(best["speq"]["teacher_bits"]) <= set(bench_quant.SPEQ_BITS)
    assert figs["j_quant_cost"]["value"] == round(best["qat"]["ms_per_step"] / best["float"]["ms_per_step"], 3)
    speq = figs["j_speq_cost"]
    assert speq["value"] == round(best["speq"]["ms_per_step"] / best["qat"]["ms_per_step"], 3)
    assert speq["target"] == "<= 2" and speq["ok"] is (speq["value"] <= 2)
    micro = d["micro"]["results"]
    for name in ("kdlab", "torch.ao"):  # always there; brevitas only where importable
        r = micro[name]
        key = name.replace(".", "")
        assert figs[f"j_cmp_{key}"]["value"] == r["train"] > 0
        assert figs[f"j_cmp_{key}_switch"]["value"] == r["speq"] > 0
        assert r["switch_works"]["ok"] is True, (name, r)  # 4-bit inputs become 8-bit and back
    assert micro["kdlab"]["ternary"]["ternary"] is True
    if "brevitas" in micro:
        assert figs["j_cmp_brevitas"]["value"] == micro["brevitas"]["train"]
    else:
        assert figs["j_cmp_brevitas"]["value"] is None and "not installed" in figs["j_cmp_brevitas"]["note"]
    cc = figs["j_crosscheck_ao"]
    assert cc["value"] == 0.0 and cc["ok"] is True  # the same 4-bit grid gives the same outputs


def test_imagefolder_loader_benchmark(bench):
    """(k) kdlab's on-disk training loader against torchvision's reference train.py loader on generated JPEGs."""
    _, o = bench
    import bench_imagefolder

    result = bench_imagefolder.run(o)
    figs = _figures(result)
    assert set(figs) == {"k_imagefolder"}
    d = result["details"]
    assert d["batches_agree"] is True  # same shapes, dtype and value range
    for side in ("kdlab", "reference"):
        for r in d["runs"][side]:
            assert r["samples"] == d["timed_batches"] * d["batch_size"], r
            assert _rate_matches(r["samples_per_second"], r["samples"], r["seconds"]), r
    best = {side: max(r["samples_per_second"] for r in d["runs"][side]) for side in d["runs"]}
    assert figs["k_imagefolder"]["value"] == pytest.approx(best["kdlab"] / best["reference"], abs=1e-3)
    assert 0.05 < figs["k_imagefolder"]["value"] < 20  # a ratio of comparable work (tiny sizes: no target)


@pytest.mark.slow
def test_gpu_bench_dry_run_measures_both_kd_steps(bench):
    """bench_gpu's code path on the CPU at tiny sizes (--gpu-dry-run): the CIFAR-100-shaped step and the
    ImageNet-shaped torchvision ResNet-34 -> ResNet-18 step, each in fp32 and bf16-mixed."""
    _, o = bench
    import bench_gpu

    bench_gpu.DRY_RUN = True
    try:
        result = bench_gpu.run(o)
    finally:
        bench_gpu.DRY_RUN = False
    figs = _figures(result)
    assert set(figs) == {"g_32-true", "g_bf16-mixed", "g_imagenet_32-true", "g_imagenet_bf16-mixed"}
    for f in figs.values():
        assert f["value"] is not None and f["value"] > 0 and f["unit"] == "images/s", f
    macs = result["details"]["imagenet"]["macs"]
    assert macs["torchvision/resnet34"] > macs["torchvision/resnet18"] > 0


@pytest.mark.slow  # three CLI sweeps (~1-3 min): make test-slow
def test_sweeps_benchmark(bench):
    """(l) The same sweep sequentially, in parallel as before (every job all cores, no plan) and as kdlab sizes it
    (cores / jobs threads, the shared teacher first): the figures are the runs' own records."""
    _, o = bench
    import bench_sweeps

    result = bench_sweeps.run(o)
    figs = _figures(result)
    assert set(figs) == {"l_before", "l_after", "l_threads", "l_lock_wait", "l_plan"}
    d = result["details"]
    runs = {way: rs[0] for way, rs in d["runs"].items()}
    cores, jobs = d["cores"], runs["after"]["jobs"]
    assert jobs == 2 and all(r["jobs"] == jobs for r in runs.values())
    assert runs["sequential"]["threads"] == [cores] * jobs  # one process, torch's default
    assert runs["before"]["threads"] == [cores] * jobs  # OMP_NUM_THREADS = cores: the user's, kept
    parallel = runs["after"]["parallel"]
    assert parallel == min(cores, jobs, 8) and runs["after"]["threads"] == [max(1, cores // parallel)] * jobs
    assert figs["l_threads"]["value"] == max(1, cores // parallel) and figs["l_threads"]["ok"] is True
    # the teacher first, once; the jobs train only their students and never wait (one core: one at a time)
    assert [name for name, _ in runs["after"]["shared"]] == (["teacher"] if parallel > 1 else [])
    assert runs["after"]["trained_by_jobs"] == (jobs if parallel > 1 else jobs + 1)
    assert runs["after"]["lock_wait_seconds"] == 0.0
    assert figs["l_lock_wait"]["value"] == 0.0 and figs["l_lock_wait"]["ok"] is True
    assert runs["sequential"]["trained_by_jobs"] == runs["before"]["trained_by_jobs"] == jobs + 1
    assert all(r["distinct_stages"] == jobs + 1 for r in runs.values())
    assert figs["l_after"]["value"] == round(runs["after"]["wall_seconds"] / runs["sequential"]["wall_seconds"], 3)
    assert figs["l_before"]["value"] == round(runs["before"]["wall_seconds"] / runs["sequential"]["wall_seconds"], 3)
    assert figs["l_plan"]["value"] == round(runs["after"]["wall_seconds"] / runs["after"]["stage_seconds_sum"], 3)
    assert all(0.1 < f["value"] < 20 for k, f in figs.items() if k in ("l_before", "l_after", "l_plan"))
