"""Loss values against hand computation, lambda schedules, stochastic teaching."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdlab.distill import STRATEGIES, SourceSelector, build_schedule, kd_loss
from kdlab.distill.base import SourceOutput, StrategyContext, StudentOutput, build_strategy
from kdlab.errors import ConfigError


def hand_kl(zs, zt, T):
    """KL(p_t || p_s) per sample, by the definition."""
    out = []
    for s_row, t_row in zip(zs.tolist(), zt.tolist()):
        es = [math.exp(v / T) for v in s_row]
        et = [math.exp(v / T) for v in t_row]
        ps = [v / sum(es) for v in es]
        pt = [v / sum(et) for v in et]
        out.append(sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt, ps)))
    return out


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randn(4, 5, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("T", [1.0, 2.0, 5.0])
def test_kd_loss_batchmean_is_T2_times_mean_kl(logits, T):
    zs, zt = logits
    expected = T * T * sum(hand_kl(zs, zt, T)) / 4
    assert kd_loss(zs, zt, T, "batchmean").item() == pytest.approx(expected, rel=1e-5)


def test_kd_loss_mean_legacy_divides_by_classes(logits):
    zs, zt = logits
    T = 4.0
    expected = T * T * sum(hand_kl(zs, zt, T)) / (4 * 5)
    assert kd_loss(zs, zt, T, "mean_legacy").item() == pytest.approx(expected, rel=1e-5)
    assert kd_loss(zs, zt, T, "batchmean").item() == pytest.approx(5 * expected, rel=1e-5)


def test_kd_loss_unknown_reduction():
    with pytest.raises(ConfigError, match="batchmean, mean_legacy"):
        kd_loss(torch.zeros(1, 2), torch.zeros(1, 2), 1.0, "sum")


def _terms(cfg, n_sources, zs, zt_list, y):
    names = [f"s{i}" for i in range(n_sources)]
    strat = build_strategy(cfg, StrategyContext("student", names, zs.shape[1]))
    terms, weights = strat.loss_terms(StudentOutput(zs), {n: SourceOutput(z) for n, z in zip(names, zt_list)},
                                      y, 0.0)
    return sum(weights[k] * terms[k] for k in terms), terms, weights


def test_hinton_kd_total(logits):
    zs, zt = logits
    y = torch.tensor([0, 1, 2, 3])
    lam, T = 0.3, 2.0
    total, _, _ = _terms({"strategy": "kd", "temperature": T, "lam": lam}, 1, zs, [zt], y)
    expected = (1 - lam) * F.cross_entropy(zs, y).item() + lam * T * T * sum(hand_kl(zs, zt, T)) / 4
    assert total.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("ce_weight,factor", [("paper", 3.0), ("code", 1.0)])
def test_dgkd_sums_kd_terms_and_weights_ce(logits, ce_weight, factor):
    zs, zt = logits
    zt2, zt3 = zt.flip(0), zt * 0.5
    y = torch.tensor([4, 3, 2, 1])
    lam, T = 0.6, 3.0
    total, terms, weights = _terms({"strategy": "dgkd", "temperature": T, "lam": lam, "ce_weight": ce_weight},
                                   3, zs, [zt, zt2, zt3], y)
    kd_sum = sum(T * T * sum(hand_kl(zs, z, T)) / 4 for z in (zt, zt2, zt3))
    assert terms["kd"].item() == pytest.approx(kd_sum, rel=1e-5)
    assert weights["ce"] == pytest.approx(factor * (1 - lam))
    expected = factor * (1 - lam) * F.cross_entropy(zs, y).item() + lam * kd_sum
    assert total.item() == pytest.approx(expected, rel=1e-5)


def test_strategy_rejects_bad_values():
    ctx = StrategyContext("s", ["t"], 10)
    with pytest.raises(ConfigError, match="temperature"):
        build_strategy({"strategy": "kd", "temperature": 0}, ctx)
    with pytest.raises(ConfigError, match=r"lam.*\[0, 1\]"):
        build_strategy({"strategy": "kd", "lam": 1.5}, ctx)
    with pytest.raises(ConfigError) as unknown:
        build_strategy({"strategy": "nope"}, ctx)
    # every registered strategy is listed, in order, and nothing else (a name that is another's prefix counts)
    assert str(unknown.value) == f"unknown distill strategy 'nope'; known: {', '.join(sorted(STRATEGIES.names()))}"
    assert len(STRATEGIES.names()) >= 15 and {"ce", "kd", "sp", "speq"} <= set(STRATEGIES.names())
    with pytest.raises(ConfigError, match="code, paper|paper, code"):
        build_strategy({"strategy": "dgkd", "ce_weight": "both"}, ctx)


def test_lambda_schedules():
    assert build_schedule("constant", 0.7)(0.9) == 0.7
    lin = build_schedule("linear", 1.0, 0.0)
    assert [lin(t) for t in (0.0, 0.25, 1.0)] == pytest.approx([1.0, 0.75, 0.0])
    cos = build_schedule("cosine", 1.0, 0.0)
    assert [cos(t) for t in (0.0, 0.5, 1.0)] == pytest.approx([1.0, 0.5, 0.0])
    step = build_schedule("step", 0.9, 0.1, milestones=[0.5, 0.75])
    assert [step(t) for t in (0.1, 0.5, 0.8)] == pytest.approx([0.9, 0.5, 0.1])
    with pytest.raises(ConfigError, match="known: constant, cosine, linear, step"):
        build_schedule("exp", 1.0)


NAMES = ["teacher", "ta1", "ta2", "ta3"]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_drop_k_removes_exactly_k(k):
    sel = SourceSelector(NAMES, mode="drop_k", k=k, seed=1, stage="student")
    dropped_teacher = 0
    for step in range(300):
        mask = sel.keep_mask(step)
        assert mask.count(False) == k
        dropped_teacher += not mask[0]
    assert 0 < dropped_teacher < 300  # the teacher is droppable by default


def test_drop_k_include_teacher_false_never_drops_teacher():
    sel = SourceSelector(NAMES, mode="drop_k", k=2, include_teacher=False, seed=0)
    assert all(sel.keep_mask(s)[0] and sel.keep_mask(s).count(False) == 2 for s in range(200))


def test_bernoulli_survival_is_about_p():
    p = 0.75
    sel = SourceSelector(NAMES, mode="bernoulli", p=p, seed=3)
    kept = [sum(sel.keep_mask(s)) for s in range(4000)]
    rate = sum(kept) / (4000 * len(NAMES))
    assert abs(rate - p) < 0.02
    # each source separately, too
    for i in range(len(NAMES)):
        r = sum(sel.keep_mask(s)[i] for s in range(2000)) / 2000
        assert abs(r - p) < 0.04


def test_min_keep_is_respected():
    sel = SourceSelector(NAMES, mode="bernoulli", p=0.1, min_keep=2, seed=0)
    assert all(sum(sel.keep_mask(s)) >= 2 for s in range(500))


def test_selection_is_seeded_and_reproducible():
    a = SourceSelector(NAMES, mode="bernoulli", p=0.5, seed=7, stage="student")
    b = SourceSelector(NAMES, mode="bernoulli", p=0.5, seed=7, stage="student")
    c = SourceSelector(NAMES, mode="bernoulli", p=0.5, seed=8, stage="student")
    masks_a = [a.keep_mask(s) for s in range(100)]
    assert masks_a == [b.keep_mask(s) for s in range(100)]
    assert masks_a != [c.keep_mask(s) for s in range(100)]
    # the draw depends only on the step: asking out of order (as after a resume) gives the same masks
    assert [a.keep_mask(s) for s in reversed(range(100))] == list(reversed(masks_a))


@pytest.mark.parametrize("kwargs,match", [
    ({"mode": "drop_k", "k": 4}, "drops every source"),
    ({"mode": "drop_k", "k": 0}, "k must be >= 1"),
    ({"mode": "bernoulli", "p": 0.0}, r"p must be in \(0, 1\]"),
    ({"mode": "bernoulli", "p": 1.5}, r"p must be in \(0, 1\]"),
    ({"mode": "bernoulli", "p": 0.5, "min_keep": 5}, "min_keep=5"),
    ({"mode": "sometimes"}, "known: none, drop_k, bernoulli"),
])
def test_selector_rejects_bad_settings(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SourceSelector(NAMES, **kwargs)


@pytest.mark.parametrize("reduction", ["batchmean", "mean_legacy"])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_stacked_kd_sum_equals_the_sum_of_per_source_kd(reduction, k):
    """kd_loss_sum (one stacked pass, used by DGKD and multi-teacher KD) is the sum of Hinton terms, and its
    gradient is the same."""
    from kdlab.distill.losses import kd_loss, kd_loss_sum

    g = torch.Generator().manual_seed(k)
    s1 = torch.randn(16, 10, generator=g, requires_grad=True)
    s2 = s1.detach().clone().requires_grad_(True)
    ts = [torch.randn(16, 10, generator=g) * 3 for _ in range(k)]
    ref = sum(kd_loss(s1, t, 4.0, reduction) for t in ts)
    got = kd_loss_sum(s2, ts, 4.0, reduction)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    ref.backward()
    got.backward()
    torch.testing.assert_close(s2.grad, s1.grad, rtol=1e-5, atol=1e-7)
