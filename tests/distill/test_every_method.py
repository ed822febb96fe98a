"""The method library end to end: every strategy of the library runs from config under dense guidance (the
topology with the most sources), with its terms logged, its trainable parts reported and dropped at export;
and the library's shape (one file, one YAML, one docs page per method) is checked, so an eleventh method
needs one .py file, one YAML and one test."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from kdlab.distill import STRATEGIES
from kdlab.pipeline.runner import run_pipeline
from tests.helpers.config import compose_config, compose_dictconfig

ROOT = Path(__file__).resolve().parents[2]
#: each library method -> the loss terms it logs besides ``ce``
METHODS = {"dkd": ["tckd", "nckd"], "dist": ["inter", "intra"], "fitnet": ["fitnet"], "at": ["at"], "sp": ["sp"],
           "pkt": ["pkt"], "rkd": ["rkd_dist", "rkd_angle"], "crd": ["crd"], "reviewkd": ["reviewkd"]}
TRAINABLE = {"fitnet", "crd", "reviewkd"}  # regressors / embeddings / fusion: extra_params > 0
TINY = ["preset=none", "data=synthetic", "data.n_train=192", "data.n_test=64", "data.batch_size=64",
        "logger=csv", "callbacks.progress=none", "trainer.max_epochs=1", "optimizer.lr=0.01"]
DENSE = ["pipeline=dense", "pipeline.chain=[plain6,plain4,plain2]"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("library-store")  # the teacher (labels only) is trained once for all


def header(path: str) -> list[str]:
    with open(path) as f:
        return next(csv.reader(f))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_under_dense_guidance(method, store, tmp_path):
    cfg = compose_dictconfig(*TINY, *DENSE, f"distill={method}", f"paths.store_dir={store}")
    results = run_pipeline(cfg, tmp_path / "run")
    assert results["status"] == "completed"
    _, ta, student = results["stages"]
    assert student["sources"] == ["teacher", "ta1"] and ta["sources"] == ["teacher"]
    for stage in (ta, student):  # both distilled stages use the method, with every term logged
        cols = header(stage["csv_log"])
        for term in ["ce", *METHODS[method]]:
            assert f"train/loss_{term}" in cols, (method, term, cols)
    assert (student["extra_params"] > 0) == (method in TRAINABLE)
    # the exported student is the bare architecture: the method's parts are not in model.pt
    state = torch.load(student["checkpoint"], weights_only=True)
    assert not any(k.startswith("strategy.") for k in state)
    assert sum(v.numel() for k, v in state.items() if "num_batches_tracked" not in k and "running" not in k) \
        == student["params"]


def test_feature_method_with_cache_and_stochastic_teaching(store, tmp_path):
    """A feature method reads its taps from the source-output cache, and drops sources like DGKD does."""
    cfg = compose_dictconfig(*TINY, *DENSE, "distill=at", "distill.cache=on", "distill.stochastic.mode=drop_k",
                             "distill.stochastic.k=1", f"paths.store_dir={store}")
    results = run_pipeline(cfg, tmp_path / "run")
    assert results["status"] == "completed"
    student = results["stages"][-1]
    with open(student["csv_log"]) as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/sources_kept")]
    assert rows and all(float(r["train/sources_kept"]) == 1.0 for r in rows)  # 2 sources, k=1 dropped


def test_every_strategy_has_its_yaml_docs_and_test():
    tests = "\n".join(p.read_text() for p in (ROOT / "tests").rglob("test_*.py"))
    for name in STRATEGIES.names():
        if name == "ce":  # labels only: every stage without sources (distill=none)
            continue
        yaml = ROOT / "conf" / "distill" / f"{name}.yaml"
        assert yaml.is_file(), name
        assert compose_config(f"distill={name}")["distill"]["strategy"] == name
        assert (ROOT / "docs" / "methods" / f"{name}.md").is_file(), name
        assert f'"{name}"' in tests or f"distill={name}" in tests, f"no test names strategy {name!r}"
    assert set(METHODS) <= set(STRATEGIES.names())
    assert len(set(STRATEGIES.names()) - {"ce", "kd", "dgkd", "feed"}) >= 9


@pytest.mark.parametrize("method,pipeline", [
    ("at", ["pipeline=feed_parallel", "pipeline.ensemble=2", "pipeline.chain=[plain4,plain2]"]),  # an ensemble
    ("crd", ["pipeline=pacemaker", "pipeline.teacher_model.arch=resnet8", "pipeline.pacemaker=nxn",
             "pipeline.pacemakers.nxn.arch=resnet8", "pipeline.student_model.arch=resnet8"]),  # 1xN student
    ("dkd", ["pipeline=sequential", "pipeline.chain=[plain6,plain4,plain2]"]),  # a TA chain
])
def test_method_under_other_topologies(method, pipeline, tmp_path):
    cfg = compose_dictconfig(*TINY, f"distill={method}", *pipeline, f"paths.store_dir={tmp_path / 'store'}")
    results = run_pipeline(cfg, tmp_path / "run")
    assert results["status"] == "completed"
    student = results["stages"][-1]
    assert len(student["sources"]) == (1 if pipeline[0] == "pipeline=sequential" else 2)
    cols = header(student["csv_log"])
    assert all(f"train/loss_{t}" in cols for t in METHODS[method])
