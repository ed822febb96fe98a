"""The logit-based methods: DKD, DIST and logit standardization (on kd, dgkd and dkd).

Every loss is checked against a second, naive implementation written here (python loops and numpy in float64,
never the methods' helpers), at two or more settings; the custom cores pass ``torch.autograd.gradcheck`` in
float64; options are checked (bad values and unknown keys are ConfigErrors naming the value); several sources
combine by mean or sum; no source gives zero method terms; the defaults build and back-propagate on real zoo
pairs; and the logit-standardization flag leaves every existing kd / dgkd store key as it was.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdlab.distill.base import KD_OPTIONS, SourceOutput, StrategyContext, StudentOutput, build_strategy
from kdlab.distill.dgkd import DenselyGuidedKD
from kdlab.distill.dist import DIST, dist_terms
from kdlab.distill.dkd import DKD, dkd_terms
from kdlab.distill.kd import HintonKD
from kdlab.distill.losses import kd_loss, kd_loss_sum, standardize_logits
from kdlab.errors import ConfigError
from kdlab.models import FeatureTaps, build_model, feature_shapes
from tests.helpers.config import compose_config
from tests.helpers.methods import total

DKD_DEFAULTS = {"alpha": 1.0, "beta": 8.0, "temperature": 4.0, "warmup": 20, "ce_weight": 1.0, "combine": "mean",
                "logit_stand": False}
DIST_DEFAULTS = {"beta": 2.0, "gamma": 2.0, "temperature": 4.0, "combine": "mean"}


# -- naive references (float64, loops) ----------------------------------------------------------------------
def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def softmax_row(row, T=1.0) -> list[float]:
    m = max(row)
    e = [math.exp((v - m) / T) for v in row]
    s = sum(e)
    return [v / s for v in e]


def kl(p, q) -> float:
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q) if a > 0)


def naive_ce(z, y, smoothing=0.0) -> float:
    out = 0.0
    for row, c in zip(np64(z).tolist(), y.tolist()):
        logp = [math.log(p) for p in softmax_row(row)]
        out += (1 - smoothing) * -logp[c] + smoothing * -sum(logp) / len(logp)
    return out / len(y)


def naive_dkd(zs, zt, y, T) -> tuple[float, float]:
    """TCKD and NCKD by their definitions: binary (target, rest) probabilities from sums of class probabilities;
    the non-target distribution from a softmax over the logits with the target class removed."""
    tckd = nckd = 0.0
    rows = list(zip(np64(zs).tolist(), np64(zt).tolist(), y.tolist()))
    for s_row, t_row, c in rows:
        ps, pt = softmax_row(s_row, T), softmax_row(t_row, T)
        bs = [ps[c], sum(p for j, p in enumerate(ps) if j != c)]
        bt = [pt[c], sum(p for j, p in enumerate(pt) if j != c)]
        tckd += kl(bt, bs)
        s_rest = [v for j, v in enumerate(s_row) if j != c]
        t_rest = [v for j, v in enumerate(t_row) if j != c]
        nckd += kl(softmax_row(t_rest, T), softmax_row(s_rest, T))
    n = len(rows)
    return T * T * tckd / n, T * T * nckd / n


def naive_dist(zs, zt, T) -> tuple[float, float]:
    """1 - mean Pearson correlation over rows (inter) and over columns (intra), with numpy's corrcoef."""
    ps = np.array([softmax_row(r, T) for r in np64(zs).tolist()])
    pt = np.array([softmax_row(r, T) for r in np64(zt).tolist()])
    inter = 1 - np.mean([np.corrcoef(ps[i], pt[i])[0, 1] for i in range(ps.shape[0])])
    intra = 1 - np.mean([np.corrcoef(ps[:, c], pt[:, c])[0, 1] for c in range(ps.shape[1])])
    return float(inter), float(intra)


def naive_zscore(z) -> torch.Tensor:
    a = np64(z)
    return torch.from_numpy((a - a.mean(1, keepdims=True)) / (a.std(1, ddof=1, keepdims=True) + 1e-7))


def naive_kd(zs, zt, T) -> float:
    rows = list(zip(np64(zs).tolist(), np64(zt).tolist()))
    return T * T * sum(kl(softmax_row(t, T), softmax_row(s, T)) for s, t in rows) / len(rows)


def logits(seed, b=6, c=7, scale=2.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(b, c, generator=g, dtype=dtype) * scale
    zt = torch.randn(b, c, generator=g, dtype=dtype) * scale * 1.5
    y = torch.randint(0, c, (b,), generator=g)
    return zs, zt, y


def ctx(names=("t",), num_classes=7, max_epochs=40) -> StrategyContext:
    return StrategyContext("student", list(names), num_classes, max_epochs=max_epochs)


def dkd_cfg(**block) -> dict:
    return {"strategy": "dkd", "label_smoothing": 0.0, "dkd": {**DKD_DEFAULTS, **block}}


def dist_cfg(**block) -> dict:
    return {"strategy": "dist", "label_smoothing": 0.0, "dist": {**DIST_DEFAULTS, **block}}


# -- DKD ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T,seed", [(1.0, 0), (4.0, 1), (2.5, 2)])
def test_dkd_terms_equal_naive(T, seed):
    zs, zt, y = logits(seed)
    tckd, nckd = dkd_terms(zs, zt, y, T)
    ref_t, ref_n = naive_dkd(zs, zt, y, T)
    assert tckd.item() == pytest.approx(ref_t, rel=1e-5, abs=1e-7)
    assert nckd.item() == pytest.approx(ref_n, rel=1e-5, abs=1e-7)


def test_dkd_decomposes_hinton_kd():
    """Per sample, KL(p_t || p_s) = TCKD + (1 - p_t[y]) * NCKD (the paper's reformulation, eq. 4)."""
    zs, zt, y = logits(3, b=5, c=9, dtype=torch.float64)
    for i in range(5):
        tckd, nckd = dkd_terms(zs[i:i + 1], zt[i:i + 1], y[i:i + 1], 3.0)
        pt_y = softmax_row(zt[i].tolist(), 3.0)[int(y[i])]
        kd = kd_loss(zs[i:i + 1], zt[i:i + 1], 3.0)
        assert (tckd + (1 - pt_y) * nckd).item() == pytest.approx(kd.item(), rel=1e-5)


@pytest.mark.parametrize("setting", [
    {"block": {}, "progress": 0.25, "smoothing": 0.0, "w": 0.5},  # 0.25 * 40 epochs / 20 epochs = 0.5
    {"block": {"alpha": 2.0, "beta": 0.5, "temperature": 2.0, "warmup": 0, "ce_weight": 0.3}, "progress": 0.01,
     "smoothing": 0.1, "w": 1.0},
    {"block": {"warmup": 5}, "progress": 0.9, "smoothing": 0.0, "w": 1.0},
])
def test_dkd_strategy_total_equals_naive(setting):
    zs, zt, y = logits(4)
    cfg = dkd_cfg(**setting["block"])
    cfg["label_smoothing"] = setting["smoothing"]
    strat = build_strategy(cfg, ctx())
    terms, weights = strat.loss_terms(StudentOutput(zs), {"t": SourceOutput(zt)}, y, setting["progress"])
    b = cfg["dkd"]
    ref_t, ref_n = naive_dkd(zs, zt, y, b["temperature"])
    assert set(terms) == {"ce", "tckd", "nckd"}
    assert weights == pytest.approx({"ce": b["ce_weight"], "tckd": setting["w"] * b["alpha"],
                                     "nckd": setting["w"] * b["beta"]})
    expected = (b["ce_weight"] * naive_ce(zs, y, setting["smoothing"])
                + setting["w"] * (b["alpha"] * ref_t + b["beta"] * ref_n))
    assert total(terms, weights).item() == pytest.approx(expected, rel=1e-5)


def test_dkd_is_numerically_safe_with_a_confident_source():
    """A source whose target logit leads by 120 (at T = 1): in float32 the non-target probabilities underflow to
    0, so the probability-based formula takes log(0); ours works in log space and matches float64."""
    zs, zt, y = logits(5, b=4, c=6)
    zt = zt.clone()
    zt[torch.arange(4), y] = 120.0
    zs = zs.clone().requires_grad_(True)
    tckd, nckd = dkd_terms(zs, zt, y, 1.0)
    ref_t, ref_n = naive_dkd(zs, zt, y, 1.0)
    assert torch.isfinite(tckd) and torch.isfinite(nckd)
    assert tckd.item() == pytest.approx(ref_t, rel=1e-4)
    assert nckd.item() == pytest.approx(ref_n, rel=1e-4)
    (tckd + 8 * nckd).backward()
    assert torch.isfinite(zs.grad).all() and zs.grad.abs().sum() > 0
    # the hazard is real: probabilities summed in float32, then log, are not finite here
    p_t = F.softmax(zt, 1)
    rest = (p_t * (1 - F.one_hot(y, 6))).sum(1)
    assert (rest == 0).any() and not torch.isfinite(torch.log(rest)).all()


def test_dkd_gradcheck_float64():
    zs, zt, y = logits(6, b=3, c=5, dtype=torch.float64)
    zs.requires_grad_(True)
    zt.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: dkd_terms(a, b, y, 2.0), (zs, zt))
    assert torch.autograd.gradcheck(lambda a, b: dkd_terms(standardize_logits(a), standardize_logits(b), y, 2.0),
                                    (zs, zt))


def test_dkd_with_logit_standardization_equals_naive():
    zs, zt, y = logits(7)
    strat = build_strategy(dkd_cfg(logit_stand=True, temperature=2.0, warmup=0), ctx())
    terms, _ = strat.loss_terms(StudentOutput(zs), {"t": SourceOutput(zt)}, y, 0.5)
    ref_t, ref_n = naive_dkd(naive_zscore(zs), naive_zscore(zt), y, 2.0)
    assert terms["tckd"].item() == pytest.approx(ref_t, rel=1e-5)
    assert terms["nckd"].item() == pytest.approx(ref_n, rel=1e-5)
    assert terms["ce"].item() == pytest.approx(naive_ce(zs, y), rel=1e-6)  # CE on the raw logits


def test_dkd_needs_three_classes_for_nckd():
    with pytest.raises(ConfigError, match=r"distill\.dkd\.beta=8\.0 needs at least 3 classes, the data has 2"):
        build_strategy(dkd_cfg(), ctx(num_classes=2))
    strat = build_strategy(dkd_cfg(beta=0.0), ctx(num_classes=2))  # TCKD alone is defined
    zs, zt, y = logits(8, b=4, c=2)
    terms, weights = strat.loss_terms(StudentOutput(zs), {"t": SourceOutput(zt)}, y, 1.0)
    assert terms["nckd"].item() == pytest.approx(0.0, abs=1e-7) and weights["nckd"] == 0.0
    assert terms["tckd"].item() == pytest.approx(naive_dkd(zs, zt, y, 4.0)[0], rel=1e-5)


@pytest.mark.parametrize("block,match", [
    ({"alpha": -1.0}, r"distill\.dkd\.alpha must be a number >= 0, got -1\.0"),
    ({"beta": "big"}, r"distill\.dkd\.beta must be a number >= 0, got 'big'"),
    ({"temperature": 0}, r"distill\.dkd\.temperature must be a number > 0, got 0"),
    ({"warmup": -5}, r"distill\.dkd\.warmup must be a number >= 0, got -5"),
    ({"ce_weight": True}, r"distill\.dkd\.ce_weight must be a number >= 0, got True"),
    ({"combine": "max"}, r"unknown distill\.dkd\.combine 'max'; known: mean, sum"),
    ({"logit_stand": "yes"}, r"distill\.dkd\.logit_stand must be true or false, got 'yes'"),
    ({"gamma": 1.0}, (r"unknown distill\.dkd key 'gamma'; known: alpha, beta, temperature, warmup, ce_weight, "
                      r"combine, logit_stand")),
])
def test_dkd_rejects_bad_options(block, match):
    cfg = {"strategy": "dkd", "dkd": block}
    with pytest.raises(ConfigError, match=match):
        DKD.check(cfg)
    with pytest.raises(ConfigError, match=match):
        build_strategy(cfg, ctx())


# -- DIST ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T,seed,b,c", [(1.0, 0, 6, 7), (4.0, 1, 8, 5), (2.0, 2, 3, 10)])
def test_dist_terms_equal_naive(T, seed, b, c):
    zs, zt, _ = logits(seed, b=b, c=c)
    inter, intra = dist_terms(zs, zt, T)
    ref_e, ref_a = naive_dist(zs, zt, T)
    assert inter.item() == pytest.approx(ref_e, rel=1e-4, abs=1e-6)
    assert intra.item() == pytest.approx(ref_a, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("block,smoothing", [({}, 0.0), ({"beta": 0.5, "gamma": 3.0, "temperature": 1.0}, 0.2)])
def test_dist_strategy_total_equals_naive(block, smoothing):
    zs, zt, y = logits(9)
    cfg = dist_cfg(**block)
    cfg["label_smoothing"] = smoothing
    strat = build_strategy(cfg, ctx())
    terms, weights = strat.loss_terms(StudentOutput(zs), {"t": SourceOutput(zt)}, y, 0.3)
    b = cfg["dist"]
    T2 = b["temperature"] ** 2
    ref_e, ref_a = naive_dist(zs, zt, b["temperature"])
    assert set(terms) == {"ce", "inter", "intra"}
    assert weights == pytest.approx({"ce": 1.0, "inter": b["beta"] * T2, "intra": b["gamma"] * T2})
    expected = naive_ce(zs, y, smoothing) + b["beta"] * T2 * ref_e + b["gamma"] * T2 * ref_a
    assert total(terms, weights).item() == pytest.approx(expected, rel=1e-5)


def test_dist_is_zero_for_a_match_and_gradchecks():
    zs, _, _ = logits(10, dtype=torch.float64)
    inter, intra = dist_terms(zs, zs.clone(), 4.0)
    # not exactly 0: the 1e-8 in the denominator (centred probability rows have norms of about 1e-2)
    assert inter.item() == pytest.approx(0.0, abs=1e-5) and intra.item() == pytest.approx(0.0, abs=1e-5)
    zs, zt, _ = logits(11, b=4, c=5, dtype=torch.float64)
    zs.requires_grad_(True)
    zt.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: dist_terms(a, b, 2.0), (zs, zt))


def test_dist_batch_of_one_is_finite():
    """One sample: every class column is a constant, so the intra-class correlation is 0 (term 1), finitely."""
    zs = torch.randn(1, 6, requires_grad=True)
    inter, intra = dist_terms(zs, torch.randn(1, 6), 4.0)
    assert intra.item() == pytest.approx(1.0)
    (inter + intra).backward()
    assert torch.isfinite(zs.grad).all()


@pytest.mark.parametrize("block,match", [
    ({"beta": -0.1}, r"distill\.dist\.beta must be a number >= 0, got -0\.1"),
    ({"gamma": None}, r"distill\.dist\.gamma must be a number >= 0, got None"),
    ({"temperature": -4}, r"distill\.dist\.temperature must be a number > 0, got -4"),
    ({"combine": "prod"}, r"unknown distill\.dist\.combine 'prod'; known: mean, sum"),
    ({"tau": 4}, r"unknown distill\.dist key 'tau'; known: beta, gamma, temperature, combine"),
])
def test_dist_rejects_bad_options(block, match):
    with pytest.raises(ConfigError, match=match):
        build_strategy({"strategy": "dist", "dist": block}, ctx())


# -- both: sources, empty batches, options, taps ------------------------------------------------------------
@pytest.mark.parametrize("method", ["dkd", "dist"])
def test_two_sources_combine_by_mean_or_sum(method):
    zs, zt, y = logits(12)
    zt2 = zt.flip(0) * 0.7
    results = {}
    for how in ("mean", "sum"):
        cfg = dkd_cfg(combine=how, warmup=0) if method == "dkd" else dist_cfg(combine=how)
        strat = build_strategy(cfg, ctx(names=("a", "b")))
        terms, _ = strat.loss_terms(StudentOutput(zs), {"a": SourceOutput(zt), "b": SourceOutput(zt2)}, y, 1.0)
        results[how] = terms
    naive = naive_dkd if method == "dkd" else naive_dist
    args = (y, 4.0) if method == "dkd" else (4.0,)
    per_a, per_b = naive(zs, zt, *args), naive(zs, zt2, *args)
    for k, key in enumerate([t for t in results["sum"] if t != "ce"]):
        assert results["sum"][key].item() == pytest.approx(per_a[k] + per_b[k], rel=1e-4)
        assert results["mean"][key].item() == pytest.approx((per_a[k] + per_b[k]) / 2, rel=1e-4)


@pytest.mark.parametrize("cfg", [dkd_cfg(), dist_cfg(), {**KD_OPTIONS, "strategy": "kd", "logit_stand": True},
                                 {**KD_OPTIONS, "strategy": "dgkd", "logit_stand": True}])
def test_no_source_teaching_gives_zero_terms_and_a_finite_total(cfg):
    zs, _, y = logits(13)
    zs.requires_grad_(True)
    strat = build_strategy(cfg, ctx(names=("a", "b")))
    terms, weights = strat.loss_terms(StudentOutput(zs), {}, y, 0.5)
    assert all(terms[k].item() == 0.0 for k in terms if k != "ce")
    loss = total(terms, weights)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(zs.grad).all() and zs.grad.abs().sum() > 0


@pytest.mark.parametrize("cls,cfg", [(DKD, dkd_cfg()), (DIST, dist_cfg())])
def test_no_taps_and_nothing_trains(cls, cfg):
    strat = build_strategy(cfg, ctx())
    assert cls.taps(cfg) == ([], []) and strat.student_taps() == [] and strat.source_taps() == []
    assert strat.extra_parameters() == 0 and not list(strat.parameters()) and not list(strat.buffers())


@pytest.mark.parametrize("method,block", [("dkd", DKD_DEFAULTS), ("dist", DIST_DEFAULTS)])
def test_own_config_holds_the_block_not_the_kd_keys(method, block):
    cls = DKD if method == "dkd" else DIST
    composed = compose_config(f"distill={method}")["distill"]
    assert cls.own_config(composed) == {"strategy": method, "label_smoothing": 0.0, method: block}
    cls.check(composed)
    # the shared KD keys are not read, so they do not change the store key; the block's keys do
    assert cls.own_config({**composed, "temperature": 9.0, "lam": 0.1}) == cls.own_config(composed)
    changed = {**composed, method: {**composed[method], "temperature": 2.0}}
    assert cls.own_config(changed)[method]["temperature"] == 2.0


# -- on real zoo models -------------------------------------------------------------------------------------
PAIRS = {"plain10->plain2": ("plain10", "plain2", (1, 28, 28)),
         "resnet32x4->resnet8x4": ("resnet32x4", "resnet8x4", (3, 32, 32))}


@pytest.fixture(scope="module")
def zoo():
    torch.manual_seed(0)
    out = {}
    for key, (t_name, s_name, shape) in PAIRS.items():
        kw = {"in_channels": shape[0], "input_size": shape[1]}
        out[key] = (build_model(t_name, 10, **kw).eval(), build_model(s_name, 10, **kw), shape)
    return out


@pytest.mark.parametrize("pair", list(PAIRS))
@pytest.mark.parametrize("method", ["dkd", "dist", "kd_logit_stand"])
def test_defaults_build_and_backpropagate_on_zoo_pairs(zoo, pair, method):
    teacher, student, shape = zoo[pair]
    overrides = ("distill=kd", "distill.logit_stand=true") if method == "kd_logit_stand" else (f"distill={method}",)
    cfg = compose_config(*overrides)["distill"]
    context = StrategyContext("student", ["teacher"], 10, feature_shapes(student, "prepool", shape),
                              {"teacher": feature_shapes(teacher, "prepool", shape)}, num_train=64, max_epochs=30)
    strat = build_strategy(cfg, context)
    assert strat.extra_parameters() == 0
    x, y = torch.randn(4, *shape), torch.tensor([0, 3, 5, 9])
    with torch.no_grad():
        src = SourceOutput(teacher(x))
    student.zero_grad()
    with FeatureTaps(student, strat.student_taps() or ["prepool"]) as taps:
        z = student(x)
        terms, weights = strat.loss_terms(StudentOutput(z, dict(taps.features), torch.arange(4)),
                                          {"teacher": src}, y, 0.5)
    loss = total(terms, weights)
    assert torch.isfinite(loss) and all(torch.isfinite(t) for t in terms.values())
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters() if p.requires_grad)


# -- logit standardization ----------------------------------------------------------------------------------
def test_standardize_logits_is_the_z_score():
    zs, _, _ = logits(14, dtype=torch.float64)
    torch.testing.assert_close(standardize_logits(zs), naive_zscore(zs), rtol=1e-12, atol=1e-12)
    out = standardize_logits(zs)
    torch.testing.assert_close(out.mean(1), torch.zeros(6, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(out.std(1), torch.ones(6, dtype=torch.float64), atol=1e-6, rtol=0)
    z = zs.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(standardize_logits, (z,))


def test_standardize_constant_logits_is_zero_with_finite_gradient():
    z = torch.zeros(3, 10, requires_grad=True)  # e.g. a zero-initialized classifier
    out = standardize_logits(z)
    assert torch.equal(out, torch.zeros(3, 10))
    kd_loss(z, torch.randn(3, 10), 2.0, standardize=True).backward()
    assert torch.isfinite(z.grad).all()


@pytest.mark.parametrize("T,reduction", [(2.0, "batchmean"), (1.0, "batchmean"), (3.0, "mean_legacy")])
def test_standardized_kd_equals_naive(T, reduction):
    zs, zt, _ = logits(15)
    got = kd_loss(zs, zt, T, reduction, standardize=True)
    expected = naive_kd(naive_zscore(zs), naive_zscore(zt), T) / (1 if reduction == "batchmean" else zs.shape[1])
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_standardized_kd_is_invariant_to_shift_and_scale():
    zs, zt, _ = logits(16)
    g = torch.Generator().manual_seed(1)
    shift_s, shift_t = torch.randn(6, 1, generator=g) * 10, torch.randn(6, 1, generator=g) * 10
    scale_s, scale_t = torch.rand(6, 1, generator=g) * 5 + 0.2, torch.rand(6, 1, generator=g) * 5 + 0.2
    ref = kd_loss(zs, zt, 2.0, standardize=True)
    moved = kd_loss(scale_s * zs + shift_s, scale_t * zt + shift_t, 2.0, standardize=True)
    assert moved.item() == pytest.approx(ref.item(), rel=1e-5)
    assert kd_loss(3 * zs, zt, 2.0).item() != pytest.approx(kd_loss(zs, zt, 2.0).item(), rel=1e-2)  # plain KD is not


def test_default_kd_loss_is_unchanged():
    """standardize=False runs exactly the former computation (the same ops: bit-identical results)."""
    zs, zt, _ = logits(17)
    zts = [zt, zt * 0.5, zt.flip(0)]
    for reduction in ("batchmean", "mean_legacy"):
        old_one = F.kl_div(F.log_softmax(zs / 4.0, dim=1), F.softmax(zt / 4.0, dim=1),
                           reduction="batchmean" if reduction == "batchmean" else "mean") * 16.0
        assert torch.equal(kd_loss(zs, zt, 4.0, reduction), old_one)
        log_p_s = F.log_softmax(zs / 4.0, dim=1)
        log_p_t = F.log_softmax(torch.stack(zts) / 4.0, dim=2)
        denom = 6 * (1 if reduction == "batchmean" else 7)
        old_sum = (log_p_t.exp() * (log_p_t - log_p_s)).sum() / denom * 16.0
        assert torch.equal(kd_loss_sum(zs, zts, 4.0, reduction), old_sum)


def test_standardized_kd_sum_equals_the_sum_of_standardized_kd():
    zs, zt, _ = logits(18)
    zts = [zt, zt * 0.3 + 1, zt.flip(0)]
    got = kd_loss_sum(zs, zts, 2.0, standardize=True)
    assert got.item() == pytest.approx(sum(naive_kd(naive_zscore(zs), naive_zscore(t), 2.0) for t in zts), rel=1e-5)
    assert kd_loss_sum(zs, zts[:1], 2.0, standardize=True).item() == pytest.approx(
        naive_kd(naive_zscore(zs), naive_zscore(zt), 2.0), rel=1e-5)


@pytest.mark.parametrize("strategy,n", [("kd", 1), ("kd", 2), ("dgkd", 3)])
def test_kd_and_dgkd_with_the_flag_equal_naive(strategy, n):
    zs, zt, y = logits(19)
    zts = [zt, zt * 0.5 - 2, zt.flip(0)][:n]
    names = [f"s{i}" for i in range(n)]
    cfg = {**KD_OPTIONS, "strategy": strategy, "temperature": 2.0, "lam": 0.9, "logit_stand": True}
    strat = build_strategy(cfg, ctx(names=names))
    terms, weights = strat.loss_terms(StudentOutput(zs), {k: SourceOutput(z) for k, z in zip(names, zts)}, y, 0.0)
    per = [naive_kd(naive_zscore(zs), naive_zscore(z), 2.0) for z in zts]
    expected = sum(per) / (n if strategy == "kd" else 1)  # kd: mean over sources; dgkd: sum
    assert terms["kd"].item() == pytest.approx(expected, rel=1e-5)
    assert weights["kd"] == pytest.approx(0.9)


def test_kd_with_the_flag_trains():
    torch.manual_seed(0)
    zt = torch.randn(8, 10) * 4
    y = zt.argmax(1)
    z = torch.nn.Parameter(torch.randn(8, 10))
    strat = build_strategy({**KD_OPTIONS, "strategy": "kd", "temperature": 2.0, "lam": 0.9, "logit_stand": True},
                           ctx(names=("t",), num_classes=10))
    opt = torch.optim.SGD([z], lr=5.0)  # standardized logits: the gradient scales with 1 / std(z)
    history = []
    for _ in range(30):
        terms, weights = strat.loss_terms(StudentOutput(z), {"t": SourceOutput(zt)}, y, 0.0)
        history.append(terms["kd"].item())
        opt.zero_grad()
        total(terms, weights).backward()
        opt.step()
    assert history[-1] < 0.25 * history[0] and all(b <= a + 1e-6 for a, b in itertools.pairwise(history))


TODAY = {"temperature": 4.0, "lam": 0.5, "lam_schedule": "constant", "lam_end": None, "lam_milestones": [0.5],
         "kl_reduction": "batchmean", "label_smoothing": 0.0}


@pytest.mark.parametrize("cls,extra", [(HintonKD, {}), (DenselyGuidedKD, {"ce_weight": "code"})])
def test_logit_stand_is_hashed_only_when_set(cls, extra):
    """Every existing kd / dgkd stage keeps its store key: own_config without the flag is what it was."""
    composed = compose_config(f"distill={cls.name}")["distill"]
    assert composed["logit_stand"] is False
    assert cls.own_config(composed) == {"strategy": cls.name, **TODAY, **extra}
    assert cls.own_config({k: v for k, v in composed.items() if k != "logit_stand"}) == cls.own_config(composed)
    flagged = cls.own_config({**composed, "logit_stand": True})
    assert flagged == {"strategy": cls.name, **TODAY, **extra, "logit_stand": True}
    # what the stage builds from (own_config) still carries the flag into the strategy
    assert build_strategy(flagged, ctx()).logit_stand is True
    assert build_strategy(cls.own_config(composed), ctx()).logit_stand is False


@pytest.mark.parametrize("strategy", ["kd", "dgkd"])
def test_logit_stand_must_be_a_boolean(strategy):
    with pytest.raises(ConfigError, match=r"distill\.logit_stand must be true or false, got 'yes'"):
        build_strategy({"strategy": strategy, "logit_stand": "yes"}, ctx())
