"""(j) Quantized students: what ``model.quant`` (kdlab/models/quant.py) and SPEQ (``distill=speq``) cost per
training step, and kdlab's quantizer against torch.ao fake quantization and brevitas on the same network.

1. **Quantized student vs float.** The same student (``ARCH``, resnet8, Fashion-MNIST 1x28x28, batch 128)
   trained alone from labels through kdlab's real pipeline (``pipeline=single distill=none``), in float and
   with ``model.quant.weight_bits=2 model.quant.act_bits=4`` (ternary TWN weights, 4-bit inputs on every
   conv / linear, first and last layers at 8 bits): steady-state ms per step (``BatchTimer``, the first batch
   of each epoch untimed, ``1000 * batch / samples-per-second``), best of ``--repeats`` interleaved runs.
   The ratio quantized / float is informational (fake quantization adds elementwise work around every layer;
   it saves nothing on a CPU).
2. **SPEQ vs QAT alone.** The quantized stage with ``distill=speq`` (one extra no-grad teacher forward with
   per-layer activation bit-widths drawn from {4, 8}, BatchNorm statistics restored, the cosine loss) against
   the same quantized stage with ``distill=none``. Target: <= 2x (one extra forward without backward).
3. **Implementations, micro-benchmark** (one process, fp32, no Lightning; the same resnet, batch, random
   images): a train step (forward, CE, backward, SGD step) and a SPEQ-style step (switch every switchable
   layer's activation bit-width, no-grad forward, switch back, then the train step) with
   (a) kdlab's QuantConv2d / QuantLinear (``activation_bits``: one attribute per layer),
   (b) torch.ao ``FakeQuantize`` (activations: ``MovingAverageMinMaxObserver``, quint8 on [0, 2^b - 1];
   weights: 2-bit uniform symmetric on [-2, 1], torch.ao has no TWN ternary; switching a bit-width means
   setting quant_min / quant_max on the FakeQuantize *and* its observer and recomputing scale / zero point,
   with the observer disabled for the teacher pass), and
   (c) brevitas (``brevitas.nn.QuantConv2d`` / ``QuantLinear`` with ``input_quant=Int8ActPerTensorFloat`` at
   ``input_bit_width=4`` and a ternary weight quantizer, ``quant_type=TERNARY`` on ``Int8WeightPerTensorFloat``:
   {-a, 0, +a} with a = max|W| and threshold a / 2; switching: the value of the input quantizer's
   ``BitWidthConst`` buffer), only where brevitas is importable (it is not a kdlab dependency:
   ``pip install brevitas==0.13.4``, or put a ``pip install --target DIR`` copy on PYTHONPATH).
   The first and last layers run at 8 bits in all three, as ``first_last=8bit`` does. Best of ``--repeats``.
   A correctness cross-check: kdlab's 4-bit ``ActQuant`` against ``torch.fake_quantize_per_tensor_affine``
   on kdlab's own lo / hi grid, and torch.ao's observer-derived grid against kdlab's running one over the same
   batches (max abs difference of the outputs).

    python benchmarks/bench_quant.py [--subset N] [--live-epochs N] [--repeats N]   # or: make bench ARGS="--only quant"
    PYTHONPATH=/tmp/brevitas_site python benchmarks/bench_quant.py                  # with a scratch brevitas
"""
from __future__ import annotations

import contextlib
import inspect
import time
from pathlib import Path
from typing import Any

import common
from common import Options, figure

ARCH = "resnet8"
BATCH = 128
QUICK_BATCH = 32
WEIGHT_BITS, ACT_BITS = 2, 4
EDGE_BITS = 8  # first_last=8bit
SPEQ_BITS = (4, 8)  # speq.bits=null with act_bits=4: {act_bits, 8}
QUANT = [f"model.quant.weight_bits={WEIGHT_BITS}", f"model.quant.act_bits={ACT_BITS}"]
SIDES = {"float": ["distill=none"], "qat": ["distill=none", *QUANT], "speq": ["distill=speq", *QUANT]}
BREVITAS_PIN = "brevitas==0.13.4"
#: what each implementation offers for 2-bit weights (the timed models use the first-named quantizer)
TERNARY = {
    "kdlab": "ternary (TWN: threshold 0.7 mean|W|, a = mean|W| above it)",
    "torch.ao": "no ternary quantizer: 2-bit uniform [-2, 1] timed; a [-1, 1] grid gives {-a,0,+a} with a = max|W|, "
                "threshold a/2 (not TWN's)",
    "brevitas": "ternary (QuantType.TERNARY: a = max|W| by default, threshold 0.5 a; TWN's rule needs custom "
                "scaling/threshold)",
}


# -- 1, 2: the real pipeline ----------------------------------------------------------------------------
def overrides(o: Options, batch: int, epochs: int, extra: list[str]) -> list[str]:
    subset = [] if o.subset is None else [f"data.subset={o.subset}"]
    return [*subset, f"data.test_subset={o.test_subset}", f"data.batch_size={batch}", "logger=csv",
            "callbacks.progress=none", f"paths.output_dir={o.workdir / 'runs'}", f"paths.store_dir={o.store}",
            "pipeline=single", f"model={ARCH}", f"trainer.max_epochs={epochs}", *extra]


def stage(o: Options, name: str, batch: int, epochs: int, extra: list[str]) -> dict[str, Any]:
    """Train the single stage (never reused from the store: dropped afterwards) and time its steps."""
    results, timed, rec = common.timed_fresh_stage(o, overrides(o, batch, epochs, extra), name, batch)
    st = results["stages"][-1]
    module = rec.modules[-1] if rec.modules else None
    return {**timed, "epochs": epochs, "weight_bits": st.get("weight_bits"), "act_bits": st.get("act_bits"),
            "size_bytes": st.get("size_bytes"), "module": type(module).__name__ if module is not None else None,
            "teacher_bits": list(module.drawn) if getattr(module, "drawn", None) else None}


# -- 3: implementations ---------------------------------------------------------------------------------
def kdlab_model(num_classes: int = 10):
    from kdlab.models import build_model

    return build_model(ARCH, num_classes, 1, input_size=28,
                       quant={"weight_bits": WEIGHT_BITS, "act_bits": ACT_BITS, "first_last": "8bit"})


def float_model(num_classes: int = 10):
    from kdlab.models import build_model

    return build_model(ARCH, num_classes, 1, input_size=28)


def _replace(model, make) -> list[tuple[Any, bool]]:
    """Swap every Conv2d / Linear for ``make(old, edge)`` (edge: first or last to run); returns (new, edge)."""
    from kdlab.models.quant import _execution_order

    order = _execution_order(model, (1, 28, 28))
    edges = {order[0], order[-1]}
    out = []
    for name in order:
        new = make(model.get_submodule(name), name in edges)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, new)
        out.append((new, name in edges))
    return out


# (b) torch.ao fake quantization
def ao_act_fq(bits: int):
    import torch
    from torch.ao.quantization import FakeQuantize, MovingAverageMinMaxObserver

    # averaging_constant 0.1: kdlab's momentum 0.9; the first batch sets min / max in both
    return FakeQuantize(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=2 ** bits - 1,
                        dtype=torch.quint8, qscheme=torch.per_tensor_affine, averaging_constant=0.1)


def ao_weight_fq(bits: int):
    import torch
    from torch.ao.quantization import FakeQuantize, MovingAverageMinMaxObserver

    # averaging_constant 1: this forward's max|W| (kdlab's); [-2^(b-1), 2^(b-1) - 1]: 2 bits = 4 levels
    return FakeQuantize(observer=MovingAverageMinMaxObserver, quant_min=-(2 ** (bits - 1)),
                        quant_max=2 ** (bits - 1) - 1, dtype=torch.qint8, qscheme=torch.per_tensor_symmetric,
                        averaging_constant=1.0)


def ao_model(num_classes: int = 10):
    """The zoo model with each conv / linear wrapped: fake-quantized input and weight around the float op."""
    import torch.nn.functional as F
    from torch import nn

    class AOQuant(nn.Module):
        def __init__(self, inner, edge):
            super().__init__()
            self.inner, self.edge = inner, edge
            self.act = ao_act_fq(EDGE_BITS if edge else ACT_BITS)
            self.wq = ao_weight_fq(EDGE_BITS if edge else WEIGHT_BITS)

        def forward(self, x):
            w = self.wq(self.inner.weight)
            if isinstance(self.inner, nn.Conv2d):
                return self.inner._conv_forward(self.act(x), w, self.inner.bias)
            return F.linear(self.act(x), w, self.inner.bias)

    model = float_model(num_classes)
    layers = _replace(model, AOQuant)
    model.ao_switch = [m.act for m, edge in layers if not edge]
    return model


def ao_set_bits(fq, bits: int) -> None:
    """What switching a torch.ao FakeQuantize's bit-width takes: its range *and* its observer's, then the
    scale / zero point recomputed from the observer's running min / max (forward uses the stored ones)."""
    fq.quant_min, fq.quant_max = 0, 2 ** bits - 1
    obs = fq.activation_post_process
    obs.quant_min, obs.quant_max = 0, 2 ** bits - 1
    scale, zero = obs.calculate_qparams()
    fq.scale.copy_(scale)
    fq.zero_point.copy_(zero)


@contextlib.contextmanager
def ao_bits(quantizers, bits):
    saved = [fq.quant_max.bit_length() for fq in quantizers]
    try:
        for fq, b in zip(quantizers, bits, strict=True):
            fq.disable_observer()  # a teacher pass must not move the running min / max
            ao_set_bits(fq, int(b))
        yield
    finally:
        for fq, b in zip(quantizers, saved, strict=True):
            ao_set_bits(fq, b)
            fq.enable_observer()


# (c) brevitas
def brevitas_info() -> dict[str, Any]:
    try:
        import brevitas
    except ImportError:
        return {"installed": False, "why": f"not installed (pip install {BREVITAS_PIN} to include it)"}
    from importlib import metadata

    root = Path(brevitas.__file__).parent
    files = list(root.rglob("*.py"))
    try:
        reqs = [r for r in (metadata.requires("brevitas") or []) if "extra ==" not in r]
    except metadata.PackageNotFoundError:
        reqs = []
    return {"installed": True, "version": brevitas.__version__, "path": str(root), "py_files": len(files),
            "py_lines": sum(len(f.read_text(errors="replace").splitlines()) for f in files),
            "package_mib": round(sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) / 2**20, 1),
            "requires": reqs}


def brevitas_model(num_classes: int = 10):
    import brevitas.nn as qnn
    from brevitas.core.quant import QuantType
    from brevitas.quant import Int8ActPerTensorFloat, Int8WeightPerTensorFloat
    from torch import nn

    class TernaryWeight(Int8WeightPerTensorFloat):  # {-a, 0, +a}: a = max|W|, |W| > a / 2 (brevitas' ternary)
        quant_type = QuantType.TERNARY
        bit_width = 2
        threshold = 0.5

    def make(old, edge):
        wq, ab = (Int8WeightPerTensorFloat, EDGE_BITS) if edge else (TernaryWeight, ACT_BITS)
        if isinstance(old, nn.Conv2d):
            new = qnn.QuantConv2d(old.in_channels, old.out_channels, old.kernel_size, stride=old.stride,
                                  padding=old.padding, dilation=old.dilation, groups=old.groups,
                                  bias=old.bias is not None, weight_quant=wq, input_quant=Int8ActPerTensorFloat,
                                  input_bit_width=ab)
        else:
            new = qnn.QuantLinear(old.in_features, old.out_features, bias=old.bias is not None, weight_quant=wq,
                                  input_quant=Int8ActPerTensorFloat, input_bit_width=ab)
        new.weight.data.copy_(old.weight.data)
        if old.bias is not None:
            new.bias.data.copy_(old.bias.data)
        return new

    model = float_model(num_classes)
    layers = _replace(model, make)
    model.brevitas_layers = [m for m, edge in layers if not edge]
    model.brevitas_switch = [brevitas_bit_buffer(m) for m in model.brevitas_layers]
    return model


def brevitas_bit_buffer(layer):
    """The tensor holding a brevitas layer's input bit-width (a StatelessBuffer of its BitWidthConst)."""
    return layer.input_quant.fused_activation_quant_proxy.tensor_quant.msb_clamp_bit_width_impl.bit_width.value


@contextlib.contextmanager
def brevitas_bits(buffers, bits):
    saved = [float(b) for b in buffers]
    try:
        for buf, b in zip(buffers, bits, strict=True):
            buf.fill_(float(b))
        yield
    finally:
        for buf, b in zip(buffers, saved, strict=True):
            buf.fill_(b)


def impls() -> dict[str, dict[str, Any]]:
    """name -> {build, switch(model) -> (quantizers, context manager)} for every implementation available."""
    from kdlab.models.quant import activation_bits, switchable

    out = {
        "kdlab": {"build": kdlab_model, "layers": lambda m: switchable(m), "bits": activation_bits},
        "torch.ao": {"build": ao_model, "layers": lambda m: m.ao_switch, "bits": ao_bits},
    }
    if brevitas_info()["installed"]:
        out["brevitas"] = {"build": brevitas_model, "layers": lambda m: m.brevitas_switch, "bits": brevitas_bits}
    return out


def micro(o: Options, batch: int) -> dict[str, Any]:
    """ms per train step and per SPEQ-style step of each implementation; best of ``repeats`` interleaved."""
    import torch
    import torch.nn.functional as F

    from kdlab.distill.speq import cosine_loss
    from kdlab.modules.selfdistill import bn_statistics_kept

    steps, warm = (2, 1) if o.quick else (10, 3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    built = {}
    for name, impl in impls().items():
        torch.manual_seed(0)
        model = impl["build"]()
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        built[name] = (impl, model, opt, impl["layers"](model))

    def train_step(model, opt, extra=None):
        opt.zero_grad(set_to_none=True)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        if extra is not None:
            loss = loss + cosine_loss(extra, logits, 1.0)
        loss.backward()
        opt.step()

    def speq_step(impl, model, opt, layers, i):
        bits = torch.tensor(SPEQ_BITS)[torch.randint(len(SPEQ_BITS), (len(layers),),
                                                     generator=torch.Generator().manual_seed(i))].tolist()
        with torch.no_grad(), impl["bits"](layers, bits), bn_statistics_kept(model):
            t = model(x)
        train_step(model, opt, t)

    def timed(fn, n):
        t0 = time.perf_counter()
        for i in range(n):
            fn(i)
        return 1000 * (time.perf_counter() - t0) / n

    res: dict[str, dict[str, Any]] = {n: {"train_ms": [], "speq_ms": []} for n in built}
    for name, (impl, model, opt, layers) in built.items():  # warm-up (brevitas initializes its scales here)
        for i in range(warm):
            speq_step(impl, model, opt, layers, i)
    for _ in range(max(1, o.repeats)):
        for name, (impl, model, opt, layers) in built.items():
            res[name]["train_ms"].append(round(timed(lambda i, m=model, op=opt: train_step(m, op), steps), 2))
            res[name]["speq_ms"].append(round(timed(
                lambda i, im=impl, m=model, op=opt, ly=layers: speq_step(im, m, op, ly, 1000 + i), steps), 2))
    for name, (impl, model, opt, layers) in built.items():
        r = res[name]
        r["train"], r["speq"] = min(r["train_ms"]), min(r["speq_ms"])
        bits = [SPEQ_BITS[-1]] * len(layers)
        n = 20 if o.quick else 200
        t0 = time.perf_counter()
        for _ in range(n):
            with impl["bits"](layers, bits):
                pass
        r["switch_us"] = round(1e6 * (time.perf_counter() - t0) / n, 1)  # switch all layers and back
        r["switchable_layers"] = len(layers)
        r["switch_works"] = switch_works(name, impl, model, layers)
        r["ternary"] = ternary_levels(name, model)
    return {"batch": batch, "steps": steps, "warmup_steps": warm, "repeats": max(1, o.repeats),
            "precision": "32-true (no autocast)", "results": res}


def switch_works(name: str, impl, model, layers) -> dict[str, Any]:
    """After switching every switchable layer to 8 bits, does each layer's input quantizer produce an 8-bit
    grid (more than 16 levels) over the same range, and do 4 bits come back afterwards?"""
    import torch

    probe = []
    hooks = [q.register_forward_hook(lambda m, i, out: probe.append(getattr(out, "value", out).detach())) for q in _act_modules(name, model, layers)]
    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    was = model.training
    model.eval()  # BN fixed, kdlab's and brevitas' statistics frozen: the same input to every layer each pass

    def forward():
        if name == "torch.ao":  # FakeQuantize ignores eval(): its observers are frozen by hand
            model.apply(torch.ao.quantization.disable_observer)
        model(x)
        levels = [p.unique().numel() for p in probe]
        probe.clear()
        return levels

    try:
        with torch.no_grad():
            at4 = forward()
            with impl["bits"](layers, [8] * len(layers)):
                at8 = forward()
            back = forward()
    finally:
        model.train(was)
        if name == "torch.ao":
            model.apply(torch.ao.quantization.enable_observer)
        for h in hooks:
            h.remove()
    ok = all(a <= 16 for a in at4) and all(b > 16 for b in at8) and back == at4
    return {"ok": ok, "levels_at_4": max(at4), "levels_at_8_min": min(at8), "restored": back == at4}


def _act_modules(name: str, model, layers):
    """The modules whose outputs are the switchable layers' quantized inputs."""
    return [m.input_quant for m in model.brevitas_layers] if name == "brevitas" else list(layers)


def ternary_levels(name: str, model) -> dict[str, Any]:
    """Distinct values of the first non-edge layer's quantized weight ({-a, 0, +a}: 3)."""
    import torch

    with torch.no_grad():
        if name == "kdlab":
            from kdlab.models.quant import quant_layers, quantize_weight

            m = next(m for _, m in quant_layers(model) if not m.edge)
            w = quantize_weight(m.weight, m.weight_bits)
        elif name == "torch.ao":
            m = model.ao_switch[0]
            layer = next(mod for mod in model.modules() if getattr(mod, "act", None) is m)
            w = layer.wq(layer.inner.weight)
        else:
            w = model.brevitas_layers[0].quant_weight().value
        vals = w.unique()
    return {"levels": vals.numel(), "values": [round(float(v), 5) for v in vals[:5]],
            "ternary": vals.numel() == 3 and abs(float(vals[0]) + float(vals[-1])) < 1e-6,
            "quantizer": TERNARY[name]}


def crosscheck() -> dict[str, Any]:
    """kdlab's 4-bit ActQuant vs torch.ao on (1) kdlab's own lo / hi grid, (2) the observer's running grid."""
    import torch
    from torch.ao.quantization import MovingAverageMinMaxObserver

    from kdlab.models.quant import ActQuant

    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(64, 16, 14, 14, generator=g) * (1 + i) + 0.3 * i for i in range(4)]
    act = ActQuant(ACT_BITS).train()
    obs = MovingAverageMinMaxObserver(averaging_constant=0.1, dtype=torch.quint8, quant_min=0,
                                      quant_max=2 ** ACT_BITS - 1)
    for b in batches:
        act(b)  # observes (training, grad enabled)
        obs(b)
    act.eval()
    x = torch.cat(batches)
    ours = act(x)
    scale, zero = act.grid(ACT_BITS)
    same_grid = torch.fake_quantize_per_tensor_affine(x, float(scale), int(zero), 0, 2 ** ACT_BITS - 1)
    o_scale, o_zero = obs.calculate_qparams()
    observer_grid = torch.fake_quantize_per_tensor_affine(x, float(o_scale), int(o_zero), 0, 2 ** ACT_BITS - 1)
    d1, d2 = (ours - same_grid).abs(), (ours - observer_grid).abs()
    # torch.ao's naive switch: quant_min / quant_max changed, scale / zero point left as they were
    fq = ao_act_fq(ACT_BITS)
    for b in batches:
        fq(b)
    fq.disable_observer()
    ref8 = fq(x).clone()
    fq.quant_max = 2 ** 8 - 1
    naive = fq(x)
    ao_set_bits(fq, 8)
    proper = fq(x)
    return {"same_grid_max_abs_diff": float(d1.max()), "same_grid_differing": int((d1 > 0).sum()),
            "observer_grid_max_abs_diff": float(d2.max()), "elements": x.numel(), "step": float(scale),
            "kdlab_grid": [float(scale), float(zero)], "observer_grid": [float(o_scale), int(o_zero)],
            "ao_naive_switch_levels": int(naive.unique().numel()), "ao_naive_switch_range":
            [float(naive.min()), float(naive.max())], "ao_proper_switch_levels": int(proper.unique().numel()),
            "ao_proper_switch_range": [float(proper.min()), float(proper.max())],
            "ao_4bit_range": [float(ref8.min()), float(ref8.max())]}


def loc() -> dict[str, Any]:
    import kdlab.models.quant as kq

    adapter = [ao_act_fq, ao_weight_fq, ao_model, ao_set_bits, ao_bits]
    return {"kdlab_quant_py_lines": len(inspect.getsource(kq).splitlines()),
            "torch_ao_adapter_lines": sum(len(inspect.getsource(f).splitlines()) for f in adapter),
            "brevitas_adapter_lines": sum(len(inspect.getsource(f).splitlines())
                                          for f in (brevitas_model, brevitas_bit_buffer, brevitas_bits))}


# -- the figure -----------------------------------------------------------------------------------------
def run(o: Options) -> dict[str, Any]:
    batch = QUICK_BATCH if o.quick else BATCH
    epochs = o.live_epochs
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
    for i in range(max(1, o.repeats)):
        for side, extra in SIDES.items():
            runs[side].append(stage(o, f"quant-{side}-{i}", batch, epochs, extra))
    best = {side: min(rs, key=lambda r: r["ms_per_step"]) for side, rs in runs.items()}
    fl, qat, speq = (best[s]["ms_per_step"] for s in ("float", "qat", "speq"))
    speq_cost = common.ratio(speq, qat)
    what = f"{ARCH}, Fashion-MNIST, batch {batch}, W{WEIGHT_BITS}/A{ACT_BITS}"
    n_steps = best["float"]["timed_steps"]
    figs = [
        figure("j_float_ms", f"j. float student step ({ARCH}, batch {batch}, pipeline=single)", fl, "ms", None,
               None, f"{n_steps} timed steps; best of {len(runs['float'])}"),
        figure("j_qat_ms", f"j. quantized student step ({what}, distill=none)", qat, "ms", None, None,
               f"ternary weights, 4-bit inputs, first/last 8-bit; best of {len(runs['qat'])}"),
        figure("j_quant_cost", "j. quantized student step / float student step", common.ratio(qat, fl), "x",
               None, None, f"QAT {qat} ms vs float {fl} ms per step (fake quantization, trainer precision auto)"),
        figure("j_speq_ms", f"j. SPEQ step ({what}, distill=speq)", speq, "ms", None, None,
               f"teacher forward at bits drawn from {list(SPEQ_BITS)} + student step; best of {len(runs['speq'])}"),
        figure("j_speq_cost", "j. SPEQ step / QAT step (same quantized model)", speq_cost, "x", "<= 2",
               common.check(speq_cost, "<=", 2.0), f"SPEQ {speq} ms vs QAT {qat} ms (one extra no-grad forward)"),
    ]
    m = micro(o, batch)
    brev = brevitas_info()
    lines = loc()
    size = {"kdlab": f"kdlab/models/quant.py, {lines['kdlab_quant_py_lines']} lines, no dependency",
            "torch.ao": f"part of torch; {lines['torch_ao_adapter_lines']} lines of adapter here",
            "brevitas": (f"brevitas {brev.get('version')}: {brev.get('py_lines')} lines in {brev.get('py_files')} files, "
                         f"{brev.get('package_mib')} MiB; requires {', '.join(brev.get('requires', []))}")}
    mwhat = f"{ARCH}, batch {batch}, fp32, forward+backward+SGD"
    for name in ("kdlab", "torch.ao", "brevitas"):
        key = name.replace(".", "")
        r = m["results"].get(name)
        if r is None:
            figs.append(figure(f"j_cmp_{key}", f"j. train step, {name} ({mwhat})", None, "ms", None, None,
                               brev["why"]))
            figs.append(figure(f"j_cmp_{key}_switch", f"j. SPEQ-style step with per-forward bit switching, {name}",
                               None, "ms", None, None, brev["why"]))
            continue
        t = r["ternary"]
        tern = f"{TERNARY[name]}; {t['levels']} weight levels measured"
        figs.append(figure(f"j_cmp_{key}", f"j. train step, {name} ({mwhat})", r["train"], "ms", None, None,
                           f"{tern}; {size[name]}"))
        sw = r["switch_works"]
        figs.append(figure(f"j_cmp_{key}_switch", f"j. SPEQ-style step with per-forward bit switching, {name}",
                           r["speq"], "ms", None, None,
                           f"switching {'works' if sw['ok'] else 'FAILS'} ({sw['levels_at_4']} -> "
                           f">= {sw['levels_at_8_min']} levels, restored {sw['restored']}); "
                           f"{r['switchable_layers']} layers switched and back in {r['switch_us']} us"))
    cc = crosscheck()
    figs.append(figure("j_crosscheck_ao", "j. kdlab 4-bit ActQuant vs torch.fake_quantize_per_tensor_affine, same grid",
                       cc["same_grid_max_abs_diff"], "", "== 0", cc["same_grid_max_abs_diff"] == 0.0,
                       f"{cc['same_grid_differing']} of {cc['elements']} differ (step {cc['step']:.4g}); "
                       f"vs torch.ao's observer grid: max {cc['observer_grid_max_abs_diff']:.3g}", any_size=True))
    return {"name": "quant", "figures": figs,
            "details": {"runs": runs, "best": best, "batch": batch, "epochs": epochs, "arch": ARCH,
                        "quant": {"weight_bits": WEIGHT_BITS, "act_bits": ACT_BITS, "first_last": "8bit"},
                        "micro": m, "crosscheck": cc, "brevitas": brev, "loc": lines}}


if __name__ == "__main__":
    common.cli(run, __doc__.splitlines()[0])
