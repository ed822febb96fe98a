"""The check of ``python -m kdlab.export``: the same inputs (the run's test images, or seeded random ones)
through kdlab's model and through the exported bytes (onnxruntime on the CPU, the TorchScript module, the
state_dict reloaded into a fresh model), their logits compared within the tolerances below (measured:
docs/export.md). Nothing is written unless the check passes."""
from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kdlab.errors import KdlabError
from kdlab.export.target import Target, build_target

if TYPE_CHECKING:
    import torch

# Tolerances of the check (measured: docs/export.md; float models differed by <= 4.8e-7, quantized ones by 0 on
# test images and, on 0.1% of random inputs, by 0.02: one activation one rounding step off).
# Float models: every logit within FLOAT_MAX_DIFF. Models with quantized activations: a float difference of ~1e-7
# before a rounding step can move that activation by a whole step, so: at most QUANT_MAX_OFF of the inputs (at
# least one) have a logit off by more than FLOAT_MAX_DIFF, every logit is within QUANT_MAX_DIFF x the logits'
# range (at least 1), and at least QUANT_MIN_AGREEMENT of the top-1 classes agree.
FLOAT_MAX_DIFF = 1e-3
QUANT_MAX_OFF = 0.01
QUANT_MAX_DIFF = 0.25
QUANT_MIN_AGREEMENT = 0.99
CHUNK = 128  # inputs per forward pass of the check


def check_inputs(t: Target, n: int) -> tuple[torch.Tensor, str]:
    """(up to ``n`` inputs, what they are): the run's test images, or seeded random normal inputs."""
    import torch

    if t.data is not None:
        xs, got = [], 0
        for batch in t.data.test_dataloader():
            xs.append(batch[0].float().cpu())
            got += len(batch[0])
            if got >= n:
                break
        x = torch.cat(xs)[:n]
        return x, f"{len(x)} test images of {t.data.name}"
    g = torch.Generator().manual_seed(0)
    why = "; ".join(t.notes) if t.notes else "no run directory, only a store key"
    return torch.randn((n, *t.input_shape), generator=g), f"{n} random inputs ({why})"


def batched(fn: Any, x: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.cat([torch.as_tensor(fn(x[i:i + CHUNK])) for i in range(0, len(x), CHUNK)])


@dataclass
class CheckResult:
    what: str
    n: int
    max_diff: float
    agree: int
    limit_diff: float
    limit_agree: float | None
    exact: bool = False
    off: int = 0  # inputs with a logit off by more than FLOAT_MAX_DIFF
    limit_off: int | None = None

    @property
    def ok(self) -> bool:
        if self.exact:
            return self.max_diff == 0
        agree_ok = self.limit_agree is None or self.agree >= math.ceil(self.limit_agree * self.n - 1e-9)
        off_ok = self.limit_off is None or self.off <= self.limit_off
        return self.max_diff <= self.limit_diff and agree_ok and off_ok

    def line(self, against: str) -> str:
        limits = "must be equal" if self.exact else f"limit {self.limit_diff:.3g}"
        agree = f"top-1 agreement {self.agree / max(self.n, 1):.2%} ({self.agree}/{self.n}"
        agree += f"; limit {self.limit_agree:.0%})" if self.limit_agree is not None else ")"
        off = "" if self.limit_off is None else \
            f", {self.off} input(s) off by > {FLOAT_MAX_DIFF:g} (limit {self.limit_off})"
        return (f"check on {self.what}: {against} vs kdlab max|logit diff| {self.max_diff:.3g} ({limits}){off}, "
                f"{agree}: {'ok' if self.ok else 'FAILED'}")


def compare(t: Target, ref: torch.Tensor, out: torch.Tensor, what: str, exact: bool = False) -> CheckResult:
    ref, out = ref.float(), out.float()
    per_input = (ref - out).abs().amax(1)  # the check has at least one input
    diff = float(per_input.max())
    agree = int((ref.argmax(1) == out.argmax(1)).sum())
    if exact:
        return CheckResult(what, len(ref), diff, agree, 0.0, None, exact=True)
    if t.quantized_activations:
        scale = max(1.0, float(ref.max() - ref.min()))
        return CheckResult(what, len(ref), diff, agree, QUANT_MAX_DIFF * scale, QUANT_MIN_AGREEMENT,
                           off=int((per_input > FLOAT_MAX_DIFF).sum()),
                           limit_off=max(1, int(QUANT_MAX_OFF * len(ref))))
    return CheckResult(what, len(ref), diff, agree, FLOAT_MAX_DIFF, None)


def check(t: Target, fmt: str, data: bytes, x: torch.Tensor, what: str) -> CheckResult:
    """Run ``x`` through kdlab's model and through the exported bytes; compare their logits."""
    import torch

    from kdlab.models.quant import quant_layers, quantize_weight
    from kdlab.store.fileio import load_weights

    with torch.no_grad():
        ref = batched(t.model, x)
    if fmt == "onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: not the constant-folding chatter
        session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        out = batched(lambda b: session.run(None, {"input": b.numpy()})[0], x)
        return compare(t, ref, out, what)
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit's deprecation notice
            module = torch.jit.load(io.BytesIO(data), map_location="cpu")
        with torch.no_grad():
            out = batched(module, x)
        return compare(t, ref, out, what, exact=True)
    payload = load_weights(io.BytesIO(data), "exported state_dict")  # weights_only=True, as a user would load it
    model = build_target(payload["kdlab_export"]["model"], t.description, payload["state_dict"])
    with torch.no_grad():
        for name, m in quant_layers(model):
            if m.weight_bits is not None:
                q = payload["quantized"][f"{name}.weight_codes"].float() * payload["quantized"][f"{name}.weight_scale"]
                if not torch.equal(q, quantize_weight(m.weight, m.weight_bits)):
                    raise KdlabError(f"check failed: {name}.weight_codes x weight_scale is not the layer's weight")
        out = batched(model, x)
    return compare(t, ref, out, what, exact=True)
