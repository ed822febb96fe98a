"""Model zoo: shapes, reference parameter counts, feature taps, errors and the `python -m kdlab.zoo` CLI."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdlab.errors import ConfigError
from kdlab.models import (
    MODELS,
    FeatureTaps,
    build_model,
    count_macs,
    count_params,
    feature_points,
    feature_shapes,
    list_models,
)

ZOO = list_models()


@pytest.fixture(autouse=True)
def one_thread():
    # per test, after conftest's thread setting: batch-2 CIFAR passes gain nothing from threads, and on a
    # busy 2-core machine a second thread makes them many times slower
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# --------------------------------------------------------------------------- reference parameter counts
# The plain-CNN tables exactly as ALGORITHMS.md (TAKD / DGKD released code) writes them.
PLAIN_TABLE = {
    "cifar10": {
        2: "C16-MP-C16-MP-FC10",
        4: "C16-C16-MP-C32-C32-MP-FC10",
        6: "C16-C16-MP-C32-C32-MP-C64-C64-MP-FC10",
        8: "C16-C16-MP-C32-C32-MP-C64-C64-MP-C128-C128-MP-FC64-FC10",
        10: "C32-C32-MP-C64-C64-MP-C128-C128-MP-C256x4-MP-FC128-FC10",
    },
    "cifar100": {
        2: "C32-MP-C32-MP-FC100",
        4: "C32-C32-MP-C64-C64-MP-FC100",
        6: "C32-C32-MP-C64-C64-MP-C128-C128-FC100",
        8: "C32-C32-MP-C64-C64-MP-C128-C128-MP-C256-C256-MP-FC64-FC100",
        10: "C32-C32-MP-C64-C64-MP-C128-C128-MP-C256x4-MP-FC512-FC100",
    },
}


def plain_params_by_hand(spec: str, in_ch: int = 3, size: int = 32) -> int:
    """3x3 conv with bias (9*cin*cout + cout) + BN (2*cout); MP halves the side; FC (nin*nout + nout)."""
    tokens = []
    for t in spec.split("-"):
        if "x" in t:
            base, times = t.split("x")
            tokens += [base] * int(times)
        else:
            tokens.append(t)
    c, side, fc_in, total = in_ch, size, None, 0
    for t in tokens:
        if t.startswith("C"):
            cout = int(t[1:])
            total += 9 * c * cout + cout + 2 * cout
            c = cout
        elif t == "MP":
            side //= 2
        else:
            nout = int(t[2:])
            nin = fc_in if fc_in is not None else c * side * side
            total += nin * nout + nout
            fc_in = nout
    return total


def resnet_params_by_hand(depth: int, widths=(16, 16, 32, 64), num_classes: int = 100, in_ch: int = 3) -> int:
    """Stem 3x3 conv (no bias) + BN; per basic block two 3x3 convs + two BNs, plus a 1x1 conv + BN shortcut
    where the stride or the width changes; FC."""
    n = (depth - 2) // 6
    total = 9 * in_ch * widths[0] + 2 * widths[0]
    cin = widths[0]
    for w, stride in zip(widths[1:], (1, 2, 2)):
        for j in range(n):
            ci = cin if j == 0 else w
            total += 9 * ci * w + 2 * w + 9 * w * w + 2 * w
            if j == 0 and (stride != 1 or ci != w):
                total += ci * w + 2 * w
        cin = w
    return total + cin * num_classes + num_classes


@pytest.mark.parametrize("variant,classes", [("cifar10", 10), ("cifar100", 100)])
@pytest.mark.parametrize("depth", [2, 4, 6, 8, 10])
def test_plain_param_counts(depth, variant, classes):
    spec = PLAIN_TABLE[variant][depth]
    assert count_params(build_model(f"plain{depth}", classes)) == plain_params_by_hand(spec)
    # the variant follows num_classes unless given; 1-channel 28x28 changes the stem and the FC input
    m = build_model(f"plain{depth}", classes, in_channels=1, input_size=28)
    assert count_params(m) == plain_params_by_hand(spec, in_ch=1, size=28)
    other = "cifar100" if variant == "cifar10" else "cifar10"
    m = build_model(f"plain{depth}", classes, variant=other)
    assert count_params(m) == plain_params_by_hand(
        PLAIN_TABLE[other][depth].rsplit("-", 1)[0] + f"-FC{classes}"
    )


def test_plain_reference_numbers():
    # spot values (CIFAR-100 plain2 / plain10, CIFAR-10 plain10) of the TAKD/DGKD definitions
    assert count_params(build_model("plain2", 100)) == 215_172
    assert count_params(build_model("plain10", 100)) == 2_931_460
    assert count_params(build_model("plain10", 10)) == 2_487_850


@pytest.mark.parametrize("depth", [8, 14, 20, 26, 32, 44, 56, 110])
def test_resnet_param_counts(depth):
    for classes in (10, 100):
        assert count_params(build_model(f"resnet{depth}", classes)) == resnet_params_by_hand(
            depth, num_classes=classes
        )
    assert count_params(
        build_model(f"resnet{depth}", 10, in_channels=1, input_size=28)
    ) == resnet_params_by_hand(depth, num_classes=10, in_ch=1)


def test_resnet_x4_and_reference_numbers():
    wide = (32, 64, 128, 256)
    assert count_params(build_model("resnet8x4", 100)) == resnet_params_by_hand(8, wide) == 1_233_540
    assert count_params(build_model("resnet32x4", 100)) == resnet_params_by_hand(32, wide) == 7_433_860
    assert resnet_params_by_hand(20) == 278_324  # RepDistiller / TAKD resnet20, 100 classes
    assert count_params(build_model("resnet20", 100)) == 278_324


def test_macs_by_hand():
    # plain2 / CIFAR-100: conv 32x32x32 outputs * 27, conv 16x16x32 * 288, FC 32*8*8 -> 100
    assert (
        count_macs(build_model("plain2", 100), (3, 32, 32))
        == 32 * 32 * 32 * 27 + 16 * 16 * 32 * 288 + 2048 * 100
    )


# --------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("name", ZOO)
def test_output_shapes(name):
    x28 = torch.randn(2, 1, 28, 28)
    x32 = torch.randn(2, 3, 32, 32)
    for classes in (10, 100):
        m = build_model(name, classes, in_channels=1, input_size=28)
        out = m(x28)
        assert out.shape == (2, classes) and torch.isfinite(out).all()
        m = build_model(name, classes, in_channels=3, input_size=32)
        with torch.no_grad():
            out = m(x32)
        assert out.shape == (2, classes) and torch.isfinite(out).all()
    assert m.default_tap == "prepool"


# --------------------------------------------------------------------------- feature taps
def _pool_module(model: nn.Module) -> nn.Module:
    """The module that consumes the prepool feature: global average pooling, or the plain CNN's flatten."""
    return getattr(model, "avgpool", None) or model.flatten


@pytest.mark.parametrize("name", ZOO)
@pytest.mark.parametrize("in_ch,size", [(3, 32), (1, 28)])
def test_taps_every_model(name, in_ch, size):
    model = build_model(name, 10, in_channels=in_ch, input_size=size).eval()
    points = feature_points(model)
    stages = sorted(p for p in points if p.startswith("stage"))
    assert stages == [f"stage{i}" for i in range(1, len(stages) + 1)] and len(stages) >= 2
    assert {"prepool", "logits"} <= set(points)
    entering = {}
    handle = _pool_module(model).register_forward_pre_hook(lambda m, inp: entering.setdefault("x", inp[0]))
    x = torch.randn(2, in_ch, size, size)
    with torch.no_grad(), FeatureTaps(model, list(points)) as taps:
        out = model(x)
    handle.remove()
    assert set(taps.features) == set(points)
    assert torch.equal(taps.features["prepool"], entering["x"])
    assert torch.equal(taps.features["logits"], out)
    for s in stages:
        f = taps.features[s]
        assert f.dim() == 4 and f.shape[0] == 2
    sides = [taps.features[s].shape[-1] for s in stages]
    assert sides == sorted(sides, reverse=True)
    # hooks are gone after the with-block
    assert all(not m._forward_hooks for m in model.modules() if m is not _pool_module(model))
    shapes = feature_shapes(model, ["prepool"], (in_ch, size, size))
    assert shapes["prepool"] == tuple(entering["x"].shape[1:])


# The classifier end and the feature points are written once (ZooModel.add_pooled_head / point_map); stored
# stages are keyed and loaded (strict) by these names, so they are pinned here per family.
FAMILY_POINTS = {  # preact<i>: stage i before its last ReLU (tests/models/test_reference_taps.py checks the tensors)
    "resnet8": {"stem": "relu", **{f"stage{i}": f"layer{i}" for i in (1, 2, 3)},
                **{f"preact{i}": f"layer{i}.0.preact" for i in (1, 2, 3)}},
    "wrn_16_2": {"stem": "conv1", **{f"stage{i}": f"block{i}" for i in (1, 2, 3)},
                 "preact1": "block2.0.bn1", "preact2": "block3.0.bn1", "preact3": "bn1"},
    "shufflev1": {"stem": "relu", **{f"stage{i}": f"layer{i}" for i in (1, 2, 3)},
                  "preact1": "layer1.3.preact", "preact2": "layer2.7.preact", "preact3": "layer3.3.preact"},
    "shufflev2": {"stem": "relu", **{f"stage{i}": f"layer{i}" for i in (1, 2, 3)},
                  "preact1": "layer1.3.preact", "preact2": "layer2.7.preact", "preact3": "layer3.3.preact"},
    "mobilenetv2": {"stem": "conv1", "stage1": "blocks.1", "stage2": "blocks.2", "stage3": "blocks.4",
                    "stage4": "blocks.6"},
    "vgg8": {**{f"stage{i + 1}": f"block{i}" for i in range(5)}, **{f"preact{i + 1}": f"block{i}.1" for i in range(5)}},
    "plain2": {"stage1": "features.stage1", "stage2": "features.stage2", "prepool": "features.prepool"},
    "plain8": {**{f"stage{i}": f"features.stage{i}" for i in (1, 2, 3, 4)}, "prepool": "features.prepool",
               "embedding": "head"},
}
# sha256 (first 16 hex digits) of the state_dict's "key:shape" lines, 10 classes, 3x32x32
STATE_KEYS = {
    "resnet8": "23664d4d1c6542d5",
    "resnet8x4": "688e07bfb6c0f9f5",
    "wrn_16_2": "42a704a3d21e58ac",
    "shufflev1": "6a7e4739c4b4b2fc",
    "shufflev2": "8fa4526bd666737f",
    "mobilenetv2": "71d62fcad1f4d489",
    "vgg8": "f13867689caee9b8",
    "plain2": "c701b7d8e7ccc1aa",
    "plain8": "c70c9f7e4017e41f",
}


@pytest.mark.parametrize("name", sorted(FAMILY_POINTS))
def test_feature_points_pinned(name):
    expected = {"prepool": "prepool", "embedding": "flatten", "logits": "fc", **FAMILY_POINTS[name]}
    points = feature_points(build_model(name, 10))
    assert points == expected
    # stem, stages in order, then prepool / embedding / logits
    assert list(points)[-3:] == ["prepool", "embedding", "logits"]
    stages = [p for p in points if p.startswith("stage")]
    assert stages == [f"stage{i}" for i in range(1, len(stages) + 1)]


@pytest.mark.parametrize("name", sorted(STATE_KEYS))
def test_state_dict_keys_pinned(name):
    sd = build_model(name, 10).state_dict()
    lines = "\n".join(f"{k}:{tuple(v.shape)}" for k, v in sd.items())
    assert hashlib.sha256(lines.encode()).hexdigest()[:16] == STATE_KEYS[name], (
        "state_dict keys or shapes changed: stored stages of this model would no longer load"
    )


@pytest.mark.parametrize("name", ZOO)
def test_logits_are_the_head_of_prepool(name):
    """The classifier reads exactly the prepool feature: logits = fc(flatten(global avg pool(prepool))) for
    the pooled families, fc(head(flatten(prepool))) for the plain CNNs; fc's input width is prepool's."""
    torch.manual_seed(0)
    model = build_model(name, 10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), FeatureTaps(model, ["prepool", "embedding", "logits"]) as taps:
        out = model(x)
    f = taps.features["prepool"]
    assert f.dim() == 4 and feature_shapes(model, "prepool", (3, 32, 32))["prepool"] == tuple(f.shape[1:])
    with torch.no_grad():
        if name.startswith("plain"):
            emb = model.head(f.flatten(1))
        else:
            assert isinstance(model.avgpool, nn.AdaptiveAvgPool2d) and f.shape[1] == model.fc.in_features
            emb = F.adaptive_avg_pool2d(f, 1).flatten(1)
        assert torch.equal(taps.features["embedding"], emb)
        assert torch.equal(out, model.fc(emb)) and torch.equal(taps.features["logits"], out)
    sd = model.state_dict()
    assert list(sd)[-2:] == ["fc.weight", "fc.bias"] and sd["fc.weight"].shape == (10, model.fc.in_features)
    torch.manual_seed(1)
    twin = build_model(name, 10).eval()
    twin.load_state_dict(sd, strict=True)
    with torch.no_grad():
        assert torch.equal(twin(x), out)


def test_resnet_stage_shapes_and_dotted_names():
    model = build_model("resnet8", 100)
    assert model.training
    shapes = feature_shapes(model, ["stage1", "stage2", "stage3", "prepool", "layer2.0.conv1"], (3, 32, 32))
    assert model.training  # restored
    assert shapes == {
        "stage1": (16, 32, 32),
        "stage2": (32, 16, 16),
        "stage3": (64, 8, 8),
        "prepool": (64, 8, 8),
        "layer2.0.conv1": (32, 16, 16),
    }
    assert feature_shapes(build_model("wrn_16_2", 10, 1, input_size=28), "prepool", (1, 28, 28)) == {
        "prepool": (128, 7, 7)
    }


def test_taps_plain_object_and_gradients():
    model = build_model("resnet8", 10)
    taps = FeatureTaps(model, "prepool")
    model(torch.randn(2, 3, 32, 32))
    f = taps.features["prepool"]
    assert f.requires_grad  # feature losses can back-propagate into the model
    f.pow(2).mean().backward()
    assert model.conv1.weight.grad is not None
    taps.remove()
    taps.clear()
    model(torch.randn(2, 3, 32, 32))
    assert taps.features == {}
    detached = FeatureTaps(model, ["stage1"], detach=True)
    model(torch.randn(2, 3, 32, 32))
    assert not detached.features["stage1"].requires_grad
    detached.remove()


def test_unknown_tap_lists_feature_points():
    model = build_model("resnet8", 10)
    with pytest.raises(ConfigError) as e:
        FeatureTaps(model, ["nope"])
    msg = str(e.value)
    assert "nope" in msg and "prepool" in msg and "stage3" in msg


# --------------------------------------------------------------------------- errors and names
def test_unknown_model_lists_names():
    with pytest.raises(ConfigError) as e:
        build_model("resnet9000x", 10)
    assert "resnet9000x" in str(e.value) and "resnet20" in str(e.value) and "plain2" in str(e.value)
    assert e.value.exit_code == 2


def test_bad_arguments():
    with pytest.raises(ConfigError, match="accepted"):
        build_model("resnet8", 10, colour="blue")
    with pytest.raises(ConfigError, match="num_classes"):
        build_model("resnet8", 0)
    with pytest.raises(ConfigError, match="variant"):
        build_model("plain2", 10, variant="imagenet")
    with pytest.raises(ConfigError, match="too small"):
        build_model("plain10", 10, input_size=8)
    with pytest.raises(ConfigError, match="width_mult"):
        build_model("shufflev1", 10, width_mult=0.5)
    # None means default (Hydra nulls)
    assert count_params(build_model("resnet8", 100, input_size=None, width_mult=None)) == 83_892


def test_registry_and_generic_names():
    assert set(ZOO) >= {
        "plain2",
        "plain4",
        "plain6",
        "plain8",
        "plain10",
        "resnet8",
        "resnet14",
        "resnet20",
        "resnet26",
        "resnet32",
        "resnet44",
        "resnet56",
        "resnet110",
        "resnet8x4",
        "resnet32x4",
        "wrn_16_1",
        "wrn_16_2",
        "wrn_16_4",
        "wrn_40_1",
        "wrn_40_2",
        "wrn_40_4",
        "wrn_28_10",
        "vgg8",
        "vgg11",
        "vgg13",
        "vgg16",
        "vgg19",
        "mobilenetv2",
        "shufflev1",
        "shufflev2",
    }
    assert "resnet20" in MODELS
    assert build_model("wrn_10_1", 10)(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    assert count_params(build_model("resnet38", 100)) == resnet_params_by_hand(38)
    with pytest.raises(ConfigError):
        build_model("wrn_15_2", 10)
    m = build_model("resnet8", 100, width_mult=2.0)
    assert count_params(m) == resnet_params_by_hand(8, (32, 32, 64, 128))


# --------------------------------------------------------------------------- CLI
def _zoo(*args):
    cmd = [sys.executable, "-m", "kdlab.zoo", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.slow  # a long CLI run: in make test-slow (CI runs both)
def test_zoo_cli_table():
    r = _zoo("--dataset", "fashion_mnist")
    assert r.returncode == 0, r.stderr
    for name in ("plain10", "resnet8", "wrn_40_2", "shufflev2", "MFLOPs", "multiply-accumulates"):
        assert name in r.stdout
    assert "77,754" in r.stdout  # resnet8 for 1x28x28, 10 classes


def test_zoo_cli_on_the_fly_subset():
    r = _zoo("--on-the-fly", "--models", "resnet8,plain2")
    assert r.returncode == 0, r.stderr
    assert "34,452" in r.stdout  # resnet8 1x3 twin, 100 classes


def test_zoo_cli_bad_dataset():
    r = _zoo("--dataset", "mnist9")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "mnist9" in lines[0] and "cifar100" in lines[0]
    assert "Traceback" not in r.stderr and r.stdout == ""
