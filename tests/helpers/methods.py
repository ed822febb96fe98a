"""Helpers shared by the method tests (tests/distill/test_*.py): the composed config of a method, with some
options of its block changed; tensors as float64 numpy arrays; naive cross-entropy and convolution; the
weighted total of a strategy's loss terms; a batch that no source teaches; the check of a block option
that must be rejected; which strategies learn from sources; the lists of methods that the docs
(docs/methods/hooks.py) and the benchmark (benchmarks/bench_methods.py) make."""
from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from kdlab.errors import ConfigError
from tests.helpers.config import compose_config

ROOT = Path(__file__).resolve().parents[2]


def learns_from_sources(cls) -> bool:
    """A strategy that teaches a stage from its sources on any topology: not labels only (``ce``), not data-free
    (DAFL: ``pipeline=data_free``), not self-distilling (SPEQ: a stage without sources)."""
    return bool(cls.uses_sources) and not cls.data_free and not getattr(cls, "self_distill", False)


def labels_only(cls) -> bool:
    """The cross-entropy with the labels (``ce``, ``distill=none``): no sources, no page of its own."""
    return not cls.uses_sources and not getattr(cls, "self_distill", False)


def docs_hooks(root: Path = ROOT) -> ModuleType:
    """``docs/methods/hooks.py`` (the MkDocs hooks that list the methods), loaded from ``root``."""
    spec = importlib.util.spec_from_file_location("kdlab_docs_hooks", root / "docs" / "methods" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_methods(root: Path = ROOT) -> ModuleType:
    """``benchmarks/bench_methods.py`` (it imports its sibling ``common``)."""
    bench = str(root / "benchmarks")
    sys.path.insert(0, bench)
    try:
        return importlib.import_module("bench_methods")
    finally:
        sys.path.remove(bench)


@functools.cache
def composed_distill(name: str) -> dict:
    """The composed ``distill`` node of ``distill=<name>`` (cached: do not change it, copy it: :func:`cfg_of`)."""
    return compose_config(f"distill={name}")["distill"]


def cfg_of(name: str, **block) -> dict:
    """The composed ``distill`` node of ``distill=<name>``, with some options of the method's block changed."""
    cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in composed_distill(name).items()}
    cfg[name] = {**cfg[name], **block}
    return cfg


def n(x) -> np.ndarray:
    return x.detach().double().cpu().numpy()


def hand_ce(logits, y) -> float:
    z = n(logits)
    return float(np.mean([np.log(np.exp(row).sum()) - row[c] for row, c in zip(z, y.tolist())]))


def hand_conv(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Same-padded stride-1 convolution without bias, by loops over the kernel offsets."""
    b, c, h, w = x.shape
    o, _, k, _ = weight.shape
    pad = k // 2
    xp = np.zeros((b, c, h + 2 * pad, w + 2 * pad))
    xp[:, :, pad:pad + h, pad:pad + w] = x
    out = np.zeros((b, o, h, w))
    for dy in range(k):
        for dx in range(k):
            out += np.einsum("oc,bchw->bohw", weight[:, :, dy, dx], xp[:, :, dy:dy + h, dx:dx + w])
    return out


def total(terms, weights):
    return sum(weights[k] * terms[k] for k in terms)


def assert_rejects(cls, block: dict, message: str) -> None:
    """``cls.check`` of the composed config of ``distill=<cls.name>``, ``block`` updating the method's block,
    raises a ConfigError matching ``message``."""
    cfg = cfg_of(cls.name)
    cfg[cls.name].update(block)
    with pytest.raises(ConfigError, match=message):
        cls.check(cfg)


def assert_untaught_is_zero(strat, student, y, term: str, progress: float):
    """A batch that no source teaches: ``term`` is exactly 0 and the total is finite and reaches the student's
    logits; returns ``(terms, weights)``."""
    terms, weights = strat.loss_terms(student, {}, y, progress)
    assert terms[term].item() == 0.0
    loss = total(terms, weights)
    assert torch.isfinite(loss)
    loss.backward()
    assert student.logits.grad is not None
    return terms, weights
