"""Quantization as a model transform (``model.quant``): low-bit weights and activations, straight-through.

``to_quantized(model, weight_bits, act_bits, first_last)`` swaps every ``nn.Conv2d`` / ``nn.Linear`` of a
(zoo or on-the-fly) model for a :class:`QuantConv2d` / :class:`QuantLinear` that keeps the same parameters
and state-dict names and, in ``forward``:

* **weights** (per layer, one scale): 2 bits are *ternary* {-a, 0, +a} -- threshold
  ``delta = 0.7 * mean|W|`` and ``a = mean |W|`` over the weights above it (Li & Liu, "Ternary Weight
  Networks", arXiv 1605.04711, the usual choice; GSLR's abstract only says "2-bit ternary"); 3..16 bits are
  symmetric uniform, ``q = round(W / s)`` clamped to +-(2^(b-1) - 1) with ``s = max|W| / (2^(b-1) - 1)``.
  The gradient passes straight through to the float weights (STE, identity).
* **activations**: the layer's *input* is quantized to ``act_bits`` on a per-layer affine grid over
  [lo, hi] (lo <= 0 <= hi, so zero is exact and a ReLU output uses every level), 2^b levels. lo / hi are
  running (momentum 0.9) batch min / max, updated only in training forward passes with gradients on, kept as
  buffers (they travel with the weights and are exported). STE: the gradient is 1 inside [lo, hi], 0 outside
  (the gradient of the clamp). The bit-width is an attribute read at every forward, so SPEQ can switch it
  per pass (:func:`activation_bits`).
* **first and last layers** (the first conv/linear to run and the last one, found by one dummy forward):
  ``first_last=8bit`` (default) runs them at 8-bit weights and 8-bit inputs, ``full`` leaves them in float,
  ``same`` quantizes them like the rest.

Why a small module of kdlab's own (with torch's fused ``fake_quantize_per_tensor_affine`` kernel for the
activations) and not brevitas or ``torch.ao`` FakeQuantize modules, on the evidence of
``benchmarks/bench_quant.py`` (figure j, docs/performance.md):

* torch.ao has no ternary weight quantizer: a [-1, 1] grid gives {-a, 0, +a} with a = max|W| and threshold
  a / 2, not TWN's rule. Switching a FakeQuantize's bit-width per pass works only by setting quant_min /
  quant_max on it *and* its observer and recomputing the qparams (setting one silently keeps the old grid), and
  FakeQuantize ignores ``eval()`` / ``no_grad``, so a teacher pass would move its ranges unless its observer is
  switched off by hand: 1.3 ms per switch of 8 layers and two traps. Its fused kernel is what made its plain
  QAT step 1.4x faster than the first version of this module, so the activations here now use that kernel
  (quant_min / quant_max are arguments of each call: switching costs nothing); measured quietly after that, a
  train step takes 205 ms here, 222 ms with torch.ao, 452 ms with brevitas (figure j).
* brevitas has ternary weights (max-based, threshold a / 2, again not TWN), a bit-width that can be
  overwritten per pass, and a step 2x slower than torch.ao's on the CPU; it is 46k lines with a
  setuptools < 81 pin and its own replacements for nn.Conv2d.
* this module: TWN's ternary rule, the bit-width one attribute per layer (SPEQ switches every layer on every
  step), BN and feature taps untouched (a QuantConv2d *is* an nn.Conv2d), no dependency.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdlab.errors import ConfigError

FIRST_LAST = ("8bit", "full", "same")
#: the keys of ``model.quant`` with their defaults (null bits: that part stays in float)
QUANT_DEFAULTS: dict[str, Any] = {"weight_bits": None, "act_bits": None, "first_last": "8bit"}
EDGE_BITS = 8
FULL = 32
MOMENTUM = 0.9


def check_bits(where: str, value: Any) -> int | None:
    """``value`` as an int bit-width (2 = ternary, 3..16 uniform; 32 or null = float), else a ConfigError."""
    if value is None:
        return None
    ok = isinstance(value, int) and not isinstance(value, bool) and (2 <= value <= 16 or value == FULL)
    if not ok:
        raise ConfigError(f"{where} must be 2 (ternary) .. 16, or 32 / null for float, got {value!r}")
    return None if value == FULL else int(value)


def quant_config(cfg: Any, where: str = "model.quant") -> dict[str, Any] | None:
    """``model.quant`` checked and with defaults filled in; None when nothing is quantized."""
    if cfg is None or cfg is False:
        return None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{where} must be a mapping {{weight_bits, act_bits, first_last}}, got {cfg!r}")
    unknown = sorted(set(cfg) - set(QUANT_DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown {where} key(s) {', '.join(map(repr, unknown))}; known: "
                          f"{', '.join(QUANT_DEFAULTS)}")
    out = {**QUANT_DEFAULTS, **cfg}
    out["weight_bits"] = check_bits(f"{where}.weight_bits", out["weight_bits"])
    out["act_bits"] = check_bits(f"{where}.act_bits", out["act_bits"])
    if str(out["first_last"]) not in FIRST_LAST:
        raise ConfigError(f"unknown {where}.first_last {out['first_last']!r}; known: {', '.join(FIRST_LAST)}")
    out["first_last"] = str(out["first_last"])
    if out["weight_bits"] is None and out["act_bits"] is None:
        return None
    return out


# -- weights -------------------------------------------------------------------------------------------
def ternary_codes(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes in {-1, 0, 1} as int8, scale a): TWN's threshold 0.7 * mean|W|, a = mean |W| above it."""
    a = w.detach().abs()
    delta = 0.7 * a.mean()
    mask = a > delta
    scale = (a * mask).sum() / mask.sum().clamp(min=1)
    return (torch.sign(w.detach()) * mask).to(torch.int8), scale


def uniform_codes(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(integer codes in [-(2^(b-1) - 1), 2^(b-1) - 1], scale s = max|W| / (2^(b-1) - 1))."""
    qmax = 2 ** (bits - 1) - 1
    scale = (w.detach().abs().amax() / qmax).clamp(min=1e-12)
    codes = torch.round(w.detach() / scale).clamp(-qmax, qmax)
    return codes.to(torch.int8 if bits <= 8 else torch.int16), scale


def weight_codes(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The integer codes and the scale of weight tensor ``w`` at ``bits``: ``w ~ codes * scale``."""
    return ternary_codes(w) if bits == 2 else uniform_codes(w, bits)


def quantize_weight(w: torch.Tensor, bits: int | None) -> torch.Tensor:
    """``w`` on its ``bits`` grid in the forward pass, the identity in the backward pass (STE)."""
    if bits is None:
        return w
    codes, scale = weight_codes(w, bits)
    q = codes.to(w.dtype) * scale.to(w.dtype)
    return w + (q - w).detach() if torch.is_grad_enabled() and w.requires_grad else q


# -- activations ---------------------------------------------------------------------------------------
class ActQuant(nn.Module):
    """Quantizes its input to ``bits`` levels on [lo, hi] (running batch min / max); ``bits=None``: float."""

    def __init__(self, bits: int | None):
        super().__init__()
        self.bits = bits
        self.register_buffer("lo", torch.zeros(()))
        self.register_buffer("hi", torch.zeros(()))
        self.register_buffer("seen", torch.zeros((), dtype=torch.bool))
        self.calls = 0  # forward passes, with the bit-width of the last one (tests hook them)
        self.last_bits: int | None = None

    def extra_repr(self) -> str:
        return f"bits={self.bits}"

    @torch.no_grad()
    def _observe(self, x: torch.Tensor) -> None:
        lo, hi = x.detach().amin().float().clamp(max=0), x.detach().amax().float().clamp(min=0)
        if not bool(self.seen):
            self.lo.copy_(lo)
            self.hi.copy_(hi)
            self.seen.fill_(True)
        else:
            self.lo.mul_(MOMENTUM).add_((1 - MOMENTUM) * lo)
            self.hi.mul_(MOMENTUM).add_((1 - MOMENTUM) * hi)

    def grid(self, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero point) of the affine grid: x ~ (q - zero) * scale with q in [0, 2^bits - 1]."""
        levels = 2 ** bits - 1
        scale = ((self.hi - self.lo) / levels).clamp(min=1e-8)
        return scale, torch.round(-self.lo / scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.last_bits = self.bits
        if self.bits is None:
            return x
        if self.training and torch.is_grad_enabled():
            self._observe(x)
        scale, zero = self.grid(self.bits)
        levels = 2 ** self.bits - 1
        if not torch.onnx.is_in_onnx_export():
            # torch's fused kernel: the same grid, round half to even and clamp-masked gradient as the explicit
            # form below (tests/models/test_quant.py), 1.7x faster on the CPU; quant_min / quant_max are per call, so
            # the bit-width still switches per forward pass
            return torch.fake_quantize_per_tensor_affine(x, scale.float(), zero.to(torch.int32), 0, levels)
        # the explicit form, for ONNX (whose QuantizeLinear has only 8-bit ranges): Clip and Round on the grid
        scale, zero = scale.to(x.dtype), zero.to(x.dtype)
        lo, hi = (0 - zero) * scale, (levels - zero) * scale
        xc = torch.maximum(torch.minimum(x, hi), lo)  # gradient 1 inside [lo, hi], 0 outside
        q = torch.round(xc / scale) * scale
        return xc + (q - xc).detach() if torch.is_grad_enabled() and x.requires_grad else q


class QuantMixin:
    """What QuantConv2d and QuantLinear add to their float parent: ``weight_bits`` and an input quantizer."""

    weight_bits: int | None
    act: ActQuant

    def _setup(self, weight_bits: int | None, act_bits: int | None, edge: bool = False) -> None:
        self.weight_bits = weight_bits
        self.edge = edge  # the first or the last layer (``first_last``)
        self.act = ActQuant(act_bits)

    def quant_repr(self) -> str:
        return f"weight_bits={self.weight_bits}, act_bits={self.act.bits}"


class QuantConv2d(QuantMixin, nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.act(x), quantize_weight(self.weight, self.weight_bits), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.quant_repr()}"


class QuantLinear(QuantMixin, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.act(x), quantize_weight(self.weight, self.weight_bits), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.quant_repr()}"


QUANT_CLASSES = {nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}


def _execution_order(model: nn.Module, input_shape: Sequence[int]) -> list[str]:
    """Names of the conv / linear layers in the order one dummy forward runs them."""
    order: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda mod, inp, n=name: order.append(n))
             for name, m in model.named_modules() if type(m) in QUANT_CLASSES]
    param = next(model.parameters())
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros((1, *input_shape), device=param.device, dtype=param.dtype))
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return list(dict.fromkeys(order))


def to_quantized(model: nn.Module, weight_bits: int | None = None, act_bits: int | None = None,
                 first_last: str = "8bit", input_shape: Sequence[int] | None = None) -> nn.Module:
    """``model`` with its conv / linear layers quantized in place (module doc); sets ``model.quant``."""
    cfg = quant_config({"weight_bits": weight_bits, "act_bits": act_bits, "first_last": first_last})
    if cfg is None:
        return model
    arch = getattr(model, "arch", type(model).__name__)
    if input_shape is None:
        raise ConfigError(f"quantizing {arch} needs its input shape (C, H, W)")
    order = _execution_order(model, input_shape)
    if not order:
        raise ConfigError(f"model {arch} has no Conv2d or Linear layer to quantize")
    edges = {order[0], order[-1]}
    for name in order:
        old = model.get_submodule(name)
        wb, ab = cfg["weight_bits"], cfg["act_bits"]
        if name in edges and cfg["first_last"] != "same":
            if cfg["first_last"] == "full":
                continue
            wb = EDGE_BITS if wb is not None else None
            ab = EDGE_BITS if ab is not None else None
        new = QUANT_CLASSES[type(old)].__new__(QUANT_CLASSES[type(old)])
        new.__dict__ = old.__dict__.copy()  # the same parameters, buffers, hooks and settings, one more child
        new._modules = dict(old._modules)
        new._setup(wb, ab, edge=name in edges)
        new.act.to(old.weight.device)
        parent_path, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, leaf, new)
    model.quant = {**cfg, "layers": len([m for m in model.modules() if isinstance(m, QuantMixin)])}
    return model


# -- what SPEQ and the reports read --------------------------------------------------------------------
def quant_layers(model: nn.Module) -> list[tuple[str, QuantMixin]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantMixin)]


def switchable(model: nn.Module) -> list[ActQuant]:
    """The input quantizers SPEQ may switch: every quantized layer's, except the first and last layers'."""
    return [m.act for _, m in quant_layers(model) if m.act.bits is not None and not m.edge]


@contextlib.contextmanager
def activation_bits(quantizers: Sequence[ActQuant], bits: Sequence[int]) -> Iterator[None]:
    """Run the block with ``quantizers[i].bits = bits[i]``, then restore them."""
    saved = [q.bits for q in quantizers]
    try:
        for q, b in zip(quantizers, bits, strict=True):
            q.bits = int(b)
        yield
    finally:
        for q, b in zip(quantizers, saved, strict=True):
            q.bits = b


def size_bytes(model: nn.Module) -> int:
    """The model's size at its bit-widths: each quantized weight at its bits (+ a 4-byte scale per layer),
    every other parameter and float buffer (biases, BN) at 4 bytes; integer bookkeeping buffers excluded."""
    bits_of: dict[int, int] = {}
    extra = 0
    for _, m in quant_layers(model):
        if m.weight_bits is not None:
            bits_of[id(m.weight)] = m.weight_bits
            extra += 4
    total_bits = 0
    for p in model.parameters():
        total_bits += p.numel() * bits_of.get(id(p), FULL)
    for b in model.buffers():
        if b.is_floating_point():
            total_bits += b.numel() * FULL
    return (total_bits + 7) // 8 + extra


def quant_report(model: nn.Module) -> dict[str, Any]:
    """``results.json``'s view of the model's precision: the bit-widths and ``size_bytes``."""
    q = getattr(model, "quant", None)
    out: dict[str, Any] = {"weight_bits": FULL, "act_bits": FULL, "size_bytes": size_bytes(model)}
    if q:
        out.update(weight_bits=q["weight_bits"] or FULL, act_bits=q["act_bits"] or FULL,
                   first_last=q["first_last"])
    return out
