"""The on-the-fly (1 x N) transform: kernel shapes, parameter counts, one-row receptive field, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdlab.errors import ConfigError
from kdlab.models import FeatureTaps, build_model, count_params, list_models, to_on_the_fly

ZOO = list_models()


@pytest.fixture(autouse=True)
def one_thread():
    # per test, after conftest's thread setting: batch-2 CIFAR passes gain nothing from threads, and on a
    # busy 2-core machine a second thread makes them many times slower
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _convs(model: nn.Module) -> dict[str, nn.Conv2d]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def _square(conv: nn.Conv2d) -> bool:
    return conv.kernel_size[0] == conv.kernel_size[1] > 1


@pytest.mark.parametrize("name", ZOO)
def test_every_kxk_conv_becomes_1xk(name):
    model = build_model(name, 10, in_channels=1, input_size=28)
    twin = to_on_the_fly(model)
    before, after = _convs(model), _convs(twin)
    assert before.keys() == after.keys()
    converted = 0
    saved = 0
    for path, old in before.items():
        new = after[path]
        assert (new.in_channels, new.out_channels, new.groups) == (
            old.in_channels,
            old.out_channels,
            old.groups,
        )
        assert new.stride == old.stride and (new.bias is None) == (old.bias is None)
        if _square(old):
            k = old.kernel_size[0]
            assert new.kernel_size == (1, k) and new.padding == (0, old.padding[1])
            converted += 1
            saved += (k * k - k) * old.in_channels // old.groups * old.out_channels
        else:
            assert new.kernel_size == old.kernel_size and new is not old
            assert torch.equal(new.weight, old.weight)
    assert converted > 0 and twin.on_the_fly == {"n": None, "mode": "row", "converted": converted}
    assert not any(_square(c) for c in after.values())
    # the original model keeps its k x k convs
    assert all(_square(c) for p, c in before.items() if after[p].kernel_size != c.kernel_size)
    assert count_params(twin) == count_params(model) - saved
    # BN and the rest keep their state; shapes still work at 28x28 (odd 7x7 maps) and 32x32
    sd_old, sd_new = model.state_dict(), twin.state_dict()
    for key, value in sd_old.items():
        if key.rsplit(".", 1)[0] not in {p for p, c in before.items() if _square(c)}:
            assert torch.equal(sd_new[key], value)
    with torch.no_grad():
        assert twin(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    twin32 = build_model(name, 100, on_the_fly=True, input_size=32)
    with torch.no_grad():
        assert twin32.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 100)
    assert twin32.feature_points == model.feature_points and twin32.default_tap == "prepool"


def test_resnet8_param_reduction_by_hand():
    # resnet8's 3x3 convs (cin x cout): stem 3x16, stage1 16x16 x2, stage2 16x32 + 32x32, stage3 32x64 + 64x64
    w3x3 = 3 * 16 + 16 * 16 + 16 * 16 + 16 * 32 + 32 * 32 + 32 * 64 + 64 * 64
    full = count_params(build_model("resnet8", 100))
    assert full == 83_892
    assert count_params(build_model("resnet8", 100, on_the_fly=True)) == full - (9 - 3) * w3x3  # 1x3: 3 of 9
    assert count_params(build_model("resnet8", 100, on_the_fly=True, on_the_fly_n=5)) == full - (9 - 5) * w3x3
    twin = build_model("resnet8", 100, on_the_fly=True, on_the_fly_n=5)
    assert {c.kernel_size for c in _convs(twin).values()} == {(1, 5), (1, 1)}
    assert all(c.padding == (0, 2) for c in _convs(twin).values() if c.kernel_size == (1, 5))
    with torch.no_grad():
        assert twin(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_plain_param_reduction_by_hand():
    # plain2 / CIFAR-100: 3x3 convs 3x32 and 32x32 (with bias; biases are unchanged)
    full = count_params(build_model("plain2", 100))
    assert count_params(build_model("plain2", 100, on_the_fly=True)) == full - 6 * (3 * 32 + 32 * 32)


def _prepool(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), FeatureTaps(model, ["prepool"]) as taps:
        model(x)
    return taps.features["prepool"]


# prepool row r of these models is computed from input rows rows(r) only (1 x k convs, strides 1 / 2 / 2 in
# height, no max-pool: row r <- input row 4r; plain4 has two 2x2 max-pools: rows 4r .. 4r+3)
RECEPTIVE_ROWS = {
    "resnet20": lambda r: [4 * r],
    "wrn_16_2": lambda r: [4 * r],
    "plain4": lambda r: list(range(4 * r, 4 * r + 4)),
}


@pytest.mark.parametrize("name", list(RECEPTIVE_ROWS))
def test_receptive_field_is_one_row(name):
    torch.manual_seed(0)
    full = build_model(name, 10).eval()
    twin = to_on_the_fly(full).eval()
    x = torch.randn(1, 3, 32, 32)
    base_twin, base_full = _prepool(twin, x), _prepool(full, x)
    rows_out = base_twin.shape[2]
    assert rows_out == 8
    for r in range(rows_out):
        seen = RECEPTIVE_ROWS[name](r)
        others = [i for i in range(32) if i not in seen]
        x_other = x.clone()
        x_other[:, :, others] += 3.0 * torch.randn(1, 3, len(others), 32)
        # the 1 x k twin: feature row r is blind to every other input row ...
        assert torch.equal(_prepool(twin, x_other)[:, :, r], base_twin[:, :, r])
        # ... but sees its own row(s)
        x_own = x.clone()
        x_own[:, :, seen] += 3.0 * torch.randn(1, 3, len(seen), 32)
        assert (_prepool(twin, x_own)[:, :, r] - base_twin[:, :, r]).abs().max() > 1e-3
        # the k x k original does see the other rows
        assert (_prepool(full, x_other)[:, :, r] - base_full[:, :, r]).abs().max() > 1e-3


def test_mixed_mode_alternates():
    model = build_model("resnet8", 10)
    twin = to_on_the_fly(model, mode="mixed")
    kernels = [c.kernel_size for c in twin.modules() if isinstance(c, nn.Conv2d) and c.kernel_size != (1, 1)]
    assert kernels == [(1, 3), (3, 1)] * (len(kernels) // 2) + [(1, 3)] * (len(kernels) % 2)
    pads = {c.kernel_size: c.padding for c in twin.modules() if isinstance(c, nn.Conv2d)}
    assert pads[(1, 3)] == (0, 1) and pads[(3, 1)] == (1, 0)
    with torch.no_grad():
        assert twin(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    twin = build_model(
        "shufflev1", 10, in_channels=1, input_size=28, on_the_fly=True, on_the_fly_mode="mixed"
    )
    assert {(1, 3), (3, 1)} <= {c.kernel_size for c in twin.modules() if isinstance(c, nn.Conv2d)}
    with torch.no_grad():
        assert twin(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_no_kxk_conv_is_an_error():
    net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    with pytest.raises(ConfigError, match=r"has no k x k convolution \(k > 1\) to turn into 1 x k"):
        to_on_the_fly(net)
    twin = to_on_the_fly(build_model("resnet8", 10))
    with pytest.raises(ConfigError, match="no k x k convolution"):
        to_on_the_fly(twin)  # already 1 x k


def test_bad_options():
    model = build_model("resnet8", 10)
    with pytest.raises(ConfigError, match="row, mixed|mixed, row"):
        to_on_the_fly(model, mode="diagonal")
    for n in (4, 0, -3, 2.5, True):
        with pytest.raises(ConfigError, match="odd"):
            to_on_the_fly(model, n=n)
    # the original is untouched
    assert all(c.kernel_size in {(3, 3), (1, 1)} for c in _convs(model).values())
