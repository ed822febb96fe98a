"""The method library end to end, and its shape.

End to end: every registered strategy that learns from sources runs from config under dense guidance (the
topology with the most sources), with every loss term it returns logged and its trainable parts reported and
dropped at export.

The shape: a method is one file (``kdlab/distill/<name>.py``), one YAML (``conf/distill/<name>.yaml``), one test
and one docs page (``docs/methods/<name>.md``). Everything else that lists methods is made from those: the
registry by importing every module of ``kdlab.distill``, the docs' navigation, table of strategies and API
reference by ``docs/methods/hooks.py``, the benchmark's list by ``benchmarks/bench_methods.methods``, and the
lists of this file from the registry. Each is checked here per strategy, so a method missing one of its four
files fails naming it (tests/distill/test_new_method.py adds a throw-away method to a copy of the tree).
"""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from kdlab.distill import STRATEGIES
from kdlab.pipeline.runner import run_pipeline
from tests.helpers.config import compose_config, compose_dictconfig
from tests.helpers.methods import bench_methods, docs_hooks, labels_only, learns_from_sources

ROOT = Path(__file__).resolve().parents[2]
#: every strategy that teaches a stage from its sources on any topology (not ce, DAFL, SPEQ)
FROM_SOURCES = [name for name in STRATEGIES.names() if learns_from_sources(STRATEGIES.get(name))]
TINY = ["preset=none", "data=synthetic", "data.n_train=192", "data.n_test=64", "data.batch_size=64",
        "logger=csv", "callbacks.progress=none", "trainer.max_epochs=1", "optimizer.lr=0.01"]
DENSE = ["pipeline=dense", "pipeline.chain=[plain6,plain4,plain2]"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("library-store")  # the teacher (labels only) is trained once for all


def header(path: str) -> list[str]:
    with open(path) as f:
        return next(csv.reader(f))


def test_the_library_is_every_strategy_that_learns_from_sources():
    assert len(FROM_SOURCES) >= 12 and {"kd", "dgkd", "feed", "dkd", "crd", "reviewkd"} <= set(FROM_SOURCES)
    assert not {"ce", "dafl", "speq"} & set(FROM_SOURCES)


@pytest.mark.parametrize("method", FROM_SOURCES)
def test_method_under_dense_guidance(method, store, tmp_path, monkeypatch):
    cls = STRATEGIES.get(method)
    returned: dict[str, set[str]] = {}  # stage -> the loss terms the strategy returned
    extra: dict[str, int] = {}  # stage -> the strategy's trainable parameters
    loss_terms = cls.loss_terms

    def spy(self, *args, **kwargs):
        terms, weights = loss_terms(self, *args, **kwargs)
        returned.setdefault(self.ctx.stage, set()).update(terms)
        extra[self.ctx.stage] = self.extra_parameters()
        return terms, weights

    monkeypatch.setattr(cls, "loss_terms", spy)
    cfg = compose_dictconfig(*TINY, *DENSE, f"distill={method}", f"paths.store_dir={store}")
    results = run_pipeline(cfg, tmp_path / "run")
    assert results["status"] == "completed"
    _, ta, student = results["stages"]
    assert student["sources"] == ["teacher", "ta1"] and ta["sources"] == ["teacher"]
    assert set(returned) == {"ta1", "student"}  # both distilled stages use the method ...
    for stage in (ta, student):  # ... with every term logged, the labels' and at least one of the sources'
        terms = returned[stage["name"]]
        assert "ce" in terms and len(terms) >= 2, terms
        cols = header(stage["csv_log"])
        for term in terms:
            assert f"train/loss_{term}" in cols, (method, term, cols)
    assert student["extra_params"] == extra["student"]  # its trainable parts, reported ...
    # ... and not exported: model.pt is the bare architecture
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


# -- the shape: one file, one YAML, one test, one docs page per method ---------------------------------------
def test_the_registry_is_every_registration_in_the_package():
    """Importing kdlab.distill (every module of the package) registers exactly what its files register."""
    assert STRATEGIES.names() == sorted(docs_hooks().strategies())


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_one_file(name):
    cls = STRATEGIES.get(name)
    assert cls.__module__ == f"kdlab.distill.{name}" and cls.name == name, \
        f"strategy {name!r} must live in kdlab/distill/{name}.py with name = {name!r}"


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_one_yaml(name):
    """``conf/distill/<name>.yaml`` (``ce``: ``none.yaml``) chooses the strategy and holds exactly the keys it
    reads, with its defaults."""
    cls = STRATEGIES.get(name)
    choice = docs_hooks().choices().get(name)
    assert choice == ("none" if labels_only(cls) else name), f"add conf/distill/{name}.yaml with strategy: {name}"
    composed = compose_config(f"distill={choice}")["distill"]
    assert composed["strategy"] == name
    assert sorted(composed) == sorted(cls.accepted_keys()), \
        f"conf/distill/{choice}.yaml must hold the keys {name} reads (options, late_options) and the shared ones"
    assert cls.own_config(composed) == cls.own_config({"strategy": name}), "the YAML's defaults are the class's"


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_one_test(name):
    tests = "\n".join(p.read_text() for p in (ROOT / "tests").rglob("test_*.py"))
    assert f'"{name}"' in tests or f"distill={name}" in tests, f"no test names strategy {name!r}"


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_one_docs_page_listed_everywhere(name):
    """Its page exists (``ce`` has none: the methods page describes it), and the docs' navigation, table of
    strategies and API reference (made by docs/methods/hooks.py when the site is built) list it."""
    hooks = docs_hooks()
    page = ROOT / "docs" / "methods" / f"{name}.md"
    if labels_only(STRATEGIES.get(name)):
        assert not page.exists()
    else:
        assert page.is_file(), f"add docs/methods/{name}.md (its formula, paper and keys)"
        assert f"methods/{name}.md" in hooks.methods_nav()
    rows = [r for r in hooks.strategies_table().splitlines() if r.startswith(f"| `{name}` |")]
    assert len(rows) == 1 and page.is_file() == (f"]({name}.md)" in rows[0]), rows
    assert f"::: kdlab.distill.{name}" in hooks.modules_reference()


@pytest.mark.parametrize("name", FROM_SOURCES)
def test_the_benchmark_measures_it(name):
    assert bench_methods().methods()[name][0] == f"distill={name}"


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
    terms = {"at": ["at"], "crd": ["crd"], "dkd": ["tckd", "nckd"]}[method]
    assert all(f"train/loss_{t}" in cols for t in terms)
