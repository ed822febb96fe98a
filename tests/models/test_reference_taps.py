"""The reference layers of the feature methods (kdlab/models/taps.py REFERENCE_TAPS) are mdistiller's.

Each layer is named here again, independently of the table: the module whose output (or input) it is, how the
tensor is made from it (mdistiller/models/cifar/*.py, ``forward``), and its shape, worked out from the
architecture by hand. The test runs one forward with hooks on those modules and asserts that the tensor each of
the table's feature points records is that tensor. Pre-ReLU points are checked to be what the stage's ReLU
turns into the stage's output, too.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdlab.errors import ConfigError
from kdlab.models import FeatureTaps, build_model
from kdlab.models.taps import REFERENCE_TAPS, reference_family, reference_taps


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# A layer: (how, module path(s), shape without the batch). how:
#   out:P          the output of module P
#   pool:P         the output of module P averaged over its positions (the pooled feature)
#   add:P+Q        the output of P plus the output (or, "in:Q", the input) of Q: a residual sum before its ReLU
#   bn:P(Q)        module P (a BatchNorm, in eval mode) applied to the output of Q
#   cat:Q|P        [first half of Q's input channels, P's output]: ShuffleNetV2's unit before the last ReLU
RESNET8X4 = {  # widths 32 / 64 / 128 / 256, one block per stage (each with a 1x1 downsample shortcut)
    "stage1": ("out:layer1", (64, 32, 32)), "stage2": ("out:layer2", (128, 16, 16)),
    "stage3": ("out:layer3", (256, 8, 8)),
    "pre1": ("add:layer1.0.bn2+layer1.0.downsample", (64, 32, 32)),
    "pre2": ("add:layer2.0.bn2+layer2.0.downsample", (128, 16, 16)),
    "pre3": ("add:layer3.0.bn2+layer3.0.downsample", (256, 8, 8)),
    "pooled": ("pool:layer3", (256,)),
}
RESNET20 = {  # widths 16 / 16 / 32 / 64, three blocks per stage; the last block's shortcut is the identity
    "stage1": ("out:layer1", (16, 32, 32)), "stage2": ("out:layer2", (32, 16, 16)),
    "stage3": ("out:layer3", (64, 8, 8)),
    "pre1": ("add:layer1.2.bn2+in:layer1.2", (16, 32, 32)),
    "pre2": ("add:layer2.2.bn2+in:layer2.2", (32, 16, 16)),
    "pre3": ("add:layer3.2.bn2+in:layer3.2", (64, 8, 8)),
    "pooled": ("pool:layer3", (64,)),
}
WRN_16_2 = {  # widths 32 / 64 / 128; the stages are the raw residual sums (pre-activation blocks)
    "stage1": ("out:block1", (32, 32, 32)), "stage2": ("out:block2", (64, 16, 16)),
    "stage3": ("out:block3", (128, 8, 8)),
    "pre1": ("bn:block2.0.bn1(block1)", (32, 32, 32)), "pre2": ("bn:block3.0.bn1(block2)", (64, 16, 16)),
    "pre3": ("bn:bn1(block3)", (128, 8, 8)),
    "pooled": ("pool:relu", (128,)),  # avgpool(relu(bn1(block3)))
}
VGG8 = {  # one conv per block: 64 / 128 / 256 / 512 / 512, max-pools after blocks 0-2 (32-px input)
    "stage1": ("out:block0", (64, 32, 32)), "stage2": ("out:block1", (128, 16, 16)),
    "stage3": ("out:block2", (256, 8, 8)), "stage4": ("out:block3", (512, 4, 4)),
    "stage5": ("out:block4", (512, 4, 4)),
    "pre2": ("out:block1.1", (128, 16, 16)), "pre3": ("out:block2.1", (256, 8, 8)),
    "pre4": ("out:block3.1", (512, 4, 4)), "pre5": ("out:block4.1", (512, 4, 4)),
    "pooled": ("pool:block4", (512,)),
}
VGG13 = {  # two convs per block: the last BN is the 5th layer (conv, bn, relu, conv, bn, relu)
    "stage1": ("out:block0", (64, 32, 32)), "stage2": ("out:block1", (128, 16, 16)),
    "stage3": ("out:block2", (256, 8, 8)), "stage4": ("out:block3", (512, 4, 4)),
    "stage5": ("out:block4", (512, 4, 4)),
    "pre2": ("out:block1.4", (128, 16, 16)), "pre3": ("out:block2.4", (256, 8, 8)),
    "pre4": ("out:block3.4", (512, 4, 4)), "pre5": ("out:block4.4", (512, 4, 4)),
    "pooled": ("pool:block4", (512,)),
}
MOBILENETV2 = {  # width 0.5: groups 1, 2, 4, 6 end at 12 / 16 / 48 / 160 channels (stride-2 stem)
    "f1": ("out:blocks.1", (12, 16, 16)), "f2": ("out:blocks.2", (16, 8, 8)), "f3": ("out:blocks.4", (48, 4, 4)),
    "f4": ("out:blocks.6", (160, 2, 2)), "pooled": ("pool:conv2", (1280,)),
}
SHUFFLEV1 = {  # 240 / 480 / 960 channels, 4 / 8 / 4 units; the last unit of a stage is a stride-1 residual
    "stage1": ("out:layer1", (240, 16, 16)), "stage2": ("out:layer2", (480, 8, 8)),
    "stage3": ("out:layer3", (960, 4, 4)),
    "pre1": ("add:layer1.3.bn3+in:layer1.3", (240, 16, 16)), "pre2": ("add:layer2.7.bn3+in:layer2.7", (480, 8, 8)),
    "pre3": ("add:layer3.3.bn3+in:layer3.3", (960, 4, 4)),
    "pooled": ("pool:layer3", (960,)),
}
SHUFFLEV2 = {  # 116 / 232 / 464 channels (a down-sampling unit + 3 / 7 / 3 units), then a 1x1 conv to 1024
    "stage1": ("out:layer1", (116, 16, 16)), "stage2": ("out:layer2", (232, 8, 8)),
    "stage3": ("out:layer3", (464, 4, 4)),
    "pre1": ("cat:layer1.3|layer1.3.branch.6", (116, 16, 16)), "pre2": ("cat:layer2.7|layer2.7.branch.6", (232, 8, 8)),
    "pre3": ("cat:layer3.3|layer3.3.branch.6", (464, 4, 4)),
    "pooled": ("pool:conv2", (1024,)),
}

# mdistiller's lists of each family in the names above: feats[2] (FitNet), feats[1:] (AT), feats[-1] (SP),
# feats[1:] + pooled (ReviewKD's student), preact_feats[1:] + pooled (ReviewKD's teacher)
EXPECTED = {
    "resnet8x4": (RESNET8X4, {"hint": ["stage2"], "feats": ["stage1", "stage2", "stage3"], "last": ["stage3"],
                              "review": ["stage1", "stage2", "stage3", "pooled"],
                              "review_preact": ["pre1", "pre2", "pre3", "pooled"]}),
    "resnet20": (RESNET20, {"hint": ["stage2"], "feats": ["stage1", "stage2", "stage3"], "last": ["stage3"],
                            "review": ["stage1", "stage2", "stage3", "pooled"],
                            "review_preact": ["pre1", "pre2", "pre3", "pooled"]}),
    "wrn_16_2": (WRN_16_2, {"hint": ["stage2"], "feats": ["stage1", "stage2", "stage3"], "last": ["stage3"],
                            "review": ["stage1", "stage2", "stage3", "pooled"],
                            "review_preact": ["pre1", "pre2", "pre3", "pooled"]}),
    "vgg8": (VGG8, {"hint": ["stage3"], "feats": ["stage2", "stage3", "stage4", "stage5"], "last": ["stage5"],
                    "review": ["stage2", "stage3", "stage4", "stage5", "pooled"],
                    "review_preact": ["pre2", "pre3", "pre4", "pre5", "pooled"]}),
    "vgg13": (VGG13, {"hint": ["stage3"], "feats": ["stage2", "stage3", "stage4", "stage5"], "last": ["stage5"],
                      "review": ["stage2", "stage3", "stage4", "stage5", "pooled"],
                      "review_preact": ["pre2", "pre3", "pre4", "pre5", "pooled"]}),
    "mobilenetv2": (MOBILENETV2, {"hint": ["f2"], "feats": ["f1", "f2", "f3", "f4"], "last": ["f4"],
                                  "review": ["f1", "f2", "f3", "f4", "pooled"]}),
    "shufflev1": (SHUFFLEV1, {"hint": ["stage2"], "feats": ["stage1", "stage2", "stage3"], "last": ["stage3"],
                              "review": ["stage1", "stage2", "stage3", "pooled"],
                              "review_preact": ["pre1", "pre2", "pre3", "pooled"]}),
    "shufflev2": (SHUFFLEV2, {"hint": ["stage2"], "feats": ["stage1", "stage2", "stage3"], "last": ["stage3"],
                              "review": ["stage1", "stage2", "stage3", "pooled"],
                              "review_preact": ["pre1", "pre2", "pre3", "pooled"]}),
}
# the stage each pre-ReLU layer becomes through its ReLU (ShuffleNetV2: then the channel shuffle)
PRE_OF = {"pre1": "stage1", "pre2": "stage2", "pre3": "stage3", "pre4": "stage4", "pre5": "stage5"}


def _paths(how: str) -> list[tuple[str, str]]:
    """(module path, "in" | "out") pairs a layer description reads."""
    kind, rest = how.split(":", 1)
    if kind == "bn":
        return [(rest[:-1].split("(")[1], "out")]
    if kind == "cat":
        unit, branch = rest.split("|")
        return [(unit, "in"), (branch, "out")]
    parts = rest.split("+") if kind == "add" else [rest]
    return [(p[3:], "in") if p.startswith("in:") else (p, "out") for p in parts]


def _tensor(model, how: str, seen: dict) -> torch.Tensor:
    kind, rest = how.split(":", 1)
    if kind == "out":
        return seen[rest, "out"]
    if kind == "pool":
        return seen[rest, "out"].mean(dim=(2, 3))
    if kind == "add":
        a, b = rest.split("+")
        return seen[a, "out"] + (seen[b[3:], "in"] if b.startswith("in:") else seen[b, "out"])
    if kind == "bn":
        bn, src = rest[:-1].split("(")
        return dict(model.named_modules())[bn](seen[src, "out"])  # eval mode: running statistics
    unit, branch = rest.split("|")
    x = seen[unit, "in"]
    return torch.cat([x[:, : x.shape[1] // 2], seen[branch, "out"]], dim=1)


def _forward(arch: str, layers: dict, taps: list[str]) -> tuple[dict, dict]:
    """The described layers and the taps' recorded tensors, from one forward in eval mode (BN statistics set to
    something other than the identity, so that a BN output differs from its input)."""
    torch.manual_seed(0)
    model = build_model(arch, 100).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    modules = dict(model.named_modules())
    seen: dict = {}
    handles = []
    for path, io in {p for how, _ in layers.values() for p in _paths(how)}:
        def hook(_m, inputs, output, path=path, io=io):
            seen[path, io] = inputs[0] if io == "in" else output
        handles.append(modules[path].register_forward_hook(hook))
    try:
        with torch.no_grad(), FeatureTaps(model, taps) as recorded:
            model(torch.randn(2, 3, 32, 32))
            got = dict(recorded.features)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        return {name: _tensor(model, how, seen) for name, (how, _) in layers.items()}, got


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_reference_taps_are_mdistillers_layers(arch):
    layers, lists = EXPECTED[arch]
    family = reference_family(arch)
    assert set(REFERENCE_TAPS[family]) == set(lists), "every entry of the family's row is named here"
    table = {entry: reference_taps(arch, entry, "test") for entry in lists}
    table = {e: v if isinstance(v, list) else [v] for e, v in table.items()}
    taps = sorted({t for v in table.values() for t in v})
    expected, got = _forward(arch, layers, taps)
    for entry, names in lists.items():
        assert len(table[entry]) == len(names), f"{arch} {entry}: {table[entry]} vs {names}"
        for tap, name in zip(table[entry], names):
            shape = layers[name][1]
            assert tuple(got[tap].shape[1:]) == shape, f"{arch} {entry}: tap {tap} is not {name} {shape}"
            torch.testing.assert_close(got[tap], expected[name], rtol=1e-5, atol=1e-5,
                                       msg=f"{arch} {entry}: tap {tap} is not {layers[name][0]}")
    for pre, stage in PRE_OF.items():  # a pre-ReLU layer is what the ReLU turns into the stage's output
        if pre in layers and reference_family(arch) != "wrn":  # (WRN: the BN before the next block's ReLU)
            after = F.relu(expected[pre])
            if arch == "shufflev2":  # the unit shuffles after its ReLU (2 groups)
                b, c, h, w = after.shape
                after = after.view(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)
            torch.testing.assert_close(after, expected[stage], rtol=1e-5, atol=1e-5)
            assert (expected[pre] < 0).any(), f"{arch} {pre} is signed (taken before the ReLU)"


def test_families_without_a_row_and_missing_entries():
    assert reference_family("resnet110") == "resnet" and reference_family("resnet32x4") == "resnet"
    assert reference_family("wrn_40_2") == "wrn" and reference_family("wrn_22_8") == "wrn"  # generic names too
    assert reference_family("shufflev1") == "shufflev1" and reference_family("vgg13") == "vgg"
    for arch in ("plain10", "lenet5", "resnet18", "timm/resnet18"):
        assert reference_family(arch) is None and reference_taps(arch, "feats", "x") is None
    with pytest.raises(ConfigError, match=r"distill.reviewkd.source_taps: mdistiller's mobilenetv2 has no "
                                          r"'review_preact' layers .* set distill.reviewkd.source_taps"):
        reference_taps("mobilenetv2", "review_preact", "distill.reviewkd.source_taps")
