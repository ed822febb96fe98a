"""Adding a method is four files: its strategy (``kdlab/distill/<name>.py``), its YAML (``conf/distill/<name>.yaml``),
its test and its docs page (``docs/methods/<name>.md``).

The proof: the package, the config tree, the tests, the benchmark and the docs' method pages and hooks are copied
into a temporary tree, a throw-away strategy ``toy`` is added there as those four files and nothing else, and in
that tree everything that lists methods picks it up: the registry, ``distill=toy`` (composed and checked, its
keys its own), the docs' navigation, table of strategies and API reference, the benchmark's list and the tests'
lists (tests/distill/test_every_method.py runs it under dense guidance and checks its four files). Without its
docs page, the suite says so.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.cli import ROOT, kdlab_env

COPY = ["kdlab", "conf", "tests", "benchmarks", "docs/methods", "docs/reference", "mkdocs.yml", "pyproject.toml"]

TOY = {
    "kdlab/distill/toy.py": '''"""TOY: a throw-away method -- the softened predictions matched by their squared distance.

    L = CE + weight * T^2 * combine_k mean_c (softmax(z_s / T) - softmax(z_k / T))^2
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch.nn.functional as F

from kdlab.distill.base import STRATEGIES, BlockStrategy, check_number, combined_terms


@STRATEGIES.register("toy")
class Toy(BlockStrategy):
    name = "toy"
    options: ClassVar[dict[str, Any]] = {"label_smoothing": 0.0,
                                         "toy": {"weight": 1.0, "temperature": 2.0, "combine": "mean"}}
    hints: ClassVar[dict[str, str]] = {"lam": "toy.weight"}

    @classmethod
    def check_options(cls, block, where) -> None:
        check_number(f"{where}.weight", block["weight"], low=0)
        check_number(f"{where}.temperature", block["temperature"], low=0, low_open=True)

    def loss_terms(self, student, sources, y, progress):
        t = float(self.opts["temperature"])
        ce = self.ce_loss(student.logits, y)
        per_source = ({"toy": t * t * F.mse_loss(F.softmax(student.logits / t, 1), F.softmax(out.logits / t, 1))}
                      for out in sources.values())
        return combined_terms(ce, per_source, ["toy"], self.combine), {"ce": 1.0, "toy": float(self.opts["weight"])}
''',
    "conf/distill/toy.yaml": '''# TOY: L = CE + weight * T^2 * mean_c (softmax(z_s / T) - softmax(z_t / T))^2 (kdlab/distill/toy.py).
defaults:
  - /distill_base@_here_
  - _self_
strategy: toy
toy:
  weight: 1.0        # weight of the toy term, >= 0
  temperature: 2.0   # T, > 0
  combine: mean      # mean | sum over the sources teaching the batch
''',
    "tests/distill/test_toy.py": '''import numpy as np
import torch

from kdlab.distill import STRATEGIES
from kdlab.distill.base import SourceOutput, StrategyContext, StudentOutput
from tests.helpers.methods import cfg_of


def test_toy_loss_by_hand():
    strategy = STRATEGIES.get("toy")(cfg_of("toy"), StrategyContext("s", ["t"], 3))
    zs, zt = torch.tensor([[1.0, 2.0, 0.0]]), torch.tensor([[0.0, 1.0, 3.0]])
    terms, weights = strategy.loss_terms(StudentOutput(zs), {"t": SourceOutput(zt)}, torch.tensor([1]), 0.5)

    def p(z):
        e = np.exp(z.numpy()[0] / 2.0)
        return e / e.sum()

    assert abs(terms["toy"].item() - 4.0 * np.mean((p(zs) - p(zt)) ** 2)) < 1e-6
    assert weights == {"ce": 1.0, "toy": 1.0}
''',
    "docs/methods/toy.md": '''# TOY: a throw-away method

`distill=toy` (`kdlab/distill/toy.py`, `conf/distill/toy.yaml`): `L = CE + weight * T^2 * mean_c (p_s - p_t)^2`,
`p = softmax(z / T)`. Its options: `distill.toy.weight` (1.0), `distill.toy.temperature` (2.0),
`distill.toy.combine` (`mean`).
''',
}

CHECK = r'''
import sys
from omegaconf import OmegaConf
from kdlab.distill import STRATEGIES
from kdlab.errors import ConfigError
from kdlab.pipeline.checks import validate_config
from tests.helpers.config import compose_config
from tests.helpers.methods import bench_methods, docs_hooks

assert "toy" in STRATEGIES.names(), STRATEGIES.names()
cfg = compose_config("distill=toy", "distill.toy.weight=0.5")
assert cfg["distill"]["toy"] == {"weight": 0.5, "temperature": 2.0, "combine": "mean"}
validate_config(cfg)
for key, meant in (("temperature", "distill.toy.temperature"), ("lam", "distill.toy.weight")):
    try:
        validate_config(compose_config("distill=toy", f"+distill.{key}=2"))
        sys.exit(f"distill.{key} was accepted by toy")
    except ConfigError as e:
        assert str(e) == f"distill.{key} is not read by toy; did you mean {meant}?", e
hooks = docs_hooks()
assert "methods/toy.md" in hooks.methods_nav()
assert "| `toy` | `distill=toy` | TOY: a throw-away method" in hooks.strategies_table()
assert "::: kdlab.distill.toy" in hooks.modules_reference()
assert bench_methods().methods()["toy"] == ["distill=toy"]
assert "toy" in OmegaConf.load("conf/distill/toy.yaml").strategy
print("every list picks up toy")
'''


def run(tree: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=tree, env=kdlab_env(), capture_output=True, text=True,
                          timeout=900, check=False)


@pytest.mark.slow
def test_a_new_method_is_four_files(tmp_path):
    tree = tmp_path / "kdlab"
    for part in COPY:
        src, dst = ROOT / part, tree / part
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "results"))
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    before = {p.relative_to(tree) for p in tree.rglob("*") if p.is_file()}
    for path, text in TOY.items():
        (tree / path).write_text(text)
    assert {p.relative_to(tree) for p in tree.rglob("*") if p.is_file()} - before == {Path(p) for p in TOY}

    r = run(tree, "-c", CHECK)  # the copy's kdlab: the tree comes first on sys.path
    assert r.returncode == 0 and "every list picks up toy" in r.stdout, r.stdout[-3000:] + r.stderr[-5000:]

    # the tests' lists: the shape checks of every method, toy's end-to-end run, its key checks and its own test
    tests = ["tests/distill/test_every_method.py", "tests/distill/test_keys.py", "tests/distill/test_toy.py"]
    r = run(tree, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rA", "-m", "not slow", "-k",
            "toy or registry or library", *tests)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    every_method, keys, toy = tests
    for test in (f"{every_method}::test_one_file[toy]", f"{every_method}::test_one_yaml[toy]",
                 f"{every_method}::test_one_test[toy]", f"{every_method}::test_one_docs_page_listed_everywhere[toy]",
                 f"{every_method}::test_the_benchmark_measures_it[toy]",
                 f"{every_method}::test_method_under_dense_guidance[toy]",
                 f"{every_method}::test_the_registry_is_every_registration_in_the_package",
                 f"{keys}::test_its_own_keys_are_accepted[toy]",
                 f"{keys}::test_another_methods_key_is_rejected_naming_the_key_meant[toy]",
                 f"{toy}::test_toy_loss_by_hand"):
        assert f"PASSED {test}" in r.stdout, (test, r.stdout[-6000:])

    # one of the four forgotten: the suite names it
    (tree / "docs" / "methods" / "toy.md").unlink()
    r = run(tree, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-k", "toy", tests[0])
    assert r.returncode == 1 and "add docs/methods/toy.md" in r.stdout, r.stdout[-6000:]
