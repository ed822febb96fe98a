"""The feature-based methods FitNet, AT, SP, PKT and RKD: each loss against a naive second implementation
(loops and plain numpy formulas) at two or more settings, gradients of the custom losses in float64, the
config checks, several sources (mean / sum), no source at all, batches of one, trainable parts, and the
defaults on real zoo pairs (plain10 -> plain2 on 1x28x28, resnet32x4 -> resnet8x4 on 3x32x32)."""
from __future__ import annotations

import functools
import itertools

import numpy as np
import pytest
import torch
from torch import nn

from kdlab.distill import SourceOutput, StudentOutput, build_strategy
from kdlab.distill.at import AttentionTransfer, at_loss
from kdlab.distill.base import StrategyContext, strategy_class
from kdlab.distill.fitnet import FitNet
from kdlab.distill.pkt import pkt_loss
from kdlab.distill.rkd import rkd_losses
from kdlab.distill.sp import sp_loss
from kdlab.errors import ConfigError
from kdlab.models import FeatureTaps, build_model, feature_shapes
from tests.helpers.methods import cfg_of, composed_distill, hand_ce, hand_conv, n

METHODS = ("fitnet", "at", "sp", "pkt", "rkd")
METHOD_TERMS = {"fitnet": ["fitnet"], "at": ["at"], "sp": ["sp"], "pkt": ["pkt"], "rkd": ["rkd_dist", "rkd_angle"]}


def make(name: str, s_shapes: dict, t_shapes: dict[str, dict], **block):
    ctx = StrategyContext("student", list(t_shapes), 10, s_shapes, t_shapes)
    return build_strategy(cfg_of(name, **block), ctx)


def run(strat, f_s: dict, sources: dict[str, dict], logits=None, y=None):
    b = next(iter(f_s.values())).shape[0]
    logits = torch.randn(b, 10) if logits is None else logits
    y = torch.arange(b) % 10 if y is None else y
    src = {n: SourceOutput(torch.randn(b, 10), feats) for n, feats in sources.items()}
    return strat.loss_terms(StudentOutput(logits, f_s), src, y, 0.0)


# -- naive implementations (numpy, loops) ---------------------------------------------------------------------------
def hand_pool(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Average pooling by an integer factor (what adaptive pooling does when the sizes divide)."""
    b, c, h, w = x.shape
    fh, fw = h // size[0], w // size[1]
    return x.reshape(b, c, size[0], fh, size[1], fw).mean((3, 5))


def hand_bn_train(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    mean = x.mean((0, 2, 3), keepdims=True)
    var = ((x - mean) ** 2).mean((0, 2, 3), keepdims=True)  # biased, as BN normalizes in training
    return (x - mean) / np.sqrt(var + eps) * gamma.reshape(1, -1, 1, 1) + beta.reshape(1, -1, 1, 1)


def hand_fitnet(reg: nn.Sequential, f_s, f_t, relu: bool) -> float:
    conv, bn = reg[0], reg[1]
    out = hand_bn_train(hand_conv(n(f_s), n(conv.weight)), n(bn.weight), n(bn.bias))
    if relu:
        out = np.maximum(out, 0.0)
    t = n(f_t)
    if out.shape[-2:] != t.shape[-2:]:
        # pooled when larger; bilinear upsampling of a 1x1 map is its value everywhere
        out = hand_pool(out, t.shape[-2:]) if out.shape[-1] > t.shape[-1] else np.broadcast_to(out, t.shape)
    return float(((out - t) ** 2).sum() / t.size)


def hand_attention(f: np.ndarray, p: float, absolute: bool = False) -> np.ndarray:
    """mean_c F^p (the references' ``feat.pow(p)``; ``absolute``: |F|^p) per position, L2-normalized."""
    b, c, h, w = f.shape
    q = np.zeros((b, h * w))
    for i in range(b):
        for y in range(h):
            for x in range(w):
                q[i, y * w + x] = sum((abs(f[i, ch, y, x]) if absolute else f[i, ch, y, x]) ** p
                                      for ch in range(c)) / c
        q[i] /= np.sqrt((q[i] ** 2).sum())
    return q


def hand_at(pairs: list[tuple[np.ndarray, np.ndarray]], p: float, absolute: bool = False) -> float:
    total = 0.0
    for fs, ft in pairs:
        size = (min(fs.shape[2], ft.shape[2]), min(fs.shape[3], ft.shape[3]))
        fs, ft = hand_pool(fs, size), hand_pool(ft, size)
        qs, qt = hand_attention(fs, p, absolute), hand_attention(ft, p, absolute)
        total += ((qs - qt) ** 2).sum() / qs.size  # mean over batch and positions
    return total


def hand_sp(fs: np.ndarray, ft: np.ndarray) -> float:
    b = fs.shape[0]

    def gram(f):
        a = f.reshape(b, -1)
        g = np.array([[float(np.dot(a[i], a[j])) for j in range(b)] for i in range(b)])
        return np.array([row / np.sqrt((row ** 2).sum()) for row in g])

    return float(((gram(fs) - gram(ft)) ** 2).sum() / b ** 2)


def hand_pkt(fs: np.ndarray, ft: np.ndarray, eps: float) -> float:
    b = fs.shape[0]

    def probs(f):
        a = f.reshape(b, -1)
        a = [v / (np.sqrt((v ** 2).sum()) + eps) for v in a]
        k = np.array([[(1.0 + float(np.dot(a[i], a[j]))) / 2.0 for j in range(b)] for i in range(b)])
        return k / k.sum(1, keepdims=True)

    ps, pt = probs(fs), probs(ft)
    return float(sum(pt[i, j] * np.log((pt[i, j] + eps) / (ps[i, j] + eps))
                     for i in range(b) for j in range(b)) / b ** 2)


def huber(a: float, b: float) -> float:
    d = abs(a - b)
    return 0.5 * d * d if d < 1.0 else d - 0.5


def hand_rkd(fs: np.ndarray, ft: np.ndarray, squared: bool) -> tuple[float, float]:
    b = fs.shape[0]
    es, et = fs.reshape(b, -1), ft.reshape(b, -1)

    def dists(e):
        d = np.zeros((b, b))
        for i, j in itertools.permutations(range(b), 2):
            d[i, j] = ((e[i] - e[j]) ** 2).sum() if squared else np.sqrt(((e[i] - e[j]) ** 2).sum())
        return d / (d.sum() / (b * (b - 1)))

    def cosines(e):
        a = np.zeros((b, b, b))
        for i, j, k in itertools.product(range(b), repeat=3):
            if j != i and k != i:  # degenerate triplets count as 0
                u, v = e[j] - e[i], e[k] - e[i]
                a[i, j, k] = np.dot(u, v) / np.sqrt(np.dot(u, u) * np.dot(v, v))
        return a

    ds, dt = dists(es), dists(et)
    as_, at = cosines(es), cosines(et)
    dist = sum(huber(ds[i, j], dt[i, j]) for i in range(b) for j in range(b)) / b ** 2
    angle = sum(huber(as_[idx], at[idx]) for idx in itertools.product(range(b), repeat=3)) / b ** 3
    return dist, angle


# -- FitNet ---------------------------------------------------------------------------------------------------------
def _randomize_bn(strat):
    with torch.no_grad():
        for reg in strat.regressors.values():
            reg[1].weight.uniform_(0.5, 1.5)
            reg[1].bias.uniform_(-0.5, 0.5)


@pytest.mark.parametrize("kernel_size,relu,t_hw", [(1, False, 6), (3, True, 3), (1, True, 1), (3, False, 12)])
def test_fitnet_loss_against_hand_computation(kernel_size, relu, t_hw):
    """Equal sizes; teacher smaller (2x2 pooling); student map larger to a 1x1 hint; student 1x1 map upsampled."""
    torch.manual_seed(0)
    s_hw = 1 if t_hw == 12 else 6
    strat = make("fitnet", {"stage2": (3, s_hw, s_hw)}, {"t": {"stage2": (4, t_hw, t_hw)}},
                 kernel_size=kernel_size, relu=relu, feat_weight=7.0, ce_weight=0.5)
    _randomize_bn(strat)
    f_s, f_t = torch.randn(4, 3, s_hw, s_hw), torch.randn(4, 4, t_hw, t_hw)
    logits, y = torch.randn(4, 10), torch.tensor([1, 2, 3, 9])
    terms, weights = run(strat, {"stage2": f_s}, {"t": {"stage2": f_t}}, logits, y)
    assert weights == {"ce": 0.5, "fitnet": 7.0}
    expected = hand_fitnet(strat.regressors["t"], f_s, f_t, relu)
    assert terms["fitnet"].item() == pytest.approx(expected, rel=1e-5)
    assert terms["ce"].item() == pytest.approx(hand_ce(logits, y), rel=1e-5)


def hand_conv2d(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int, pad: int) -> np.ndarray:
    """A convolution with bias by loops over the kernel offsets (any kernel, stride and zero padding)."""
    n_, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    xp = np.zeros((n_, c, h + 2 * pad, wd + 2 * pad))
    xp[:, :, pad:pad + h, pad:pad + wd] = x
    oh, ow = (h + 2 * pad - kh) // stride + 1, (wd + 2 * pad - kw) // stride + 1
    out = np.zeros((n_, o, oh, ow)) + b.reshape(1, -1, 1, 1)
    for dy in range(kh):
        for dx in range(kw):
            patch = xp[:, :, dy:dy + stride * (oh - 1) + 1:stride, dx:dx + stride * (ow - 1) + 1:stride]
            out += np.einsum("oc,bchw->bohw", w[:, :, dy, dx], patch)
    return out


def hand_conv_transpose2d(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int, pad: int) -> np.ndarray:
    """A transposed convolution (weight (in, out, k, k)): every input pixel scatters its kernel, then the border
    ``pad`` is cut."""
    n_, _, h, wd = x.shape
    _, o, k, _ = w.shape
    full = np.zeros((n_, o, (h - 1) * stride + k, (wd - 1) * stride + k))
    for i in range(h):
        for j in range(wd):
            full[:, :, i * stride:i * stride + k, j * stride:j * stride + k] += np.einsum("bc,cokl->bokl", x[:, :, i, j], w)
    return full[:, :, pad:full.shape[2] - pad, pad:full.shape[3] - pad] + b.reshape(1, -1, 1, 1)


@pytest.mark.parametrize("s_hw,t_hw,kind", [(6, 6, "1x1"), (8, 4, "3x3 stride 2"), (4, 8, "4x4 transposed"),
                                            (6, 4, "3x3 valid")])
@pytest.mark.parametrize("relu", [True, False])
def test_fitnet_conv_reg_against_hand_computation(s_hw, t_hw, kind, relu):
    """kernel_size auto (the default) is mdistiller's / RepDistiller's ConvReg: the conv chosen by the sizes (student
    twice the source: 3x3 stride 2, pad 1; half: 4x4 transposed stride 2, pad 1; else (1 + H_s - H_t)^2 valid),
    with bias, then BN (batch statistics) and the ReLU."""
    torch.manual_seed(3)
    strat = make("fitnet", {"stage2": (3, s_hw, s_hw)}, {"t": {"stage2": (4, t_hw, t_hw)}}, relu=relu)
    reg = strat.regressors["t"]
    conv = reg.conv
    expected_conv = {"1x1": ((1, 1), (1, 1), (0, 0)), "3x3 stride 2": ((3, 3), (2, 2), (1, 1)),
                     "4x4 transposed": ((4, 4), (2, 2), (1, 1)), "3x3 valid": ((3, 3), (1, 1), (0, 0))}[kind]
    assert (conv.kernel_size, conv.stride, conv.padding) == expected_conv and conv.bias is not None
    assert isinstance(conv, nn.ConvTranspose2d) == (kind == "4x4 transposed")
    assert isinstance(reg.relu, nn.ReLU if relu else nn.Identity)
    with torch.no_grad():
        reg.bn.weight.uniform_(0.5, 1.5)
        reg.bn.bias.uniform_(-0.5, 0.5)
        conv.bias.uniform_(-0.5, 0.5)
    f_s, f_t = torch.randn(4, 3, s_hw, s_hw), torch.randn(4, 4, t_hw, t_hw)
    terms, _ = run(strat, {"stage2": f_s}, {"t": {"stage2": f_t}})
    if kind == "4x4 transposed":
        out = hand_conv_transpose2d(n(f_s), n(conv.weight), n(conv.bias), 2, 1)
    else:
        out = hand_conv2d(n(f_s), n(conv.weight), n(conv.bias), conv.stride[0], conv.padding[0])
    out = hand_bn_train(out, n(reg.bn.weight), n(reg.bn.bias))
    out = np.maximum(out, 0.0) if relu else out
    assert out.shape == tuple(f_t.shape)
    assert terms["fitnet"].item() == pytest.approx(float(((out - n(f_t)) ** 2).mean()), rel=1e-5)


def test_fitnet_conv_reg_without_a_reference_case_is_1x1_then_bilinear():
    """A student map smaller than the source's, not by half (ConvReg raises there): a 1x1 conv, then the size."""
    strat = make("fitnet", {"stage2": (3, 3, 3)}, {"t": {"stage2": (4, 8, 8)}})
    assert strat.regressors["t"].conv.kernel_size == (1, 1)
    terms, _ = run(strat, {"stage2": torch.randn(2, 3, 3, 3)}, {"t": {"stage2": torch.randn(2, 4, 8, 8)}})
    assert torch.isfinite(terms["fitnet"])


def test_fitnet_regressors_per_source_train_and_are_counted():
    strat = make("fitnet", {"stage2": (16, 7, 7)}, {"a": {"stage2": (64, 7, 7)}, "b": {"stage2": (32, 14, 14)}},
                 kernel_size=3, relu=False)
    assert list(strat.regressors) == ["a", "b"]
    for name, c_t in (("a", 64), ("b", 32)):
        conv, bn = strat.regressors[name][0], strat.regressors[name][1]
        assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.padding) == (16, c_t, (3, 3), (1, 1))
        assert isinstance(bn, nn.BatchNorm2d) and len(strat.regressors[name]) == 2  # relu: false
    assert strat.extra_parameters() == sum(16 * c * 9 + 2 * c for c in (64, 32))
    # the regressors get gradients; the teacher's features are constants
    f_s = torch.randn(3, 16, 7, 7, requires_grad=True)
    terms, weights = run(strat, {"stage2": f_s}, {"a": {"stage2": torch.randn(3, 64, 7, 7)},
                                                  "b": {"stage2": torch.randn(3, 32, 14, 14)}})
    sum(weights[k] * v for k, v in terms.items()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in strat.regressors.parameters())
    assert f_s.grad is not None
    one = make("fitnet", {"stage2": (16, 7, 7)}, {"a": {"stage2": (64, 7, 7)}})  # mdistiller's ConvReg: 1x1 + bias
    assert one.extra_parameters() == 16 * 64 + 64 + 2 * 64
    assert isinstance(one.regressors["a"].relu, nn.ReLU)  # relu: true by default, as mdistiller


def test_fitnet_needs_maps_and_known_shapes():
    with pytest.raises(ConfigError, match=r"FitNet needs 4-d feature maps .* 'embedding' .*\(16,\) and \(64,\)"):
        make("fitnet", {"embedding": (16,)}, {"t": {"embedding": (64,)}}, student_tap="embedding",
             source_tap="embedding")
    with pytest.raises(ConfigError, match="FitNet needs 4-d feature maps"):
        make("fitnet", {}, {"t": {"stage2": (8, 4, 4)}})


# -- AT -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("p,absolute", [(2.0, False), (3.0, False), (3.0, True), (2.5, True), (1, False)])
def test_at_loss_against_hand_computation(p, absolute):
    """Three layers: equal sizes; student larger (pooled 8 -> 4); source larger (pooled 4 -> 2). Signed maps, so
    an odd p tells F^p (the references, ``abs: false``) from |F|^p (``abs: true``)."""
    torch.manual_seed(1)
    s_shapes = {"stage1": (3, 4, 4), "stage2": (5, 8, 8), "prepool": (2, 2, 2)}
    t_shapes = {"stage1": (6, 4, 4), "stage2": (4, 4, 4), "prepool": (3, 4, 4)}
    strat = make("at", s_shapes, {"t": t_shapes}, p=p, abs=absolute, feat_weight=10.0,
                 student_taps=list(s_shapes), source_taps=list(t_shapes))
    f_s = {k: torch.randn(3, *s) for k, s in s_shapes.items()}
    f_t = {k: torch.randn(3, *s) for k, s in t_shapes.items()}
    terms, weights = run(strat, f_s, {"t": f_t})
    expected = hand_at([(n(f_s[k]), n(f_t[k])) for k in ("stage1", "stage2", "prepool")], p, absolute)
    assert weights["at"] == 10.0 and weights["ce"] == 1.0
    assert terms["at"].item() == pytest.approx(expected, rel=1e-5)
    if p == 3.0:  # the two forms differ on signed maps for an odd p
        other = hand_at([(n(f_s[k]), n(f_t[k])) for k in ("stage1", "stage2", "prepool")], p, not absolute)
        assert abs(other - expected) > 1e-3 * expected


def test_at_abs_is_hashed_only_where_it_can_change_the_loss():
    own = AttentionTransfer.own_config
    assert "abs" not in own(cfg_of("at"))["at"] and "abs" not in own(cfg_of("at", p=4, abs=True))["at"]
    assert own(cfg_of("at", p=2, abs=True)) == own(cfg_of("at", p=2))  # F^2 = |F|^2: the same stage
    assert own(cfg_of("at", p=3))["at"]["abs"] is False and own(cfg_of("at", p=3, abs=True))["at"]["abs"] is True
    assert own(cfg_of("at", p=2.5, abs=True))["at"]["abs"] is True
    with pytest.raises(ConfigError, match=r"distill.at.p=2.5 is not an integer: F\^p of a negative value is "
                                          r"undefined; set distill.at.abs=true"):
        AttentionTransfer.check(cfg_of("at", p=2.5))


def test_at_pairs_taps_by_position():
    torch.manual_seed(2)
    strat = make("at", {"stage1": (2, 4, 4), "stage2": (2, 2, 2)}, {"t": {"stage3": (3, 4, 4), "prepool": (3, 2, 2)}},
                 student_taps=["stage1", "stage2"], source_taps=["stage3", "prepool"])
    assert (strat.student_taps(), strat.source_taps()) == (["stage1", "stage2"], ["stage3", "prepool"])
    f_s = {"stage1": torch.randn(2, 2, 4, 4), "stage2": torch.randn(2, 2, 2, 2)}
    f_t = {"stage3": torch.randn(2, 3, 4, 4), "prepool": torch.randn(2, 3, 2, 2)}
    terms, _ = run(strat, f_s, {"t": f_t})
    expected = hand_at([(n(f_s["stage1"]), n(f_t["stage3"])), (n(f_s["stage2"]), n(f_t["prepool"]))], 2.0)
    assert terms["at"].item() == pytest.approx(expected, rel=1e-5)
    assert strat.extra_parameters() == 0
    # taps: known from the config alone, each point once
    cfg = cfg_of("at", student_taps=["stage2", "stage2"], source_taps=["stage2", "stage3"])
    assert AttentionTransfer.taps(cfg) == (["stage2"], ["stage2", "stage3"])
    with pytest.raises(ConfigError, match=r"AttentionTransfer needs 4-d feature maps .* 'embedding'"):
        make("at", {"embedding": (8,)}, {"t": {"embedding": (8,)}}, student_taps=["embedding"],
             source_taps=["embedding"])


# -- SP, PKT, RKD ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("s_shape,t_shape", [((4, 3, 3), (6, 2, 2)), ((7,), (3,))])
def test_sp_loss_against_hand_computation(s_shape, t_shape):
    torch.manual_seed(3)
    strat = make("sp", {"prepool": s_shape}, {"t": {"prepool": t_shape}}, gamma=5.0)
    f_s, f_t = torch.randn(5, *s_shape), torch.rand(5, *t_shape)
    terms, weights = run(strat, {"prepool": f_s}, {"t": {"prepool": f_t}})
    assert weights["sp"] == 5.0
    assert terms["sp"].item() == pytest.approx(hand_sp(n(f_s), n(f_t)), rel=1e-5)


@pytest.mark.parametrize("eps,dims", [(1e-7, (8, 5)), (1e-2, (3, 12))])
def test_pkt_loss_against_hand_computation(eps, dims):
    torch.manual_seed(4)
    strat = make("pkt", {"embedding": (dims[0],)}, {"t": {"embedding": (dims[1],)}}, eps=eps)
    f_s, f_t = torch.randn(6, dims[0]), torch.randn(6, dims[1])
    terms, weights = run(strat, {"embedding": f_s}, {"t": {"embedding": f_t}})
    assert weights["pkt"] == 30000.0
    assert terms["pkt"].item() == pytest.approx(hand_pkt(n(f_s), n(f_t), eps), rel=1e-4)


@pytest.mark.parametrize("squared,scale", [(False, 1.0), (True, 0.2), (False, 5.0)])
def test_rkd_losses_against_hand_computation(squared, scale):
    torch.manual_seed(5)
    strat = make("rkd", {"embedding": (6,)}, {"t": {"embedding": (9,)}}, squared=squared)
    f_s, f_t = scale * torch.randn(5, 6), torch.randn(5, 9)
    terms, weights = run(strat, {"embedding": f_s}, {"t": {"embedding": f_t}})
    dist, angle = hand_rkd(n(f_s), n(f_t), squared)
    assert weights == {"ce": 1.0, "rkd_dist": 25.0, "rkd_angle": 50.0}
    assert terms["rkd_dist"].item() == pytest.approx(dist, rel=1e-4)
    assert terms["rkd_angle"].item() == pytest.approx(angle, rel=1e-4)


def test_rkd_is_invariant_to_scale_rotation_and_translation():
    torch.manual_seed(6)
    e = torch.randn(6, 4, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))
    dist, angle = rkd_losses(3.0 * e @ q + 1.5, e)
    assert dist.item() == pytest.approx(0.0, abs=1e-10) and angle.item() == pytest.approx(0.0, abs=1e-10)


def test_custom_losses_gradcheck_in_float64():
    torch.manual_seed(7)

    def x(*shape):
        return torch.randn(*shape, dtype=torch.float64, requires_grad=True)

    t4, t2 = torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: at_loss(a, t4, 2.0), (x(3, 3, 4, 4),))
    assert torch.autograd.gradcheck(lambda a: at_loss(a, t4, 3.0), (x(3, 3, 8, 8),))  # pooled to 4x4
    assert torch.autograd.gradcheck(lambda a: sp_loss(a, t4), (x(3, 2, 2, 2),))
    assert torch.autograd.gradcheck(lambda a: pkt_loss(a, t2), (x(4, 3),))
    assert torch.autograd.gradcheck(lambda a: rkd_losses(a, t2)[0], (x(4, 3),))
    assert torch.autograd.gradcheck(lambda a: rkd_losses(a, t2, squared=True)[0], (x(4, 3),))
    assert torch.autograd.gradcheck(lambda a: rkd_losses(a, t2)[1], (x(4, 3),))


@pytest.mark.parametrize("name", ["sp", "pkt", "rkd"])
def test_relational_losses_of_a_batch_of_one_are_zero(name):
    tap = "prepool" if name == "sp" else "embedding"
    strat = make(name, {tap: (4,)}, {"t": {tap: (6,)}})
    f_s = torch.randn(1, 4, requires_grad=True)
    terms, weights = run(strat, {tap: f_s}, {"t": {tap: torch.randn(1, 6)}})
    for term in METHOD_TERMS[name]:
        assert terms[term].item() == 0.0
    total = sum(weights[k] * v for k, v in terms.items())
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(f_s.grad).all()


# -- shared behaviour -----------------------------------------------------------------------------------------------
SHAPES = {"fitnet": ({"stage2": (3, 4, 4)}, {"stage2": (5, 4, 4)}),
          "at": ({"stage1": (3, 4, 4), "stage2": (3, 2, 2), "prepool": (3, 2, 2)},
                 {"stage1": (2, 4, 4), "stage2": (2, 4, 4), "prepool": (2, 2, 2)}),
          "sp": ({"prepool": (3, 2, 2)}, {"prepool": (4, 2, 2)}),
          "pkt": ({"embedding": (6,)}, {"embedding": (4,)}),
          "rkd": ({"embedding": (6,)}, {"embedding": (4,)})}


def _features(shapes: dict, b: int = 4, grad: bool = False) -> dict:
    return {k: torch.randn(b, *s, requires_grad=grad) for k, s in shapes.items()}


@pytest.mark.parametrize("name", METHODS)
def test_combine_mean_and_sum_over_two_sources(name):
    torch.manual_seed(8)
    s_shapes, t_shapes = SHAPES[name]
    f_s = _features(s_shapes)
    src = {"a": _features(t_shapes), "b": _features(t_shapes)}
    mean = make(name, s_shapes, {"a": t_shapes, "b": t_shapes})
    total = make(name, s_shapes, {"a": t_shapes, "b": t_shapes}, combine="sum")
    total.load_state_dict(mean.state_dict())  # FitNet: the same regressors
    singles = {}
    for k in src:  # each source alone, through the same (copied) connector
        one = make(name, s_shapes, {k: t_shapes})
        if name == "fitnet":
            one.regressors[k].load_state_dict(mean.regressors[k].state_dict())
        singles[k] = run(one, f_s, {k: src[k]})[0]
    t_mean, t_sum = run(mean, f_s, src)[0], run(total, f_s, src)[0]
    for term in METHOD_TERMS[name]:
        per = [singles[k][term].item() for k in src]
        assert t_mean[term].item() == pytest.approx(sum(per) / 2, rel=1e-5)
        assert t_sum[term].item() == pytest.approx(sum(per), rel=1e-5)


@pytest.mark.parametrize("name", METHODS)
def test_no_teaching_source_gives_zero_terms_and_a_differentiable_total(name):
    s_shapes, t_shapes = SHAPES[name]
    strat = make(name, s_shapes, {"a": t_shapes, "b": t_shapes})
    logits = torch.randn(4, 10, requires_grad=True)
    terms, weights = run(strat, _features(s_shapes), {}, logits, torch.tensor([0, 1, 2, 3]))
    assert set(terms) == {"ce", *METHOD_TERMS[name]} == set(weights)
    assert all(terms[t].item() == 0.0 for t in METHOD_TERMS[name])
    total = sum(weights[k] * v for k, v in terms.items())
    total.backward()
    assert torch.isfinite(total) and logits.grad is not None and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("name", METHODS)
def test_label_smoothing_and_ce_weight(name):
    s_shapes, t_shapes = SHAPES[name]
    cfg = cfg_of(name, ce_weight=0.25)
    cfg["label_smoothing"] = 0.1
    strat = build_strategy(cfg, StrategyContext("student", ["t"], 10, s_shapes, {"t": t_shapes}))
    logits, y = torch.randn(4, 10), torch.tensor([0, 1, 2, 3])
    terms, weights = run(strat, _features(s_shapes), {"t": _features(t_shapes)}, logits, y)
    z = n(logits)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    smooth = np.mean([-(0.9 * logp[i, c] + 0.1 * logp[i].mean()) for i, c in enumerate(y.tolist())])
    assert terms["ce"].item() == pytest.approx(smooth, rel=1e-5) and weights["ce"] == 0.25
    if name != "fitnet":
        assert strat.extra_parameters() == 0


BAD = [
    ("fitnet", {"feat_weight": -1.0}, "distill.fitnet.feat_weight must be a number >= 0, got -1.0"),
    ("fitnet", {"kernel_size": 2}, r"distill.fitnet.kernel_size must be auto \(mdistiller's ConvReg\), 1 or 3, got 2"),
    ("fitnet", {"relu": "yes"}, "distill.fitnet.relu must be true or false, got 'yes'"),
    ("fitnet", {"student_tap": ""}, "distill.fitnet.student_tap must be a feature point name"),
    ("at", {"p": 0}, "distill.at.p must be a number > 0, got 0"),
    ("at", {"source_taps": ["stage1"]}, "must have the same length"),
    ("at", {"student_taps": []}, r"distill.at.student_taps must be a non-empty list of feature points .*, got \[\]"),
    ("at", {"combine": "max"}, "unknown distill.at.combine 'max'; known: mean, sum"),
    ("sp", {"gamma": "big"}, "distill.sp.gamma must be a number >= 0, got 'big'"),
    ("sp", {"ce_weight": -0.5}, "distill.sp.ce_weight must be a number >= 0, got -0.5"),
    ("pkt", {"eps": 0.0}, "distill.pkt.eps must be a number > 0, got 0.0"),
    ("pkt", {"feat_weight": float("nan")}, "distill.pkt.feat_weight must be a number >= 0, got nan"),
    ("rkd", {"angle_weight": -50}, "distill.rkd.angle_weight must be a number >= 0, got -50"),
    ("rkd", {"squared": 1}, "distill.rkd.squared must be true or false, got 1"),
    ("rkd", {"combine": "prod"}, "unknown distill.rkd.combine 'prod'; known: mean, sum"),
]


@pytest.mark.parametrize("name,block,message", BAD)
def test_bad_options_are_config_errors(name, block, message):
    with pytest.raises(ConfigError, match=message):
        strategy_class(cfg_of(name)).check(cfg_of(name, **block))


@pytest.mark.parametrize("name", METHODS)
def test_unknown_keys_and_bad_shared_options(name):
    cls = strategy_class(cfg_of(name))
    with pytest.raises(ConfigError, match=rf"unknown distill.{name} key\(s\) 'betta'; known: ce_weight, "):
        cls.check(cfg_of(name, betta=1.0))
    cfg = cfg_of(name)
    cfg[name] = ["not", "a", "mapping"]
    with pytest.raises(ConfigError, match=rf"distill.{name} must be a mapping"):
        cls.check(cfg)
    cfg = cfg_of(name)
    cfg["label_smoothing"] = 1.5
    with pytest.raises(ConfigError, match="label_smoothing must be in"):
        cls.check(cfg, where="stage.distill")
    cls.check(cfg_of(name))  # the YAML's defaults pass


@pytest.mark.parametrize("name", METHODS)
def test_own_config_hashes_exactly_the_declared_keys(name):
    cls = strategy_class(cfg_of(name))
    own = cls.own_config(cfg_of(name))
    assert set(own) == {"strategy", "label_smoothing", name}
    assert set(composed_distill(name)[name]) == set(cls.options[name])  # YAML == declared defaults
    hashed = {k: v for k, v in cls.options[name].items() if not (name == "at" and k == "abs")}  # at p=2: F^2=|F|^2
    assert own[name] == hashed
    hot = cfg_of(name)
    hot["temperature"] = 9.0  # a logit-KD key it never reads
    assert cls.own_config(hot) == own


# -- real zoo pairs -------------------------------------------------------------------------------------------------
PAIRS = {"plain": ("plain10", "plain2", (1, 28, 28)), "resnet": ("resnet32x4", "resnet8x4", (3, 32, 32))}


@functools.cache
def _models(pair: str):
    t_name, s_name, shape = PAIRS[pair]
    torch.manual_seed(0)
    return (build_model(t_name, 10, shape[0], input_size=shape[1]).eval(),
            build_model(s_name, 10, shape[0], input_size=shape[1]))


@pytest.mark.parametrize("pair", list(PAIRS))
@pytest.mark.parametrize("name", METHODS)
def test_defaults_fit_real_zoo_pairs(name, pair):
    teacher, student = _models(pair)
    shape = PAIRS[pair][2]
    cfg = cfg_of(name)
    s_taps, t_taps = strategy_class(cfg).taps(cfg)
    ctx = StrategyContext("student", ["teacher"], 10, feature_shapes(student, s_taps, shape),
                          {"teacher": feature_shapes(teacher, t_taps, shape)})
    strat = build_strategy(cfg, ctx)
    assert (strat.student_taps(), strat.source_taps()) == (s_taps, t_taps)
    x, y = torch.randn(4, *shape), torch.tensor([0, 3, 5, 7])
    with torch.no_grad(), FeatureTaps(teacher, t_taps) as tt:
        src = SourceOutput(teacher(x), dict(tt.features))
    student.zero_grad()
    with FeatureTaps(student, s_taps) as st:
        logits = student(x)
        terms, weights = strat.loss_terms(StudentOutput(logits, dict(st.features)), {"teacher": src}, y, 0.0)
    total = sum(weights[k] * v for k, v in terms.items())
    total.backward()
    assert torch.isfinite(total)
    assert all(terms[t].item() > 0 for t in METHOD_TERMS[name])
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    if name == "fitnet":
        c_s, c_t = ctx.student_feature_shapes["stage2"][0], ctx.source_feature_shapes["teacher"]["stage2"][0]
        assert strat.extra_parameters() == c_s * c_t + c_t + 2 * c_t  # equal sizes: ConvReg's 1x1 conv with bias
        assert all(p.grad is not None for p in strat.regressors.parameters())
    else:
        assert strat.extra_parameters() == 0


def test_strategy_is_registered_under_its_name():
    for name in METHODS:
        cls = strategy_class({"strategy": name})
        assert cls.name == name and cls.options["label_smoothing"] == 0.0
        assert cls.options[name]["combine"] == "mean"
    assert FitNet.taps(cfg_of("fitnet", student_tap="stage1", source_tap="stage3")) == (["stage1"], ["stage3"])


# -- taps left null: the families' reference layers, resolved per stage ------------------------------------------
@pytest.mark.parametrize("method,chain,student,source", [
    ("at", "[wrn_40_2,wrn_16_2]", ["stage1", "stage2", "stage3"], ["stage1", "stage2", "stage3"]),
    ("at", "[vgg13,vgg8]", ["stage2", "stage3", "stage4", "stage5"], ["stage2", "stage3", "stage4", "stage5"]),
    ("at", "[resnet32x4,shufflev2]", ["stage1", "stage2", "stage3"], ["stage1", "stage2", "prepool"]),
    ("sp", "[wrn_40_2,wrn_16_2]", "stage3", "stage3"),
    ("sp", "[vgg13,mobilenetv2]", "stage4", "prepool"),
    ("fitnet", "[vgg13,vgg8]", "stage3", "stage3"),
    ("fitnet", "[resnet32x4,resnet8x4]", "stage2", "stage2"),
    ("reviewkd", "[resnet56,resnet20]", ["stage1", "stage2", "stage3", "embedding"],
     ["preact1", "preact2", "preact3", "embedding"]),
    ("at", "[plain10,plain2]", ["stage1", "stage2", "prepool"], ["stage1", "stage2", "prepool"]),  # no row
])
def test_null_taps_resolve_per_stage_to_the_families_layers(method, chain, student, source):
    from kdlab.pipeline.spec import build_stages
    from tests.helpers.config import compose_config

    cfg = compose_config(f"+experiment={method}_cifar100", f"pipeline.chain={chain}")
    assert cfg["distill"][method][strategy_class(cfg["distill"]).tap_keys[0]] is None  # the YAML leaves them null
    stage = build_stages(cfg)[-1]
    s_key, t_key = strategy_class(stage.distill).tap_keys
    assert (stage.distill[method][s_key], stage.distill[method][t_key]) == (student, source)


def test_set_taps_are_kept_and_sources_must_agree():
    from kdlab.pipeline.spec import build_stages
    from tests.helpers.config import compose_config

    cfg = compose_config("+experiment=at_cifar100", "pipeline.chain=[wrn_40_2,wrn_16_2]",
                         "distill.at.student_taps=[stage2,stage3]")
    stage = build_stages(cfg)[-1]
    assert stage.distill["at"]["student_taps"] == ["stage2", "stage3"]  # set: kept
    assert stage.distill["at"]["source_taps"] == ["stage1", "stage2", "stage3"]  # null: the family's (not cut)
    cfg = compose_config("distill=sp", "pipeline=dense", "pipeline.chain=[wrn_16_2,vgg8,resnet8]", "data=cifar100")
    with pytest.raises(ConfigError, match=r"distill.sp.source_tap is not set and the sources' reference layers "
                                          r"differ \(wrn_16_2: stage3; vgg8: prepool\); set distill.sp.source_tap"):
        build_stages(cfg)
