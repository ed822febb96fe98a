"""Smoke test of `make bench` (benchmarks/): every benchmark script runs at tiny size and reports its figures.

The numbers are meaningless at this size; what is checked is that each script still drives kdlab's real
code path (pipeline runner, store, cache, DistillModule) and returns well-formed figures, and that the
no-wasted-work checks hold. torchdistill itself is not installed here (benchmarks/peer/peer_env.py takes
about a minute); its config template is rendered and parsed instead.
"""
from __future__ import annotations

import json
import string
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
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
        assert set(f) == {"key", "label", "value", "unit", "target", "ok", "note"}
    return figs


def test_student_stage_benchmarks(bench):
    _, o = bench
    import bench_stages

    figs = _figures(bench_stages.run(o))
    assert set(figs) == {"a_overhead", "a_overhead_fit", "c_cached_vs_alone", "c_speedup", "c_cold",
                         "f_scaling_cached", "f_scaling_uncached"}
    assert all(f["value"] is not None and f["value"] > 0 for f in figs.values())


def test_no_wasted_work(bench):
    _, o = bench
    import bench_hotpath

    figs = _figures(bench_hotpath.run(o))
    for key in ("h_dropped", "h_inference", "h_eval", "h_syncs"):
        assert figs[key]["ok"] is True, figs[key]


def test_knobs(bench, monkeypatch):
    _, o = bench
    import bench_knobs

    monkeypatch.setattr(bench_knobs, "VARIANTS", {k: bench_knobs.VARIANTS[k] for k in ("32-true", "bf16-mixed")})
    figs = _figures(bench_knobs.run(o))
    assert figs["k_32-true"]["value"] > 0 and figs["k_bf16-mixed"]["value"] > 0


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
    assert report["figures"][0]["key"] == "b_data" and report["figures"][0]["value"] > 0
    assert report["machine"]["cores"] >= 1
    assert "b. data path" in out.with_suffix(".md").read_text()


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
