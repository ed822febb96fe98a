"""Quantized models (kdlab/models/quant.py) and SPEQ (kdlab/distill/speq.py, kdlab/modules/selfdistill.py).

Quantizer levels, thresholds and straight-through gradients are checked against values worked out by hand in
the comments; the transform against every zoo model and the on-the-fly twin; SPEQ's teacher pass by hooks on
the quantizers; the pipeline through the real CLI on synthetic data.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from kdlab.errors import ConfigError
from kdlab.models import build_model, list_models
from kdlab.models.quant import (
    ActQuant,
    QuantConv2d,
    QuantLinear,
    QuantMixin,
    activation_bits,
    quant_config,
    quant_layers,
    quantize_weight,
    size_bytes,
    switchable,
    ternary_codes,
    to_quantized,
    uniform_codes,
)
from tests.helpers.cli import ROOT, kdlab_env, read_results, run_kdlab
from tests.helpers.config import compose_config, stage_keys

Q = {"weight_bits": 2, "act_bits": 4, "first_last": "8bit"}


# -- quantizers against hand values --------------------------------------------------------------------------
def test_ternary_threshold_levels_and_scale():
    w = torch.tensor([0.1, -0.5, 0.9, -0.05, 0.3, 0.0])
    # mean|w| = 1.85 / 6 = 0.308333; delta = 0.7 * that = 0.215833: 0.5, 0.9, 0.3 pass; a = 1.7 / 3
    codes, scale = ternary_codes(w)
    assert codes.tolist() == [0, -1, 1, 0, 1, 0] and codes.dtype == torch.int8
    assert scale.item() == pytest.approx(1.7 / 3, rel=1e-6)
    with torch.no_grad():
        q = quantize_weight(w, 2)
    assert q.tolist() == pytest.approx([0.0, -1.7 / 3, 1.7 / 3, 0.0, 1.7 / 3, 0.0], rel=1e-6)


def test_uniform_weight_grid():
    w = torch.tensor([0.6, -0.3, 0.1, 0.25])
    # 3 bits: qmax = 3, s = 0.6 / 3 = 0.2; w / s = [3, -1.5, 0.5, 1.25] -> round half to even: [3, -2, 0, 1]
    codes, scale = uniform_codes(w, 3)
    assert codes.tolist() == [3, -2, 0, 1]
    assert scale.item() == pytest.approx(0.2)
    # 8 bits: qmax = 127, every code within +-127 and the error at most half a step
    w8 = torch.randn(1000)
    c8, s8 = uniform_codes(w8, 8)
    assert c8.abs().max().item() == 127
    assert (c8.float() * s8 - w8).abs().max().item() <= s8.item() / 2 + 1e-7


def test_weight_ste_passes_the_gradient_through():
    w = torch.tensor([0.1, -0.5, 0.9, -0.05, 0.3, 0.0], requires_grad=True)
    c = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    (quantize_weight(w, 2) * c).sum().backward()
    assert w.grad.tolist() == c.tolist()  # identity STE: d q / d w = 1 everywhere


def test_activation_grid_clamp_round_and_ste():
    aq = ActQuant(2)
    aq.lo.fill_(0.0)
    aq.hi.fill_(3.0)
    aq.seen.fill_(True)
    aq.eval()  # no observation: the grid stays [0, 3], scale (3 - 0) / (2^2 - 1) = 1
    x = torch.tensor([-1.0, 0.4, 1.6, 2.5, 5.0], requires_grad=True)
    y = aq(x)
    # clamp to [0, 3] -> [0, 0.4, 1.6, 2.5, 3] -> round (half to even) -> [0, 0, 2, 2, 3]
    assert y.tolist() == [0.0, 0.0, 2.0, 2.0, 3.0]
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]  # 1 inside [lo, hi], 0 where clamped


def test_activation_range_signed_and_running():
    aq = ActQuant(4).train()
    x = torch.tensor([-2.0, 0.0, 6.0], requires_grad=True)
    aq(x)
    assert (aq.lo.item(), aq.hi.item()) == (-2.0, 6.0)  # first batch: its min / max
    aq(torch.tensor([0.0, 1.0, 16.0], requires_grad=True))
    # momentum 0.9: lo = 0.9 * -2 + 0.1 * 0 = -1.8; hi = 0.9 * 6 + 0.1 * 16 = 7
    assert aq.lo.item() == pytest.approx(-1.8) and aq.hi.item() == pytest.approx(7.0)
    with torch.no_grad():
        aq(torch.tensor([100.0]))  # a pass without gradients (SPEQ's teacher, evaluation) does not move it
    assert aq.hi.item() == pytest.approx(7.0)
    scale, zero = aq.grid(4)
    assert scale.item() == pytest.approx(8.8 / 15) and zero.item() == round(1.8 / (8.8 / 15))
    with torch.no_grad():
        out = aq(torch.linspace(-3, 9, 50))
    assert len(set(out.tolist())) <= 16  # 2^4 levels


def test_quant_config_checks():
    assert quant_config(None) is None
    assert quant_config({"weight_bits": None, "act_bits": 32}) is None  # nothing quantized
    assert quant_config({"weight_bits": 2}) == {"weight_bits": 2, "act_bits": None, "first_last": "8bit"}
    for bad in (0, 1, 17, 33, 2.5, True, "2"):
        with pytest.raises(ConfigError, match="weight_bits must be 2"):
            quant_config({"weight_bits": bad})
    with pytest.raises(ConfigError, match="unknown model.quant.first_last 'x'"):
        quant_config({"weight_bits": 2, "first_last": "x"})


# -- the transform ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list_models())
def test_every_zoo_model_quantizes_and_trains_a_step(name):
    torch.manual_seed(0)
    float_model = build_model(name, 10, 1, input_size=28)
    model = build_model(name, 10, 1, input_size=28, quant=Q)
    assert set(float_model.state_dict()) <= set(model.state_dict())  # same names, plus the input grids
    layers = quant_layers(model)
    n_float = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in float_model.modules())
    assert len(layers) == n_float == model.quant["layers"]
    edges = [m for _, m in layers if m.edge]
    assert len(edges) == 2 and all(m.weight_bits == 8 and m.act.bits == 8 for m in edges)
    assert all(m.weight_bits == 2 and m.act.bits == 4 for _, m in layers if not m.edge)
    model.train()
    out = model(torch.randn(4, 1, 28, 28))
    out.sum().backward()
    assert out.shape == (4, 10)
    inner = next(m for _, m in layers if not m.edge)
    assert inner.weight.grad is not None and inner.weight.grad.abs().sum() > 0


def test_first_last_policies():
    full = build_model("resnet8", 10, 1, input_size=28, quant={**Q, "first_last": "full"})
    assert type(full.conv1) is nn.Conv2d and type(full.fc) is nn.Linear  # left in float
    same = build_model("resnet8", 10, 1, input_size=28, quant={**Q, "first_last": "same"})
    assert isinstance(same.conv1, QuantConv2d) and isinstance(same.fc, QuantLinear)
    assert same.conv1.weight_bits == 2 and same.fc.act.bits == 4
    eight = build_model("resnet8", 10, 1, input_size=28, quant=Q)
    assert eight.conv1.weight_bits == 8 and eight.fc.weight_bits == 8 and eight.conv1.act.bits == 8


def test_edges_are_found_by_execution_order():
    class Backwards(nn.Module):  # the classifier is registered before the convolution that runs first
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(8, 3)
            self.mid = nn.Conv2d(4, 8, 3, padding=1)
            self.stem = nn.Conv2d(1, 4, 3, padding=1)

        def forward(self, x):
            return self.head(self.mid(self.stem(x)).mean((2, 3)))

    m = to_quantized(Backwards(), 2, 4, "8bit", input_shape=(1, 8, 8))
    assert m.stem.edge and m.head.edge and not m.mid.edge
    assert m.mid.weight_bits == 2 and m.stem.weight_bits == 8


def test_quantizes_the_on_the_fly_twin():
    model = build_model("resnet8", 10, 1, input_size=28, on_the_fly=True, quant=Q)
    convs = [m for _, m in quant_layers(model) if isinstance(m, QuantConv2d) and m.kernel_size != (1, 1)]
    assert convs and all(m.kernel_size == (1, 3) for m in convs)  # 1 x N and ternary
    assert all(m.weight_bits == 2 for m in convs if not m.edge)
    model(torch.randn(2, 1, 28, 28)).sum().backward()


def test_size_bytes_by_hand():
    m = nn.Sequential(nn.Conv2d(1, 2, 3, bias=False), nn.ReLU(), nn.Conv2d(2, 2, 3, bias=True), nn.Flatten(),
                      nn.Linear(2 * 4 * 4, 3))
    fp = sum(p.numel() for p in m.parameters()) * 4
    assert size_bytes(m) == fp  # nothing quantized: 4 bytes per parameter
    q = to_quantized(m, 2, 4, "same", input_shape=(1, 8, 8))
    # weights at 2 bits: 18 + 36 + 96 = 150 values -> 300 bits; biases 2 + 3 at 32 bits -> 160 bits;
    # three input grids (lo, hi) at 32 bits -> 192 bits; 652 bits -> 82 bytes (rounded up) + 3 scales x 4
    assert size_bytes(q) == 82 + 12


def test_switching_bits_per_forward_pass():
    model = build_model("resnet8", 10, 1, input_size=28, quant=Q).eval()
    layers = switchable(model)
    assert layers and all(q.bits == 4 for q in layers)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        low = model(x)
        with activation_bits(layers, [8] * len(layers)):
            assert all(q.bits == 8 for q in layers)
            high = model(x)
        again = model(x)
    assert all(q.bits == 4 for q in layers)  # restored
    assert torch.equal(low, again) and not torch.equal(low, high)


def test_quant_is_in_the_store_key_and_a_float_key_does_not_move():
    base = ["+experiment=quant_alone_fashion_mnist"]
    q2 = stage_keys(compose_config(*base))["student"]
    q3 = stage_keys(compose_config(*base, "pipeline.quant_model.quant.weight_bits=3"))["student"]
    assert q2 != q3
    plain = compose_config("pipeline=single", "model=resnet8")
    explicit_null = compose_config("pipeline=single", "model=resnet8", "model.quant.weight_bits=null")
    assert stage_keys(plain) == stage_keys(explicit_null)  # a float model's spec carries no quant block
    from kdlab.pipeline import build_stages

    assert "quant" not in build_stages(plain)[0].model
    per_stage = compose_config("+experiment=kd_fashion_mnist",
                               "+pipeline.per_stage.student.model.quant.weight_bits=2")
    kd = stage_keys(compose_config("+experiment=kd_fashion_mnist"))
    keys = stage_keys(per_stage)
    assert keys["teacher"] == kd["teacher"] and keys["student"] != kd["student"]


# -- SPEQ ------------------------------------------------------------------------------------------------
def _speq_module(seed: int = 0, **speq):
    from kdlab.distill import build_strategy
    from kdlab.distill.base import StrategyContext
    from kdlab.modules.selfdistill import SelfDistillModule

    torch.manual_seed(0)
    model = build_model("resnet8", 10, 1, input_size=28, quant=Q)
    strategy = build_strategy({"strategy": "speq", "speq": speq}, StrategyContext("student", [], 10))
    return SelfDistillModule(model, 10, lambda params: torch.optim.SGD(params, lr=0.1), None, strategy=strategy, seed=seed, stage="student")


def test_speq_teacher_pass_runs_at_the_drawn_bits_without_gradients():
    module = _speq_module(bits=[2, 8])
    module.train()
    calls: list[tuple[bool, list[int]]] = []
    layers = module.switch
    first = layers[0]
    first.register_forward_pre_hook(lambda m, inp: calls.append((torch.is_grad_enabled(),
                                                                [q.bits for q in layers])))
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    bn = module.model.bn1 if hasattr(module.model, "bn1") else next(
        m for m in module.model.modules() if isinstance(m, nn.BatchNorm2d))
    before = bn.running_mean.clone()
    _, terms, weights = module.compute_terms(x, y, torch.arange(8))
    assert len(calls) == 2
    (t_grad, t_bits), (s_grad, s_bits) = calls
    assert not t_grad and t_bits == module.drawn and set(t_bits) <= {2, 8}
    assert s_grad and s_bits == [4] * len(layers)  # the student pass at the target bits
    assert len(set(t_bits)) == 2  # a per-layer draw, not one bit-width for all (P(all equal) = 2^-(n-1))
    assert set(terms) == {"ce", "speq"} and weights == {"ce": 1.0, "speq": 1.0}
    # BN running statistics moved once (the student pass), exactly as a plain forward would move them
    ref = _speq_module(bits=[2, 8])
    ref.train()
    ref.model(x)
    assert torch.allclose(bn.running_mean, next(m for m in ref.model.modules()
                                                if isinstance(m, nn.BatchNorm2d)).running_mean)
    assert not torch.equal(bn.running_mean, before)


def test_speq_adds_no_parameters_and_the_teacher_never_reaches_the_optimizer():
    module = _speq_module()
    assert [id(p) for p in module.parameters()] == [id(p) for p in module.model.parameters()]
    assert module.strategy.extra_parameters() == 0
    graphs: list[bool] = []
    module.model.register_forward_hook(lambda m, inp, out: graphs.append(out.requires_grad))
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    _, terms, _ = module.compute_terms(x, y, torch.arange(4))
    assert graphs == [False, True]  # the teacher pass has no graph: nothing of it reaches the optimizer
    terms["speq"].backward()
    assert all(p.grad is not None for p in module.model.parameters() if p.requires_grad and p.dim() > 1)


def test_speq_same_seed_same_bits_and_steps_differ():
    a, b = _speq_module(seed=3), _speq_module(seed=3)
    assert a.teacher_bits() == b.teacher_bits()  # global_step 0 of the same stage seed
    draws = {tuple(_speq_module(seed=s).teacher_bits()) for s in range(4)}
    assert len(draws) > 1  # the seed matters
    n = len(a.switch)
    assert a.strategy.draw(n, 4, seed=11) == a.strategy.draw(n, 4, seed=11)
    assert len({tuple(a.strategy.draw(n, 4, seed=s)) for s in range(6)}) > 1  # and so does the step
    assert a.strategy.bit_choices(4) == [4, 8]  # the default set: the target and 8


def test_speq_cosine_loss_by_hand():
    from kdlab.distill.speq import cosine_loss

    t = torch.tensor([[0.0, 0.0]])  # p_T = [0.5, 0.5]
    s = torch.tensor([[torch.log(torch.tensor(3.0)).item(), 0.0]])  # p_S = [0.75, 0.25]
    # cos = (0.375 + 0.125) / (sqrt(0.5) * sqrt(0.625)) = 0.5 / 0.559017 = 0.894427
    assert cosine_loss(t, s, 1.0).item() == pytest.approx(1 - 0.894427, abs=1e-6)


# -- through the CLI ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ternary_student_trains_above_chance_and_reports_its_size(tmp_path):
    out, run = tmp_path / "out", tmp_path / "run"
    r = run_kdlab(["pipeline=single", "model=resnet8", "model.quant.weight_bits=2", "model.quant.act_bits=4",
                   "optimizer.lr=0.05", "trainer.max_epochs=3"], out, run)
    assert r.returncode == 0, r.stderr[-3000:]
    st = read_results(run)["stages"][0]
    assert st["test_acc"] > 0.3  # 10 classes: chance is 0.1
    assert (st["weight_bits"], st["act_bits"]) == (2, 4)
    float_bytes = st["params"] * 4
    assert st["size_bytes"] < float_bytes / 8  # ternary inner layers, 8-bit edges, float BN
    r2 = run_kdlab(["pipeline=single", "model=resnet8", "optimizer.lr=0.05", "trainer.max_epochs=1"], out,
                   tmp_path / "run2")
    assert r2.returncode == 0, r2.stderr[-3000:]
    st2 = read_results(tmp_path / "run2")["stages"][0]
    assert (st2["weight_bits"], st2["act_bits"]) == (32, 32)
    assert st2["size_bytes"] > st2["params"] * 4  # + BN running statistics


@pytest.mark.slow
def test_speq_pipeline_runs_from_the_cli(tmp_path):
    out, run = tmp_path / "out", tmp_path / "run"
    r = run_kdlab(["pipeline=single", "model=resnet8", "model.quant.weight_bits=2", "model.quant.act_bits=4",
                   "distill=speq", "optimizer.lr=0.05", "trainer.max_epochs=2"], out, run)
    assert r.returncode == 0, r.stderr[-3000:]
    res = read_results(run)
    st = res["stages"][0]
    assert st["test_acc"] > 0.2 and st["extra_params"] == 0
    import csv

    with open(st["csv_log"]) as fh:
        rows = list(csv.DictReader(fh))
    cols = set(rows[0])
    assert {"train/loss_ce", "train/loss_speq", "train/teacher_bits"} <= cols
    bits = [float(r["train/teacher_bits"]) for r in rows if r.get("train/teacher_bits")]
    assert bits and all(4 < b < 8 for b in bits)  # a mix of 4- and 8-bit layers


def test_zoo_lists_the_quantized_sizes():
    r = subprocess.run([sys.executable, "-m", "kdlab.zoo", "--dataset", "fashion_mnist", "--models",
                        "resnet8,plain4", "--quant", "2", "--act-bits", "4", "--json"],
                       cwd=ROOT, env=kdlab_env(), capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    r8 = build_model("resnet8", 10, 1, input_size=28, quant={"weight_bits": 2, "act_bits": 4})
    assert rows["resnet8"]["size_bytes"] == size_bytes(r8)
    assert rows["resnet8"]["weight_bits"] == 2 and rows["resnet8"]["float_bytes"] == size_bytes(
        build_model("resnet8", 10, 1, input_size=28))
    assert isinstance(r8.layer1[0].conv1, QuantMixin)
