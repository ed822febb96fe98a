"""The on-the-fly (1 x N) transform of Pacemaker KD (Son et al., arXiv 2003.03944).

Row-by-row ("on-the-fly") hardware computes a convolution one image row at a time, so the student keeps
the teacher's architecture but every k x k filter (k > 1) becomes a 1 x N filter that sees one row:
kernel (1, N) with N = `n` or k, the same stride, padding (0, p) with p = the original padding (or
(N - 1) // 2 when `n` is given), the same channels, groups, dilation along the row and bias.
BatchNorm, pooling, 1x1 convolutions and shortcuts stay as they are. `mode="mixed"` alternates 1 x N and
N x 1 in module order (a "mixed" pacemaker whose receptive field grows in both directions).
"""

from __future__ import annotations

import copy

from torch import nn

from kdlab.errors import ConfigError, unknown_name

MODES = ("row", "mixed")


def _square_kxk(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.kernel_size[0] == m.kernel_size[1] and m.kernel_size[0] > 1


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, leaf, module)


def to_on_the_fly(model: nn.Module, n: int | None = None, mode: str = "row") -> nn.Module:
    """A deep copy of `model` with every square k x k convolution (k > 1) turned into 1 x N (see module doc).

    The new convolutions are initialised as the model's family initialises its own (`model.init_conv`, or
    PyTorch's default for foreign models); everything else keeps the original's weights. The copy gets an
    `on_the_fly` attribute {"n", "mode", "converted"}.
    """
    if mode not in MODES:
        raise unknown_name("on-the-fly mode", mode, MODES)
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1 or n % 2 == 0):
        raise ConfigError(
            f"on-the-fly width n must be an odd positive integer (so the row keeps its size), got {n!r}"
        )
    arch = getattr(model, "arch", type(model).__name__)
    if not any(_square_kxk(m) for m in model.modules()):
        raise ConfigError(f"model {arch} has no k x k convolution (k > 1) to turn into 1 x k")
    twin = copy.deepcopy(model)
    targets = [(name, m) for name, m in twin.named_modules() if _square_kxk(m)]
    init_conv = getattr(twin, "init_conv", None)
    for i, (name, conv) in enumerate(targets):
        k = conv.kernel_size[0]
        width = n if n is not None else k
        if isinstance(conv.padding, str):  # "same" / "valid" keep their meaning
            pad: int | str = conv.padding if n is None else ("same" if conv.padding == "same" else 0)
        else:
            pad = conv.padding[1] if n is None else (width - 1) // 2
        column = mode == "mixed" and i % 2 == 1
        kernel = (width, 1) if column else (1, width)
        padding = pad if isinstance(pad, str) else ((pad, 0) if column else (0, pad))
        dilation = (conv.dilation[0], 1) if column else (1, conv.dilation[1])
        new = nn.Conv2d(
            conv.in_channels,
            conv.out_channels,
            kernel,
            stride=conv.stride,
            padding=padding,
            dilation=dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        if callable(init_conv):
            init_conv(new)
        new.train(conv.training)
        new.weight.requires_grad_(conv.weight.requires_grad)
        if new.bias is not None:
            new.bias.requires_grad_(conv.bias.requires_grad)
        _set_submodule(twin, name, new)
    twin.on_the_fly = {"n": n, "mode": mode, "converted": len(targets)}
    return twin
