"""CRD and ReviewKD: each loss against a naive second implementation (loops and numpy) at two or more settings,
gradients of the custom cores in float64, CRD's memory (the momentum update, negatives that never include the
positive, repeatable draws, the errors about sample indices), ReviewKD's fusion and warm-up, the config checks,
several sources (mean / sum), no source at all, trainable parts, and the defaults on real zoo pairs (plain10 ->
plain2 on 1x28x28, resnet32x4 -> resnet8x4 on 3x32x32)."""
from __future__ import annotations

import functools
import logging
import math

import numpy as np
import pytest
import torch
from torch import nn

from kdlab.distill import SourceOutput, StudentOutput, build_strategy
from kdlab.distill import crd as crd_mod
from kdlab.distill.base import StrategyContext, strategy_class
from kdlab.distill.crd import CRD, contrast_scores, nce_loss, sample_negatives
from kdlab.distill.reviewkd import ABF, ReviewFusion, ReviewKD, hcl_loss
from kdlab.errors import ConfigError
from kdlab.models import FeatureTaps, build_model, feature_shapes
from tests.helpers.methods import (
    assert_rejects,
    assert_untaught_is_zero,
    cfg_of,
    composed_distill,
    hand_ce,
    hand_conv,
    n,
    total,
)


def hand_kd(zs, zt, t: float) -> float:
    out = 0.0
    for a, b in zip(n(zs), n(zt)):
        ps, pt = np.exp(a / t) / np.exp(a / t).sum(), np.exp(b / t) / np.exp(b / t).sum()
        out += sum(q * (math.log(q) - math.log(p)) for p, q in zip(ps, pt))
    return t * t * out / zs.shape[0]


# == CRD =============================================================================================================
def make_crd(s_dim=6, t_dims=None, num_train=20, stage="student", **block):
    t_dims = {"t": 5} if t_dims is None else t_dims
    ctx = StrategyContext(stage, list(t_dims), 10, {"embedding": (s_dim,)},
                          {k: {"embedding": (d,)} for k, d in t_dims.items()}, num_train=num_train, max_epochs=3)
    return build_strategy(cfg_of("crd", **block), ctx)


def crd_batch(strat, index, sources=("t",), grad=False):
    b = len(index)
    s_dim = strat.heads[sources[0]].embed_s.linear.in_features if sources else 6
    f_s = torch.randn(b, s_dim, requires_grad=grad)
    src = {k: SourceOutput(torch.randn(b, 10), {"embedding": torch.randn(b, strat.heads[k].embed_t.linear.in_features)})
           for k in sources}
    logits = torch.randn(b, 10, requires_grad=grad)
    return StudentOutput(logits, {"embedding": f_s}, torch.tensor(index)), src, torch.arange(b) % 10


def hand_embed(lin: nn.Linear, f) -> np.ndarray:
    v = n(f).reshape(f.shape[0], -1) @ n(lin.weight).T + n(lin.bias)
    return v / np.sqrt((v ** 2).sum(1, keepdims=True))


def hand_side(v: np.ndarray, memory: np.ndarray, rows: np.ndarray, tau: float, z: float | None, n_data: int):
    """One direction of the NCE loss by loops; Z from these scores when not given. Returns (loss, Z)."""
    b, k1 = rows.shape
    scores = np.array([[math.exp(float(v[i] @ memory[rows[i, j]]) / tau) for j in range(k1)] for i in range(b)])
    if z is None:
        z = float(scores.mean()) * n_data
    noise = (k1 - 1) / n_data
    loss = 0.0
    for i in range(b):
        p0 = scores[i, 0] / z
        loss += math.log(p0 / (p0 + noise + 1e-7))
        for j in range(1, k1):
            loss += math.log(noise / (scores[i, j] / z + noise + 1e-7))
    return -loss / b, z


def hand_update(memory: np.ndarray, index, v: np.ndarray, m: float) -> np.ndarray:
    out = memory.copy()
    for i, row in zip(index, v):
        r = m * memory[i] + (1 - m) * row
        out[i] = r / math.sqrt(float((r ** 2).sum()))
    return out


@pytest.fixture
def record_negatives(monkeypatch):
    drawn: list[torch.Tensor] = []

    def wrapped(*args, **kwargs):
        out = sample_negatives(*args, **kwargs)
        drawn.append(out.clone())
        return out

    monkeypatch.setattr(crd_mod, "sample_negatives", wrapped)
    return drawn


@pytest.mark.parametrize("nce_k,nce_t,nce_mom,feat_dim", [(4, 0.07, 0.5, 3), (7, 0.5, 0.0, 4), (19, 1.0, 0.9, 2)])
def test_crd_loss_and_memory_against_hand_computation(record_negatives, nce_k, nce_t, nce_mom, feat_dim):
    torch.manual_seed(0)
    strat = make_crd(nce_k=nce_k, nce_t=nce_t, nce_mom=nce_mom, feat_dim=feat_dim, num_train=20)
    head = strat.heads["t"]
    assert strat.nce_k == nce_k and head.memory_s.shape == head.memory_t.shape == (20, feat_dim)
    m_s, m_t, z = n(head.memory_s), n(head.memory_t), [None, None]
    for step, index in enumerate(([3, 0, 17, 9], [9, 2, 19, 11, 5])):
        student, src, y = crd_batch(strat, index)
        terms, weights = strat.loss_terms(student, src, y, 0.0)
        neg = record_negatives[-1].numpy()
        assert neg.shape == (len(index), nce_k)
        rows = np.concatenate([np.array(index)[:, None], neg], axis=1)
        v_s = hand_embed(head.embed_s.linear, student.features["embedding"])
        v_t = hand_embed(head.embed_t.linear, src["t"].features["embedding"])
        l_s, z[0] = hand_side(v_s, m_t, rows, nce_t, z[0], 20)  # student anchor vs the source's memory
        l_t, z[1] = hand_side(v_t, m_s, rows, nce_t, z[1], 20)  # source anchor vs the student's memory
        assert set(terms) == {"ce", "crd"} and weights == {"ce": 1.0, "crd": 0.8}
        assert terms["crd"].item() == pytest.approx(l_s + l_t, rel=1e-5)
        assert terms["ce"].item() == pytest.approx(hand_ce(student.logits, y), rel=1e-6)
        # Z is set by the first batch and kept
        assert n(head.z).tolist() == pytest.approx(z, rel=1e-5)
        # the momentum update of the batch's rows (the others untouched), after the loss was computed
        m_s, m_t = hand_update(m_s, index, v_s, nce_mom), hand_update(m_t, index, v_t, nce_mom)
        assert n(head.memory_s) == pytest.approx(m_s, abs=1e-6)
        assert n(head.memory_t) == pytest.approx(m_t, abs=1e-6)
        assert np.abs(np.linalg.norm(n(head.memory_s)[index], axis=1) - 1).max() < 1e-5


def test_crd_gradients_reach_both_embeddings_and_the_student_but_not_the_memory():
    strat = make_crd(nce_k=5)
    student, src, y = crd_batch(strat, [1, 2, 3], grad=True)
    total(*strat.loss_terms(student, src, y, 0.0)).backward()
    head = strat.heads["t"]
    assert student.features["embedding"].grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    assert not head.memory_s.requires_grad and not head.memory_t.requires_grad


def test_crd_core_gradcheck_in_float64():
    g = torch.Generator().manual_seed(0)
    anchor = torch.nn.functional.normalize(torch.randn(3, 4, generator=g, dtype=torch.float64), dim=1)
    anchor.requires_grad_(True)
    rows = torch.randn(3, 6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, r: nce_loss(contrast_scores(a, r, 0.5), 37.0, 50), (anchor, rows))
    assert torch.autograd.gradcheck(lambda a: nce_loss(contrast_scores(a, rows.detach(), 0.07), 1.0e4, 200),
                                    (anchor,))


def test_negatives_never_include_the_positive_and_cover_the_rest():
    g = torch.Generator().manual_seed(1)
    index = torch.tensor([0, 5, 9, 9, 3])
    neg = sample_negatives(index, 10, 4000, g)
    assert neg.shape == (5, 4000) and neg.dtype == torch.long
    for i, row in zip(index.tolist(), neg):
        seen = set(row.tolist())
        assert i not in seen and seen == set(range(10)) - {i}  # every other sample is drawn (uniform)
        counts = np.bincount(row.numpy(), minlength=10)
        assert abs(counts[[j for j in range(10) if j != i]] / 4000 - 1 / 9).max() < 0.03
    # the smallest bank: the single other sample
    assert sample_negatives(torch.tensor([0, 1]), 2, 3, g).tolist() == [[1, 1, 1], [0, 0, 0]]
    # a fixed generator repeats its draws
    a = sample_negatives(index, 10, 7, torch.Generator().manual_seed(3))
    assert torch.equal(a, sample_negatives(index, 10, 7, torch.Generator().manual_seed(3)))


def test_crd_runs_repeat_and_stages_draw_their_own_negatives(record_negatives):
    def step(stage):
        torch.manual_seed(0)
        strat = make_crd(stage=stage, nce_k=6)
        strat.loss_terms(*crd_batch(strat, [4, 8]), 0.0)
        return strat, record_negatives[-1]

    (a, neg_a), (b, neg_b), (c, neg_c) = step("student"), step("student"), step("ta1")
    assert torch.equal(neg_a, neg_b) and not torch.equal(neg_a, neg_c)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.heads["t"].memory_s, c.heads["t"].memory_s)  # memory initialized per (stage, source)


def test_crd_two_sources_combine_mean_and_sum_and_each_has_its_own_memory():
    values = {}
    for how in ("mean", "sum"):
        torch.manual_seed(0)
        strat = make_crd(t_dims={"a": 5, "b": 3}, combine=how, nce_k=4)
        assert list(strat.heads) == ["a", "b"] and strat.heads["b"].embed_t.linear.in_features == 3
        assert strat.heads["a"].seed != strat.heads["b"].seed
        student, src, y = crd_batch(strat, [0, 1, 2], sources=("a", "b"))
        one = {}
        for k in ("a", "b"):  # each source alone, from the same starting state
            torch.manual_seed(0)
            alone = make_crd(t_dims={"a": 5, "b": 3}, combine=how, nce_k=4)
            one[k] = alone.loss_terms(student, {k: src[k]}, y, 0.0)[0]["crd"].item()
        values[how] = strat.loss_terms(student, src, y, 0.0)[0]["crd"].item()
        expected = one["a"] + one["b"] if how == "sum" else (one["a"] + one["b"]) / 2
        assert values[how] == pytest.approx(expected, rel=1e-5)
    assert values["sum"] == pytest.approx(2 * values["mean"], rel=1e-5)


def test_crd_without_teaching_sources_is_zero_and_differentiable():
    strat = make_crd(nce_k=4)
    before = strat.heads["t"].memory_s.clone()
    student, _, y = crd_batch(strat, [0, 1], grad=True)
    student.index = None  # not needed when no source teaches
    assert_untaught_is_zero(strat, student, y, "crd", 0.0)
    assert torch.equal(strat.heads["t"].memory_s, before)


def test_crd_with_logit_kd_and_label_smoothing():
    strat = make_crd(nce_k=4, kd_weight=0.9, ce_weight=0.5)
    student, src, y = crd_batch(strat, [5, 6, 7])
    terms, weights = strat.loss_terms(student, src, y, 0.0)
    assert weights == {"ce": 0.5, "crd": 0.8, "kd": 0.9}
    assert terms["kd"].item() == pytest.approx(hand_kd(student.logits, src["t"].logits, 4.0), rel=1e-5)
    cfg = cfg_of("crd", nce_k=4)
    cfg["label_smoothing"] = 0.2
    ctx = StrategyContext("s", ["t"], 10, {"embedding": (6,)}, {"t": {"embedding": (5,)}}, num_train=20)
    smooth = build_strategy(cfg, ctx).loss_terms(student, src, y, 0.0)[0]["ce"].item()
    expected = 0.8 * hand_ce(student.logits, y) + 0.2 * float(np.mean(
        [np.log(np.exp(r).sum()) - r.mean() for r in n(student.logits)]))
    assert smooth == pytest.approx(expected, rel=1e-5)


def test_crd_trainable_parts_buffers_and_store_key():
    strat = make_crd(s_dim=6, t_dims={"a": 5, "b": 7}, feat_dim=3, num_train=11)
    assert strat.extra_parameters() == (6 * 3 + 3 + 5 * 3 + 3) + (6 * 3 + 3 + 7 * 3 + 3)
    state = strat.state_dict()
    for k in ("a", "b"):  # the memories are persistent buffers: a resumed stage gets them back
        assert state[f"heads.{k}.memory_s"].shape == state[f"heads.{k}.memory_t"].shape == (11, 3)
        assert state[f"heads.{k}.z"].tolist() == [-1.0, -1.0]
    assert sum(b.numel() for b in strat.buffers()) == 2 * (2 * 11 * 3 + 2)
    own = CRD.own_config(cfg_of("crd"))
    assert set(own) == {"strategy", "label_smoothing", "crd"} and own["crd"] == composed_distill("crd")["crd"]
    assert set(CRD.own_config(cfg_of("crd", kd_weight=1.0))) == {"strategy", "label_smoothing", "crd",
                                                                 "temperature", "kl_reduction"}
    assert CRD.taps(cfg_of("crd", student_tap="prepool")) == (["prepool"], ["embedding"])
    assert (strat.student_taps(), strat.source_taps()) == (["embedding"], ["embedding"])


def test_crd_state_round_trip_keeps_z(record_negatives):
    strat = make_crd(nce_k=4)
    strat.loss_terms(*crd_batch(strat, [0, 1]), 0.0)
    z = strat.heads["t"].z.clone()
    assert (z > 0).all()
    fresh = make_crd(nce_k=4)
    fresh.loss_terms(*crd_batch(fresh, [5, 6]), 0.0)  # a Z of its own ...
    fresh.load_state_dict(strat.state_dict())  # ... replaced by the resumed one, which the next step keeps
    assert torch.equal(fresh.heads["t"].memory_s, strat.heads["t"].memory_s)
    fresh.loss_terms(*crd_batch(fresh, [2, 3]), 0.0)
    assert torch.equal(fresh.heads["t"].z, z)
    unset = make_crd(nce_k=4)
    unset.loss_terms(*crd_batch(unset, [5, 6]), 0.0)
    unset.load_state_dict(make_crd(nce_k=4).state_dict())  # a state saved before the first step: Z set again
    unset.loss_terms(*crd_batch(unset, [2, 3]), 0.0)
    assert (unset.heads["t"].z > 0).all()


def test_crd_memory_update_uses_every_ranks_rows(monkeypatch):
    """Under DDP ``gather_rows`` returns every rank's (index, v_s, v_t): all of them update the memory."""
    other = torch.tensor([12, 13])
    v = torch.nn.functional.normalize(torch.ones(2, 3), dim=1)
    monkeypatch.setattr(crd_mod, "gather_rows", lambda i, a, b: (torch.cat([i, other]), torch.cat([a, v]),
                                                                  torch.cat([b, v])))
    strat = make_crd(nce_k=4, feat_dim=3, nce_mom=0.0)
    strat.loss_terms(*crd_batch(strat, [0, 1]), 0.0)
    assert n(strat.heads["t"].memory_s)[[12, 13]] == pytest.approx(n(v))
    assert n(strat.heads["t"].memory_t)[[12, 13]] == pytest.approx(n(v))


def test_crd_errors_about_sample_indices(caplog):
    with pytest.raises(ConfigError, match=r"CRD needs the training split's size .* got num_train=0"):
        make_crd(num_train=0)
    with caplog.at_level(logging.WARNING, logger="kdlab.distill.crd"):
        strat = make_crd(num_train=9)  # default nce_k 16384 > 8 other samples
    assert strat.nce_k == 8 and "nce_k=16384" in caplog.text and "nce_k=8" in caplog.text
    student, src, y = crd_batch(strat, [0, 1])
    student.index = None
    with pytest.raises(ConfigError, match="StudentOutput.index"):
        strat.loss_terms(student, src, y, 0.0)
    student.index = torch.tensor([0, 9])
    with pytest.raises(ConfigError, match=r"out of range \[0, 9\).*0\.\.9"):
        strat.loss_terms(student, src, y, 0.0)
    student.index = torch.tensor([0, 1, 2])
    with pytest.raises(ConfigError, match="3 sample indices for a batch of 2"):
        strat.loss_terms(student, src, y, 0.0)
    with pytest.raises(ConfigError, match=r"CRD needs features at tap 'embedding' .*source 't'"):
        build_strategy(cfg_of("crd"), StrategyContext("s", ["t"], 10, {"embedding": (4,)}, {"t": {}}, num_train=9))


CRD_BAD = [
    ({"feat_weight": -1}, r"distill\.crd\.feat_weight must be a number >= 0, got -1"),
    ({"kd_weight": "x"}, r"distill\.crd\.kd_weight must be a number >= 0, got 'x'"),
    ({"feat_dim": 0}, r"distill\.crd\.feat_dim must be an integer >= 1, got 0"),
    ({"nce_k": 2.5}, r"distill\.crd\.nce_k must be an integer >= 1, got 2\.5"),
    ({"nce_t": 0}, r"distill\.crd\.nce_t must be a number > 0, got 0"),
    ({"nce_mom": 1.5}, r"distill\.crd\.nce_mom must be a number >= 0 and <= 1, got 1\.5"),
    ({"nce_mom": 1}, r"distill\.crd\.nce_mom must be < 1 .*got 1"),
    ({"combine": "max"}, r"unknown distill\.crd\.combine 'max'; known: mean, sum"),
    ({"student_tap": ""}, r"distill\.crd\.student_tap must be a feature point name"),
    ({"nce_n": 3}, r"unknown distill\.crd key\(s\) 'nce_n'; known: feat_weight, ce_weight, kd_weight, feat_dim"),
]


@pytest.mark.parametrize("block,message", CRD_BAD)
def test_crd_bad_options_are_config_errors(block, message):
    assert_rejects(CRD, block, message)


def test_crd_bad_shared_options():
    with pytest.raises(ConfigError, match="label_smoothing must be in"):
        CRD.check({**cfg_of("crd"), "label_smoothing": 1.0})
    with pytest.raises(ConfigError, match="unknown distill.kl_reduction 'x'"):
        CRD.check({**cfg_of("crd"), "kl_reduction": "x"})
    with pytest.raises(ConfigError, match="distill.crd must be a mapping"):
        CRD.check({**cfg_of("crd"), "crd": [1]})


# == ReviewKD ========================================================================================================
def hand_adaptive_pool(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Adaptive average pooling by its definition: bin i covers [floor(i H / h), ceil((i + 1) H / h))."""
    b, c, h, w = x.shape
    out = np.zeros((b, c, size[0], size[1]))
    for i in range(size[0]):
        for j in range(size[1]):
            h0, h1 = (i * h) // size[0], -((-(i + 1) * h) // size[0])
            w0, w1 = (j * w) // size[1], -((-(j + 1) * w) // size[1])
            out[:, :, i, j] = x[:, :, h0:h1, w0:w1].mean((2, 3))
    return out


def hand_hcl(pairs) -> float:
    out = 0.0
    for fs, ft in pairs:
        h = min(fs.shape[2], fs.shape[3])
        loss, norm, w = float(((fs - ft) ** 2).mean()), 1.0, 1.0
        for level in (4, 2, 1):
            if level < h:
                w = w / 2
                a, b = hand_adaptive_pool(fs, (level, level)), hand_adaptive_pool(ft, (level, level))
                loss += w * float(((a - b) ** 2).mean())
                norm += w
        out += loss / norm
    return out


def hand_nearest(x: np.ndarray, size) -> np.ndarray:
    h, w = x.shape[2:]
    rows = [min(math.floor(i * h / size[0]), h - 1) for i in range(size[0])]
    cols = [min(math.floor(j * w / size[1]), w - 1) for j in range(size[1])]
    return x[:, :, rows][:, :, :, cols]


def hand_resize(x: np.ndarray, size) -> np.ndarray:
    if tuple(x.shape[2:]) == tuple(size):
        return x
    if x.shape[2] >= size[0] and x.shape[3] >= size[1]:
        return hand_adaptive_pool(x, size)
    return hand_nearest(x, size)


def hand_bn(x: np.ndarray, bn: nn.BatchNorm2d) -> np.ndarray:
    mean = x.mean((0, 2, 3), keepdims=True)
    var = x.var((0, 2, 3), keepdims=True)
    return (x - mean) / np.sqrt(var + bn.eps) * n(bn.weight)[None, :, None, None] + n(bn.bias)[None, :, None, None]


def hand_review(fusion: ReviewFusion, maps: list[np.ndarray]) -> list[np.ndarray]:
    outs, residual = [None] * len(maps), None
    for i in reversed(range(len(maps))):
        abf = fusion.abfs[i]
        x = hand_bn(hand_conv(maps[i], n(abf.conv1[0].weight)), abf.conv1[1])
        if i < len(maps) - 1:
            r = hand_resize(residual, x.shape[2:])
            att = abf.att_conv[0]
            z = hand_conv(np.concatenate([x, r], 1), n(att.weight)) + n(att.bias)[None, :, None, None]
            z = 1 / (1 + np.exp(-z))
            x = x * z[:, 0:1] + r * z[:, 1:2]
        x = hand_resize(x, fusion.out_sizes[i])
        outs[i] = hand_bn(hand_conv(x, n(abf.conv2[0].weight)), abf.conv2[1])
        residual = x
    return outs


def _randomize_bn(module: nn.Module) -> None:
    g = torch.Generator().manual_seed(7)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)


S_TAPS = ["stage1", "stage2", "prepool"]
T_TAPS = ["stage1", "stage2", "embedding"]


def make_review(s_shapes, t_shapes: dict[str, list], max_epochs=10, **block):
    block = {"student_taps": S_TAPS, "source_taps": T_TAPS, **block}
    ctx = StrategyContext("student", list(t_shapes), 10, dict(zip(block["student_taps"], s_shapes)),
                          {k: dict(zip(block["source_taps"], v)) for k, v in t_shapes.items()}, max_epochs=max_epochs)
    return build_strategy(cfg_of("reviewkd", **block), ctx)


def review_batch(strat, s_shapes, t_shapes: dict[str, list], b=3, grad=False):
    g = torch.Generator().manual_seed(2)
    feats = {t: torch.randn(b, *s, generator=g, requires_grad=grad) for t, s in zip(strat.s_taps, s_shapes)}
    src = {k: SourceOutput(torch.randn(b, 10, generator=g),
                           {t: torch.rand(b, *s, generator=g) for t, s in zip(strat.t_taps, shapes)})
           for k, shapes in t_shapes.items()}
    logits = torch.randn(b, 10, generator=g, requires_grad=grad)
    return StudentOutput(logits, feats), src, torch.arange(b) % 10


SETTINGS = {
    # the same sizes, other channel counts (mid = min(4, 6) = 4)
    "equal": ([(3, 8, 8), (5, 4, 4), (6, 2, 2)], [(4, 8, 8), (6, 4, 4), (8, 2, 2)], {"max_mid_channels": 4}),
    # the source's maps smaller (pooled), larger (nearest) and a vector (a 1 x 1 map); mid = 6
    "mixed": ([(3, 8, 8), (5, 4, 4), (6, 2, 2)], [(4, 4, 4), (6, 8, 8), (5,)], {}),
    # odd sizes: 7x7 pooled to 3x3 (overlapping bins), 3x3 enlarged to 5x5
    "odd": ([(2, 7, 7), (3, 3, 3), (4, 3, 3)], [(3, 3, 3), (2, 5, 5), (3, 1, 1)], {"max_mid_channels": 3}),
}


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_reviewkd_loss_against_hand_computation(setting):
    s_shapes, t_shapes, block = SETTINGS[setting]
    torch.manual_seed(0)
    strat = make_review(s_shapes, {"t": t_shapes}, feat_weight=2.0, warmup=0, **block)
    fusion = strat.fusions["t"]
    _randomize_bn(fusion)
    assert fusion.mid_channels == min(block.get("max_mid_channels", 512), s_shapes[-1][0])
    student, src, y = review_batch(strat, s_shapes, {"t": t_shapes})
    terms, weights = strat.loss_terms(student, src, y, 1.0)
    outs = hand_review(fusion, [n(student.features[t]) for t in S_TAPS])
    targets = [n(src["t"].features[t]).reshape(3, -1, *(s[1:] if len(s) == 3 else (1, 1)))
               for t, s in zip(T_TAPS, t_shapes)]
    assert [o.shape[1:] for o in outs] == [tuple(t.shape[1:]) for t in targets]
    assert set(terms) == {"ce", "reviewkd"} and weights == {"ce": 1.0, "reviewkd": 2.0}
    assert terms["reviewkd"].item() == pytest.approx(hand_hcl(list(zip(outs, targets))), rel=1e-5)
    assert terms["ce"].item() == pytest.approx(hand_ce(student.logits, y), rel=1e-6)


@pytest.mark.parametrize("shapes", [[(2, 8, 8)], [(3, 3, 3), (2, 1, 1)], [(2, 7, 7), (4, 4, 4), (1, 2, 5)]])
def test_hcl_against_hand_computation(shapes):
    g = torch.Generator().manual_seed(0)
    fs = [torch.randn(2, *s, generator=g) for s in shapes]
    ft = [torch.randn(2, *s, generator=g) for s in shapes]
    assert hcl_loss(fs, ft).item() == pytest.approx(hand_hcl([(n(a), n(b)) for a, b in zip(fs, ft)]), rel=1e-5)
    assert hcl_loss(ft, ft).item() == 0.0


def test_hcl_weights_halve_over_the_levels_used():
    fs = torch.zeros(1, 1, 8, 8)
    ft = torch.ones(1, 1, 8, 8)  # every level's MSE is 1: the weighted mean is 1
    assert hcl_loss([fs], [ft]).item() == pytest.approx(1.0)
    ft2 = torch.zeros(1, 1, 8, 8)
    ft2[..., :4, :4] = 4.0  # full MSE 4, 4x4: 4, 2x2: 4, 1x1: 1 -> (4 + 2 + 1 + 1/8) / (1 + 1/2 + 1/4 + 1/8)
    assert hcl_loss([fs], [ft2]).item() == pytest.approx((4 + 2 + 1 + 0.125) / 1.875)


def test_reviewkd_fusion_gradcheck_in_float64():
    torch.manual_seed(0)
    fusion = ReviewFusion([2, 3, 3], [(2, 4, 4), (3, 2, 2), (2, 1, 1)], max_mid_channels=2).double()
    _randomize_bn(fusion)
    g = torch.Generator().manual_seed(1)
    maps = [torch.randn(3, *s, generator=g, dtype=torch.float64, requires_grad=True)
            for s in ((2, 4, 4), (3, 2, 2), (3, 2, 2))]
    targets = [torch.randn(3, *s, generator=g, dtype=torch.float64) for s in ((2, 4, 4), (3, 2, 2), (2, 1, 1))]
    outs = fusion(maps)
    assert [tuple(o.shape) for o in outs] == [(3, 2, 4, 4), (3, 3, 2, 2), (3, 2, 1, 1)]
    assert torch.autograd.gradcheck(lambda *m: hcl_loss(fusion(list(m)), targets), tuple(maps))
    fs = torch.randn(2, 2, 5, 5, generator=g, dtype=torch.float64, requires_grad=True)
    ft = torch.randn(2, 2, 5, 5, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: hcl_loss([a], [ft]), (fs,))


def test_abf_structure_and_fusion():
    abf = ABF(3, 4, 5, fuse=True)
    assert abf.conv1[0].kernel_size == (1, 1) and abf.conv2[0].kernel_size == (3, 3)
    assert abf.att_conv[0].in_channels == 8 and abf.att_conv[0].out_channels == 2
    out, res = abf(torch.randn(2, 3, 4, 4), torch.randn(2, 4, 2, 2), (8, 8))
    assert out.shape == (2, 5, 8, 8) and res.shape == (2, 4, 8, 8)
    assert ABF(3, 4, 5, fuse=False).att_conv is None


def test_reviewkd_warmup_follows_the_epochs():
    s_shapes, t_shapes, _ = SETTINGS["equal"]
    strat = make_review(s_shapes, {"t": t_shapes}, max_epochs=40, warmup=20, feat_weight=5.0)
    student, src, y = review_batch(strat, s_shapes, {"t": t_shapes})
    for progress, factor in ((0.0, 0.0), (0.25, 0.5), (0.5, 1.0), (0.9, 1.0)):
        assert strat.loss_terms(student, src, y, progress)[1]["reviewkd"] == pytest.approx(5.0 * factor)
    none = make_review(s_shapes, {"t": t_shapes}, warmup=0)
    assert none.loss_terms(student, src, y, 0.0)[1]["reviewkd"] == 1.0
    short = make_review(s_shapes, {"t": t_shapes}, max_epochs=5)  # warm-up (20) longer than the stage
    assert short.warmup(1.0) == pytest.approx(0.25)


def test_reviewkd_two_sources_combine_and_own_fusions():
    s_shapes = SETTINGS["equal"][0]
    t_shapes = {"a": SETTINGS["equal"][1], "b": SETTINGS["mixed"][1]}
    values = {}
    for how in ("mean", "sum"):
        torch.manual_seed(0)
        strat = make_review(s_shapes, t_shapes, combine=how)
        assert list(strat.fusions) == ["a", "b"]
        student, src, y = review_batch(strat, s_shapes, t_shapes)
        per = [strat.loss_terms(student, {k: src[k]}, y, 1.0)[0]["reviewkd"].item() for k in ("a", "b")]
        values[how] = strat.loss_terms(student, src, y, 1.0)[0]["reviewkd"].item()
        assert values[how] == pytest.approx(sum(per) if how == "sum" else sum(per) / 2, rel=1e-5)
    assert values["sum"] == pytest.approx(2 * values["mean"], rel=1e-5)


def test_reviewkd_without_teaching_sources_is_zero_and_differentiable():
    s_shapes, t_shapes, _ = SETTINGS["equal"]
    strat = make_review(s_shapes, {"t": t_shapes})
    student, _, y = review_batch(strat, s_shapes, {"t": t_shapes}, grad=True)
    assert_untaught_is_zero(strat, student, y, "reviewkd", 1.0)


def test_reviewkd_trains_its_fusions_and_counts_them():
    s_shapes, t_shapes, _ = SETTINGS["mixed"]
    strat = make_review(s_shapes, {"a": t_shapes, "b": t_shapes})
    student, src, y = review_batch(strat, s_shapes, {"a": t_shapes, "b": t_shapes}, grad=True)
    total(*strat.loss_terms(student, src, y, 1.0)).backward()
    assert all(p.grad is not None for p in strat.fusions.parameters())
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in student.features.values())
    mid = 6
    per_source = 0
    for i, (s, t) in enumerate(zip(s_shapes, t_shapes)):
        per_source += s[0] * mid + 2 * mid + mid * t[0] * 9 + 2 * t[0]  # conv1 + BN, conv2 + BN
        if i < 2:
            per_source += 2 * mid * 2 + 2  # the attention conv (with bias)
    assert strat.extra_parameters() == 2 * per_source


def test_reviewkd_taps_store_key_and_shape_errors():
    cfg = cfg_of("reviewkd", student_taps=["stage1", "prepool", "prepool"], source_taps=["stage2", "stage3", "stage3"])
    assert ReviewKD.taps(cfg) == (["stage1", "prepool"], ["stage2", "stage3"])
    assert ReviewKD.taps(cfg_of("reviewkd")) == (["stage1", "stage2", "prepool"], ["stage1", "stage2", "prepool"])
    own = ReviewKD.own_config(cfg_of("reviewkd"))
    assert set(own) == {"strategy", "label_smoothing", "reviewkd"} and own["reviewkd"] == composed_distill("reviewkd")["reviewkd"]
    with pytest.raises(ConfigError, match=r"ReviewKD needs feature maps .* tap 'stage2' \(student\) and 'stage2' "
                                          r"\(source 't'\); got \(4, 5\) and \(3, 2, 2\)"):
        make_review([(2, 4, 4), (4, 5), (3, 2, 2)], {"t": [(2, 4, 4), (3, 2, 2), (3, 2, 2)]},
                    student_taps=S_TAPS, source_taps=S_TAPS)
    with pytest.raises(ConfigError, match="got None"):
        build_strategy(cfg_of("reviewkd"), StrategyContext("s", ["t"], 10, {}, {"t": {}}))


REVIEW_BAD = [
    ({"feat_weight": -0.5}, r"distill\.reviewkd\.feat_weight must be a number >= 0, got -0\.5"),
    ({"warmup": -1}, r"distill\.reviewkd\.warmup must be a number >= 0, got -1"),
    ({"max_mid_channels": 0}, r"distill\.reviewkd\.max_mid_channels must be an integer >= 1, got 0"),
    ({"upsample": "bicubic"}, r"unknown distill\.reviewkd\.upsample 'bicubic'; known: nearest, bilinear"),
    ({"combine": "max"}, r"unknown distill\.reviewkd\.combine 'max'; known: mean, sum"),
    ({"student_taps": []}, r"distill\.reviewkd\.student_taps must be a non-empty list of feature points .*got \[\]"),
    ({"source_taps": ["stage1"]}, r"pair up by position .* got \['stage1', 'stage2', 'prepool'\] and \['stage1'\]"),
    ({"mid_channels": 8}, r"unknown distill\.reviewkd key\(s\) 'mid_channels'; known: feat_weight, ce_weight, warmup"),
]


@pytest.mark.parametrize("block,message", REVIEW_BAD)
def test_reviewkd_bad_options_are_config_errors(block, message):
    assert_rejects(ReviewKD, block, message)


def test_reviewkd_bilinear_upsampling_and_bad_shared_options():
    s_shapes, t_shapes, _ = SETTINGS["mixed"]
    torch.manual_seed(0)
    near = make_review(s_shapes, {"t": t_shapes})
    torch.manual_seed(0)
    bil = make_review(s_shapes, {"t": t_shapes}, upsample="bilinear")
    student, src, y = review_batch(near, s_shapes, {"t": t_shapes})
    a = near.loss_terms(student, src, y, 1.0)[0]["reviewkd"].item()
    b = bil.loss_terms(student, src, y, 1.0)[0]["reviewkd"].item()
    assert math.isfinite(b) and a != pytest.approx(b)
    with pytest.raises(ConfigError, match="label_smoothing must be in"):
        ReviewKD.check({**cfg_of("reviewkd"), "label_smoothing": -0.1})


# == the defaults on real zoo pairs ==================================================================================
PAIRS = {"plain10->plain2": ("plain10", "plain2", (1, 28, 28)),
         "resnet32x4->resnet8x4": ("resnet32x4", "resnet8x4", (3, 32, 32))}


@functools.cache
def _models(pair: str):
    t_name, s_name, shape = PAIRS[pair]
    torch.manual_seed(0)
    kw = {"in_channels": shape[0], "input_size": shape[1]}
    return build_model(t_name, 10, **kw).eval(), build_model(s_name, 10, **kw), shape


@pytest.mark.parametrize("pair", list(PAIRS))
@pytest.mark.parametrize("name", ["crd", "reviewkd"])
def test_defaults_fit_real_zoo_pairs(name, pair, caplog):
    teacher, student, shape = _models(pair)
    cfg = composed_distill(name)
    cfg = strategy_class(cfg).with_model_taps(cfg, PAIRS[pair][1], [PAIRS[pair][0]])  # as build_stages does
    s_taps, t_taps = strategy_class(cfg).taps(cfg)
    ctx = StrategyContext("student", ["teacher"], 10, feature_shapes(student, s_taps, shape),
                          {"teacher": feature_shapes(teacher, t_taps, shape)}, num_train=64, max_epochs=2)
    with caplog.at_level(logging.WARNING, logger="kdlab.distill.crd"):
        strat = build_strategy(cfg, ctx)
    assert (strat.student_taps(), strat.source_taps()) == (s_taps, t_taps)
    if name == "crd":
        assert strat.nce_k == 63 and "nce_k" in caplog.text  # 16384 clamped to the 63 other samples
    if name == "reviewkd" and pair == "resnet32x4->resnet8x4":
        # mdistiller's ReviewKD for this pair (engine/cfg.py REVIEWKD: IN_CHANNELS = OUT_CHANNELS = [64, 128, 256,
        # 256], SHAPES = OUT_SHAPES = [1, 8, 16, 32], mid min(512, 256)): feats[1:] + pooled of the student against
        # the teacher's preact_feats[1:] + pooled
        assert (s_taps, t_taps) == (["stage1", "stage2", "stage3", "embedding"],
                                    ["preact1", "preact2", "preact3", "embedding"])
        fusion = strat.fusions["teacher"]
        assert [abf.conv1[0].in_channels for abf in fusion.abfs] == [64, 128, 256, 256]
        assert [abf.conv2[0].out_channels for abf in fusion.abfs] == [64, 128, 256, 256]
        assert fusion.out_sizes == [(32, 32), (16, 16), (8, 8), (1, 1)] and fusion.mid_channels == 256
    elif name == "reviewkd":  # a family without reference layers: the fallback, three post-activation levels
        assert (s_taps, t_taps) == (["stage1", "stage2", "prepool"], ["stage1", "stage2", "prepool"])
    x, y = torch.randn(4, *shape), torch.tensor([3, 5, 1, 0])
    with torch.no_grad(), FeatureTaps(teacher, t_taps) as t_hooks:
        src = SourceOutput(teacher(x), dict(t_hooks.features))
    with FeatureTaps(student, s_taps) as s_hooks:
        logits = student(x)
        out = StudentOutput(logits, dict(s_hooks.features), torch.tensor([0, 17, 40, 63]))
        terms, weights = strat.loss_terms(out, {"teacher": src}, y, 1.0)
    loss = total(terms, weights)
    loss.backward()
    assert torch.isfinite(loss) and terms[name].item() > 0 and weights[name] > 0
    assert strat.extra_parameters() > 0
    assert all(p.grad is not None for p in strat.parameters())
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    student.zero_grad(set_to_none=True)


def test_strategies_are_registered_under_their_names():
    assert strategy_class({"strategy": "crd"}) is CRD and CRD.name == "crd"
    assert strategy_class({"strategy": "reviewkd"}) is ReviewKD and ReviewKD.name == "reviewkd"
