"""``python -m kdlab.export``: a float, an on-the-fly and a quantized stage of one real (tiny) run exported to ONNX
(checked here with onnxruntime, independently of the command's own check), TorchScript and a state_dict with
integer codes; bad inputs are one line, exit 2, and leave no file."""
from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from kdlab.export.check import FLOAT_MAX_DIFF, QUANT_MIN_AGREEMENT
from kdlab.export.cli import main
from kdlab.export.target import resolve
from kdlab.models.quant import QuantMixin, quantize_weight
from tests.helpers.cli import ROOT, kdlab_env, read_results, run_kdlab

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

# one run, three stages: a float teacher, an on-the-fly (1xN) TA, a ternary-weight / 4-bit-activation student
RUN = ["preset=none", "data=synthetic", "data.n_train=160", "data.n_test=96", "data.batch_size=32", "logger=none",
       "trainer.max_epochs=1", "callbacks.progress=plain", "pipeline.chain=[resnet8,resnet8,resnet8]",
       "pipeline.topology=sequential", "+pipeline.per_stage.ta1.model.on_the_fly=true",
       "+pipeline.per_stage.student.model.quant={weight_bits:2,act_bits:4}"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    proc = run_kdlab(RUN, out, out / "run", synth=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = read_results(out / "run")
    flags = {s["name"]: (s["on_the_fly"], s["weight_bits"], s["act_bits"]) for s in results["stages"]}
    assert flags == {"teacher": (False, 32, 32), "ta1": (True, 32, 32), "student": (False, 2, 4)}
    return out / "run", out / "store", results


def stage_and_images(run_dir: Path, stage: str):
    """kdlab's model of ``stage`` and the run's test images, as the command rebuilds them."""
    t = resolve(str(run_dir), stage, None)
    x = torch.cat([b[0] for b in t.data.test_dataloader()])
    with torch.no_grad():
        ref = t.model(x)
    return t, x, ref


@pytest.mark.parametrize("stage", ["teacher", "ta1", "student"])
def test_onnx_matches_kdlab_in_onnxruntime(run, tmp_path, capsys, stage):
    run_dir = run[0]
    path = tmp_path / f"{stage}.onnx"
    assert main([str(run_dir), "--stage", stage, "--format", "onnx", "--out", str(path), "--check", "96"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {path} ({path.stat().st_size} bytes): onnx of stage {stage} (resnet8" in printed
    assert "96 test images of synthetic" in printed
    assert ": ok" in printed
    _, x, ref = stage_and_images(run_dir, stage)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(None, {"input": x.numpy()})[0]
    assert out.shape == (96, 10)
    assert session.run(None, {"input": x[:3].numpy()})[0].shape == (3, 10)  # the batch axis is dynamic
    diff = np.abs(out - ref.numpy()).max()
    agree = (out.argmax(1) == ref.numpy().argmax(1)).mean()
    proto = onnx.load(str(path))
    meta = json.loads({p.key: p.value for p in proto.metadata_props}["kdlab_export"])
    assert meta["stage"] == stage and meta["input_shape"] == [1, 28, 28] and meta["num_classes"] == 10
    ops = {n.op_type for n in proto.graph.node}
    if stage == "student":
        assert agree >= QUANT_MIN_AGREEMENT
        assert "Round" in ops  # the input fake-quantization is in the graph
        # the ternary weights are folded into constants (with the BatchNorm the exporter folds in, a per-channel
        # factor): every output channel of each conv (but the 8-bit first one) has <= 3 distinct values
        weights = [onnx.numpy_helper.to_array(i) for i in proto.graph.initializer if len(i.dims) == 4]
        levels = sorted(max(len(np.unique(c)) for c in w) for w in weights)
        assert len(levels) > 2 and levels[-2] <= 3 < levels[-1], levels
        assert (meta["weight_bits"], meta["act_bits"]) == (2, 4)
    else:
        assert diff <= FLOAT_MAX_DIFF and agree == 1.0
        assert "Round" not in ops
    if stage == "ta1":  # on-the-fly: every k x k convolution became 1 x k
        kernels = {tuple(a.ints) for n in proto.graph.node if n.op_type == "Conv" for a in n.attribute
                   if a.name == "kernel_shape"}
        assert (1, 3) in kernels and (3, 3) not in kernels


def test_torchscript_round_trip_is_exact(run, tmp_path, capsys):
    run_dir = run[0]
    for stage in ("ta1", "student"):
        path = tmp_path / f"{stage}.pt"
        assert main([str(run_dir), "--stage", stage, "--format", "torchscript", "--out", str(path)]) == 0
        assert ": ok" in capsys.readouterr().out
        _, x, ref = stage_and_images(run_dir, stage)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit's deprecation notice
            module = torch.jit.load(str(path))
        with torch.no_grad():
            assert torch.equal(module(x), ref)


def test_state_dict_holds_codes_scales_and_grids(run, tmp_path, capsys):
    run_dir = run[0]
    path = tmp_path / "student.pt"
    assert main([str(run_dir), "--format", "state_dict", "--out", str(path), "--check", "32"]) == 0  # the last stage
    assert "reloaded state_dict" in capsys.readouterr().out
    payload = torch.load(path, weights_only=True)
    meta, sd, q = payload["kdlab_export"], payload["state_dict"], payload["quantized"]
    assert meta["stage"] == "student" and meta["arch"] == "resnet8" and (meta["weight_bits"], meta["act_bits"]) == (2, 4)
    assert meta["model"]["quant"]["weight_bits"] == 2 and meta["input_shape"] == [1, 28, 28]
    t, x, ref = stage_and_images(run_dir, "student")
    layers = [(n, m) for n, m in t.model.named_modules() if isinstance(m, QuantMixin)]
    assert layers and all(f"{n}.weight_codes" in q for n, _ in layers)
    ternary = 0
    for name, m in layers:
        codes, scale = q[f"{name}.weight_codes"], q[f"{name}.weight_scale"]
        assert codes.dtype == torch.int8 and scale.numel() == 1
        with torch.no_grad():
            assert torch.equal(codes.float() * scale, quantize_weight(sd[f"{name}.weight"], m.weight_bits))
        if m.weight_bits == 2:
            ternary += 1
            assert set(codes.unique().tolist()) <= {-1, 0, 1}
        else:  # the first and last layers: 8 bits
            assert m.weight_bits == 8 and int(codes.abs().max()) <= 127 and len(codes.unique()) > 3
        lo, hi, step = q[f"{name}.input_lo"], q[f"{name}.input_hi"], q[f"{name}.input_scale"]
        assert float(lo) <= 0 <= float(hi) and float(step) > 0
        levels = 2 ** m.act.bits - 1
        assert abs(float((hi - lo) / step) - levels) < 1e-3
    assert ternary == len(layers) - 2
    fresh = resolve(str(run_dir), "student", None, with_data=False).model
    fresh.load_state_dict(sd)
    with torch.no_grad():
        assert torch.equal(fresh(x), ref)


def test_store_key_uses_random_inputs_and_says_so(run, tmp_path, capsys):
    _, store, results = run
    key = results["stages"][1]["store_key"]
    path = tmp_path / "k.onnx"
    assert main([key, "--store", str(store), "--format", "onnx", "--out", str(path), "--check", "16"]) == 0
    printed = capsys.readouterr().out
    assert "16 random inputs" in printed and "store key" in printed and path.stat().st_size > 0


def _bad(run_dir: Path, store: Path) -> list[tuple[list[str], list[str]]]:
    return [
        ([str(run_dir), "--format", "tflite"], ["'tflite'", "onnx, torchscript, state_dict"]),
        ([str(run_dir / "missing"), "--format", "onnx"], ["missing", "does not exist"]),
        (["0123456789abcdef0123", "--format", "onnx", "--store", str(store)], ["'0123456789abcdef0123'", "known keys"]),
        ([str(run_dir), "--stage", "ta9", "--format", "onnx"], ["'ta9'", "teacher, ta1, student"]),
        ([str(run_dir), "--format", "onnx", "--check", "-3"], ["--check", "-3"]),
    ]


def test_bad_inputs_exit_2_with_one_line_and_no_file(run, tmp_path, capsys):
    run_dir, store, _ = run
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for argv, words in _bad(run_dir, store):
        assert main([*argv, "--out", str(out_dir / "m.bin")]) == 2, argv
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("kdlab.export: error: "), captured.err
        assert all(w in lines[0] for w in words), (lines[0], words)
        assert captured.out == ""
        assert list(out_dir.iterdir()) == []  # nothing written, no temporary file left
    assert not (run_dir / "export").exists()


def test_failed_check_writes_nothing(run, tmp_path, capsys, monkeypatch):
    import kdlab.export.check as ex

    monkeypatch.setattr(ex, "FLOAT_MAX_DIFF", -1.0)  # no export can pass: the check must refuse to write
    path = tmp_path / "t.onnx"
    assert main([str(run[0]), "--stage", "teacher", "--format", "onnx", "--out", str(path), "--check", "8"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "check failed" in err[0] and "FAILED" in err[0]
    assert list(tmp_path.iterdir()) == []


def test_module_entry_point_bad_format():
    proc = subprocess.run([sys.executable, "-m", "kdlab.export", "some/run", "--format", "coreml"], cwd=ROOT,
                          env=kdlab_env(), capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "kdlab.export: error: unknown --format 'coreml'; known: onnx, torchscript, state_dict"
