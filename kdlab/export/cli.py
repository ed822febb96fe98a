"""``python -m kdlab.export``: a finished stage as an ONNX model, a TorchScript module or a plain state_dict.

    python -m kdlab.export outputs/runs/2026-12-01/10-00-00 --format onnx          # the run's student
    python -m kdlab.export outputs/runs/2026-12-01/10-00-00 --stage teacher --format torchscript
    python -m kdlab.export 3f1c0d9a2b4e5f607182 --format state_dict --store outputs/store

The source is a run directory (its ``results.json`` names every stage's store key; default: the last stage)
or a store key (``--store``, default the config's ``paths.store_dir``). The model is rebuilt from the stored
stage's ``meta.json`` (``model`` entry and ``description``: classes, channels, image size) by the code that
trains it (:func:`kdlab.pipeline.assemble.model_from_entry`) and its stored weights are loaded.

Every export is checked before anything is written (``--check N``, default 256 inputs; 0 skips it): the run's
test images (the run's data module rebuilt from its resolved config), or random inputs for a bare store key,
go through kdlab (eval mode, float32) and the exported file (onnxruntime on the CPU, the TorchScript module,
the state_dict reloaded into a fresh model). The file is written (atomically) only when the check passes.

Quantized models (``model.quant``): each quantized layer's weight is folded into a constant on its grid
(codes x scale, what the layer computes in every forward pass), so the exported graph does not recompute the
ternary threshold; the input fake-quantization (clamp to the layer's grid, round, rescale) stays in the graph.
docs/export.md has the formats, the tolerances and how they were measured. This module writes the formats and
runs the command; :mod:`kdlab.export.target` finds and rebuilds the stage, :mod:`kdlab.export.check` checks the
export.
"""
from __future__ import annotations

import argparse
import copy
import io
import json
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import kdlab
from kdlab.cli.report import report_error
from kdlab.errors import ConfigError, KdlabError
from kdlab.export.check import CheckResult, check, check_inputs
from kdlab.export.target import Target, resolve

# torch and the rest load after the arguments are checked: a bad argument answers at once
if TYPE_CHECKING:
    import torch
    from torch import nn

FORMATS = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "state_dict": ".state_dict.pt"}
DEFAULT_CHECK = 256
# The TorchScript-based exporter (dynamo=False), opset 17: on torch 2.14 the dynamo exporter (the default, it
# needs onnxscript) took ~12 s for a resnet8 against ~0.5 s, and its graph optimizer wrote an invalid graph for
# a quantized resnet8 (onnxruntime: "Node input 'relu_2_min_1' is not a graph input"); without the optimizer its
# graph was valid but differed from kdlab by 4.5e-4 where the TorchScript exporter's matched exactly.
OPSET = 17
# -- what is exported ------------------------------------------------------------------------------------
def folded(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose quantized layers hold their weight on its grid (codes x scale, what the
    layer's forward computes from the float weight) as a constant: the export does not recompute the
    threshold. The input quantizers stay as they are (their clamp and round go into the exported graph)."""
    import torch

    from kdlab.models.quant import quant_layers, quantize_weight

    out = copy.deepcopy(model).eval()
    with torch.no_grad():
        for _, m in quant_layers(out):
            if m.weight_bits is not None:
                m.weight.copy_(quantize_weight(m.weight, m.weight_bits))
                m.weight_bits = None
    return out


def input_grid(act: Any) -> dict[str, torch.Tensor]:
    """The clamp bounds and step of an input quantizer, as its forward computes them:
    ``x_q = round(clamp(x, lo, hi) / scale) * scale``."""
    scale, zero = act.grid(act.bits)
    levels = 2 ** act.bits - 1
    return {"input_lo": ((0 - zero) * scale).float(), "input_hi": ((levels - zero) * scale).float(),
            "input_scale": scale.float()}


def export_metadata(t: Target, fmt: str) -> dict[str, Any]:
    """The ``kdlab_export`` dict every format carries (ONNX metadata_props, TorchScript extra file, .pt key)."""
    from kdlab.models.quant import quant_layers, quant_report

    q = quant_report(t.model)
    dm = t.data
    return {
        "format": fmt, "kdlab_version": kdlab.__version__, "stage": t.stage, "store_key": t.key,
        "arch": t.entry.get("arch"), "model": t.entry, "num_classes": int(t.description["num_classes"]),
        "input_shape": list(t.input_shape), "input": "float32 NCHW, normalized: (x / 255 - mean) / std",
        "mean": list(dm.mean) if dm is not None else None, "std": list(dm.std) if dm is not None else None,
        "dataset": getattr(dm, "name", None) if dm is not None else None,
        "weight_bits": q["weight_bits"], "act_bits": q["act_bits"], "first_last": q.get("first_last"),
        "layers": {n: {"weight_bits": m.weight_bits, "act_bits": m.act.bits} for n, m in quant_layers(t.model)},
        "opset": OPSET if fmt == "onnx" else None,
    }


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def onnx_bytes(t: Target, meta: dict[str, Any]) -> bytes:
    import onnx
    import torch


    buf = io.BytesIO()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice: about torch, not the model
            torch.onnx.export(folded(t.model), (torch.zeros(2, *t.input_shape),), buf, dynamo=False,
                              opset_version=OPSET, input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    except Exception as e:  # an operator the exporter cannot express: one line, exit 1
        raise KdlabError(f"cannot export stage {t.stage} to ONNX: {_first_line(e)}") from e
    proto = onnx.load_from_string(buf.getvalue())
    entry = proto.metadata_props.add()
    entry.key, entry.value = "kdlab_export", json.dumps(meta, default=str)
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def torchscript_bytes(t: Target, meta: dict[str, Any]) -> bytes:
    import torch

    buf = io.BytesIO()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer and deprecation warnings
            traced = torch.jit.trace(folded(t.model), torch.zeros(2, *t.input_shape), check_trace=False)
            torch.jit.save(traced, buf, _extra_files={"kdlab_export.json": json.dumps(meta, default=str)})
    except Exception as e:
        raise KdlabError(f"cannot trace stage {t.stage} to TorchScript: {_first_line(e)}") from e
    return buf.getvalue()


def quantized_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """For every quantized layer: ``<layer>.weight_codes`` (int8; int16 above 8 bits) and ``<layer>.weight_scale``
    (codes x scale is the weight the layer computes with) and its input grid ``<layer>.input_lo / input_hi /
    input_scale`` (:func:`input_grid`)."""
    import torch

    from kdlab.models.quant import quant_layers, weight_codes

    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, m in quant_layers(model):
            if m.weight_bits is not None:
                codes, scale = weight_codes(m.weight, m.weight_bits)
                out[f"{name}.weight_codes"], out[f"{name}.weight_scale"] = codes.contiguous(), scale.float()
            if m.act.bits is not None:
                out.update({f"{name}.{k}": v for k, v in input_grid(m.act).items()})
    return out


def state_dict_bytes(t: Target, meta: dict[str, Any]) -> bytes:
    import torch

    payload = {"state_dict": {k: v.detach().cpu().contiguous() for k, v in t.model.state_dict().items()},
               "quantized": quantized_tensors(t.model), "kdlab_export": meta}
    buf = io.BytesIO()
    torch.save(payload, buf)
    return buf.getvalue()


WRITERS = {"onnx": onnx_bytes, "torchscript": torchscript_bytes, "state_dict": state_dict_bytes}


# -- the command ---------------------------------------------------------------------------------------------
def default_out(t: Target, fmt: str) -> Path:
    name = (t.stage if t.run_dir is not None else t.key) + FORMATS[fmt]
    return (t.run_dir / "export" / name) if t.run_dir is not None else Path("export") / name


def export(source: str, fmt: str, stage: str | None = None, out: str | Path | None = None,
           store: str | Path | None = None, n_check: int = DEFAULT_CHECK) -> tuple[Path, CheckResult | None, Target]:
    """Export the stage ``source`` names (see the module doc); returns (the file, the check or None, the stage)."""
    from kdlab.store.fileio import atomic_write_bytes

    if fmt not in FORMATS:
        raise ConfigError(f"unknown --format {fmt!r}; known: {', '.join(FORMATS)}")
    if n_check < 0:
        raise ConfigError(f"--check must be 0 (no check) or a positive number of inputs, got {n_check}")
    t = resolve(source, stage, Path(store) if store is not None else None, with_data=True)
    path = Path(out) if out is not None else default_out(t, fmt)
    if path.is_dir():
        path = path / ((t.stage if t.run_dir is not None else t.key) + FORMATS[fmt])
    data = WRITERS[fmt](t, export_metadata(t, fmt))
    result = None
    if n_check:
        x, what = check_inputs(t, n_check)
        result = check(t, fmt, data, x, what)
        if not result.ok:
            against = {"onnx": "onnxruntime", "torchscript": "torchscript", "state_dict": "reloaded state_dict"}[fmt]
            raise KdlabError(f"export check failed, nothing written: {result.line(against)}")
    try:
        atomic_write_bytes(path, data)
    except OSError as e:
        raise KdlabError(f"cannot write {str(path)!r}: {e.strerror or e}") from e
    return path, result, t


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line and exit 2, as every kdlab command
        raise ConfigError(message)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(prog="python -m kdlab.export", description="Export a finished stage to ONNX, TorchScript or a "
                "plain state_dict, checked against kdlab before it is written.")
    p.add_argument("source", metavar="RUN_DIR|STORE_KEY", help="a run directory (with results.json) or a store key")
    p.add_argument("--stage", default=None, help="the run's stage to export (default: the last, the student)")
    p.add_argument("--format", dest="fmt", default=None, help="onnx | torchscript | state_dict")
    p.add_argument("--out", default=None, help="the file to write (default: RUN_DIR/export/<stage><suffix>, or "
                   "export/<key><suffix>)")
    p.add_argument("--store", default=None, help="the store directory (default: the config's paths.store_dir)")
    p.add_argument("--check", type=int, default=DEFAULT_CHECK, metavar="N",
                   help=f"inputs to compare kdlab and the export on (default {DEFAULT_CHECK}; 0: no check)")
    args = p.parse_args(argv)
    if args.fmt is None:
        raise ConfigError(f"--format is required; known: {', '.join(FORMATS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        path, result, t = export(args.source, args.fmt, stage=args.stage, out=args.out, store=args.store,
                              n_check=args.check)
    except KdlabError as e:
        return report_error("kdlab.export", e)
    q = t.entry.get("quant") or {}
    bits = f", weights {q.get('weight_bits') or 32} / activations {q.get('act_bits') or 32} bits" if q else ""
    otf = ", on-the-fly" if t.entry.get("on_the_fly") else ""
    print(f"wrote {path} ({path.stat().st_size} bytes): {args.fmt} of stage {t.stage} ({t.entry.get('arch')}{otf}"
          f"{bits}; store key {t.key})")
    if result is not None:
        print(result.line({"onnx": "onnxruntime", "torchscript": "torchscript",
                           "state_dict": "reloaded state_dict"}[args.fmt]))
    else:
        print("check skipped (--check 0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
