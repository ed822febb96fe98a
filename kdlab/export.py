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
docs/export.md has the formats, the tolerances and how they were measured.
"""
from __future__ import annotations

import argparse
import copy
import io
import json
import math
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import kdlab
from kdlab.errors import ConfigError, KdlabError, StoreError, warn

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


@dataclass
class Target:
    """A stored stage to export: its model (eval mode, float32, weights loaded) and where it came from."""

    model: nn.Module
    entry: dict[str, Any]
    description: dict[str, Any]
    key: str
    stage: str
    run_dir: Path | None = None
    results: dict[str, Any] | None = None
    data: Any = None  # the run's data module (None: a bare store key, or the data could not be loaded)
    notes: list[str] = field(default_factory=list)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        from kdlab.models.base import input_hw

        return (int(self.description["in_channels"]), *input_hw(self.description["input_size"]))

    @property
    def quantized_activations(self) -> bool:
        from kdlab.models.quant import quant_layers

        return any(m.act.bits is not None for _, m in quant_layers(self.model))


# -- finding the stage ---------------------------------------------------------------------------------
def default_store_dir() -> Path:
    """The config's ``paths.store_dir`` (conf/paths/default.yaml), relative to the working directory."""
    from omegaconf import OmegaConf

    from kdlab.hydra_app import CONF_DIR

    paths = OmegaConf.load(Path(CONF_DIR) / "paths" / "default.yaml")
    return Path(str(OmegaConf.to_container(OmegaConf.create({"paths": paths}), resolve=True)["paths"]["store_dir"]))


def _open_store(root: Path) -> Any:
    from kdlab.store import StageStore

    return StageStore(root, on_corrupt="fail", writer=False)  # read-only; a damaged stage is an error


def _known_keys(root: Path, limit: int = 10) -> str:
    keys = sorted(p.name for p in root.glob("*") if (p / "DONE").is_file()) if root.is_dir() else []
    if not keys:
        return "none"
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def _record(key: str, roots: list[Path], what: str) -> Any:
    """The verified stored stage ``key`` from the first of ``roots`` that holds it."""
    for root in roots:
        record = _open_store(root).lookup(key, what)
        if record is not None:
            return record
    raise ConfigError(f"{what}: store key {key!r} is not in the store {str(roots[0])!r} (set --store)")


def _store_roots(row: dict[str, Any], run_dir: Path, store: Path | None) -> list[Path]:
    """Where a run's stage may be stored: --store, else the store of its checkpoint path (as written, then
    relative to the run directory's ancestors: a relative paths.store_dir is relative to where the run ran)."""
    if store is not None:
        return [store]
    ckpt = Path(str(row.get("checkpoint") or ""))
    roots = [ckpt.parent.parent] if ckpt.parts else []
    if ckpt.parts and not ckpt.is_absolute():
        roots += [anc / ckpt.parent.parent for anc in run_dir.resolve().parents]
    return [r for r in roots if (r / row["store_key"]).is_dir()] or roots[:1] or [default_store_dir()]


def run_data_config(results: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """(the run's ``data`` config without batch_size, its batch size) from results.json's resolved config."""
    data: dict[str, Any] = {}
    for k, v in (results.get("config") or {}).items():
        if k.startswith("data."):
            node, parts = data, k.split(".")[1:]
            for p in parts[:-1]:
                node = node.setdefault(p, {})
            node[parts[-1]] = v
    if "name" not in data:
        raise KdlabError("results.json has no data config (config.data.*); cannot rebuild the run's test images")
    return data, int(data.pop("batch_size", 64) or 64)


def load_run_data(results: dict[str, Any]) -> Any:
    from kdlab.data import build_datamodule

    data_cfg, batch_size = run_data_config(results)
    return build_datamodule(data_cfg, batch_size=batch_size, seed=int(results.get("seed") or 0))


def build_target(model_entry: dict[str, Any], description: dict[str, Any], state_dict: dict[str, torch.Tensor]
                 ) -> nn.Module:
    from kdlab.pipeline.assemble import model_from_entry

    model = model_from_entry(model_entry, int(description["num_classes"]), int(description["in_channels"]),
                             description["input_size"])
    model.load_state_dict(state_dict)
    return model.float().eval().requires_grad_(False)


def resolve(source: str, stage: str | None, store: Path | None, with_data: bool = True) -> Target:
    """The stage that ``source`` (a run directory, a stage directory of the store, or a store key) names."""
    from kdlab.models.base import input_hw

    path = Path(source)
    run_dir, results = None, None
    if path.is_dir() and (path / "results.json").is_file():
        run_dir = path
        try:
            results = json.loads((path / "results.json").read_text())
            rows = list(results["stages"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"cannot read {str(path / 'results.json')!r}: {e}") from e
        if not rows:
            raise ConfigError(f"run {str(path)!r} has no finished stage (status {results.get('status')!r})")
        names = [r["name"] for r in rows]
        name = stage if stage is not None else names[-1]
        if name not in names:
            raise ConfigError(f"unknown --stage {name!r}; stages of run {str(path)!r}: {', '.join(names)}")
        row = rows[names.index(name)]
        record = _record(str(row["store_key"]), _store_roots(row, path, store), f"stage {name}")
    elif path.is_dir() and (path / "meta.json").is_file():  # a stage directory of the store: <store>/<key>
        if stage is not None:
            raise ConfigError(f"--stage selects a stage of a run directory; {source!r} is one stored stage")
        record = _record(path.name, [path.parent], f"stage directory {source!r}")
        name = str(record.meta.get("name") or record.key)
    elif path.is_dir():
        raise ConfigError(f"{source!r} is a directory without results.json: not a run directory (nor a stored "
                          f"stage with meta.json)")
    else:
        root = store if store is not None else default_store_dir()
        if stage is not None:
            raise ConfigError(f"--stage selects a stage of a run directory; {source!r} is not one")
        if "/" in source or source in ("", ".", ".."):
            raise ConfigError(f"run directory {source!r} does not exist (a run directory holds results.json)")
        if not (root / source / "DONE").is_file():
            raise ConfigError(f"{source!r} is neither a run directory (with results.json) nor a key in the "
                              f"store {str(root)!r}; known keys: {_known_keys(root)}")
        record = _record(source, [root], f"store key {source!r}")
        name = str(record.meta.get("name") or record.key)
    meta = record.meta
    try:
        entry, desc = dict(meta["model"]), dict(meta["description"])
        model = build_target(entry, desc, record.state_dict())
    except (KeyError, TypeError) as e:
        raise StoreError(f"stage {name} ({record.key}): meta.json lacks the model spec ({e})") from e
    except RuntimeError as e:  # load_state_dict: the weights do not fit the model
        raise StoreError(f"stage {name} ({record.key}): its weights do not fit its model: "
                         f"{str(e).splitlines()[0]}") from e
    target = Target(model=model, entry=entry, description=desc, key=record.key, stage=name, run_dir=run_dir,
                    results=results)
    if results is not None and with_data:
        try:
            dm = load_run_data(results)
        except KdlabError as e:
            target.notes.append(f"the run's data cannot be loaded: {e}")
            warn(f"the run's data cannot be loaded ({e}); the check uses random inputs")
        else:
            shape = (int(dm.in_channels), *input_hw(dm.image_size))
            if shape != target.input_shape or int(dm.num_classes) != int(desc["num_classes"]):
                raise KdlabError(f"the run's data ({dm.num_classes} classes, {shape}) does not match stage {name} "
                                 f"({desc['num_classes']} classes, {target.input_shape})")
            target.data = dm
    return target


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


# -- the check ---------------------------------------------------------------------------------------------
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

    from kdlab.fileio import load_weights
    from kdlab.models.quant import quant_layers, quantize_weight

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


# -- the command ---------------------------------------------------------------------------------------------
def default_out(t: Target, fmt: str) -> Path:
    name = (t.stage if t.run_dir is not None else t.key) + FORMATS[fmt]
    return (t.run_dir / "export" / name) if t.run_dir is not None else Path("export") / name


def export(source: str, fmt: str, stage: str | None = None, out: str | Path | None = None,
           store: str | Path | None = None, n_check: int = DEFAULT_CHECK) -> tuple[Path, CheckResult | None, Target]:
    """Export the stage ``source`` names (see the module doc); returns (the file, the check or None, the stage)."""
    from kdlab.fileio import atomic_write_bytes

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
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
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
