"""What every zoo model shares: named feature points, the default tap and the weight initialisation."""

from __future__ import annotations

import math
from collections.abc import Iterable

from torch import nn

from kdlab.errors import ConfigError


def point_map(
    stages: Iterable[str],
    *,
    stem: str | None = None,
    preacts: Iterable[str] = (),
    prepool: str = "prepool",
    embedding: str = "flatten",
    logits: str = "fc",
) -> dict[str, str]:
    """The feature points `kdlab.models.taps` resolves (name -> dotted submodule path), in this order:
    ``stem`` (if given), ``stage1``..``stageK`` (the paths in `stages`), ``preact1``..``preactK`` (the paths in
    `preacts`, if given: stage i before its last ReLU), ``prepool``, ``embedding``, ``logits``."""
    points = {"stem": stem} if stem is not None else {}
    points.update({f"stage{i}": path for i, path in enumerate(stages, 1)})
    points.update({f"preact{i}": path for i, path in enumerate(preacts, 1)})
    points.update(prepool=prepool, embedding=embedding, logits=logits)
    return points


class ZooModel(nn.Module):
    """Base class of the zoo's networks.

    Subclasses set ``feature_points`` (point name -> dotted submodule path whose forward output is that
    feature, see `point_map`) with at least ``stage1``..``stageK``, ``prepool`` and ``logits``;
    ``default_tap`` is the point FEED-style feature losses read when a config names none. Networks that
    end in "global average pool + flatten + one linear layer" build that end with `add_pooled_head` and
    run it with `classify`.

    No module in the zoo works in place (ReLU(inplace=False), ``a + b`` instead of ``a += b``): a
    forward hook may hold any module's output and autograd may need it later, so nothing may overwrite it.
    """

    default_tap = "prepool"
    #: how convolutions are initialised: "kaiming_fan_out" (CRD / RepDistiller zoo) or "torch" (PyTorch's
    #: default, as in the TAKD/DGKD plain CNNs). `to_on_the_fly` re-initialises the 1 x k convs the same way.
    conv_init = "kaiming_fan_out"

    def __init__(self) -> None:
        super().__init__()
        self.feature_points: dict[str, str] = {}
        self.arch = type(self).__name__.lower()

    def add_pooled_head(
        self, channels: int, num_classes: int, stages: Iterable[str], stem: str | None = None,
        preacts: Iterable[str] = (),
    ) -> None:
        """Add the classifier end and set ``feature_points``.

        Registers, in this order, ``prepool`` (an Identity marking the final feature map), ``avgpool``
        (adaptive, to 1 x 1), ``flatten`` and ``fc`` (Linear(channels, num_classes), PyTorch's default
        initialisation): these are the state_dict names of every pooled zoo model, and the Linear draws its
        initial weights from the global RNG here, so call this where the head's modules belong in order
        (after the body). Feature points: `point_map(stages, stem=stem, preacts=preacts)`.
        """
        self.prepool = nn.Identity()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels, num_classes)
        self.feature_points = point_map(stages, stem=stem, preacts=preacts)

    def classify(self, x):
        """Logits from the final feature map `x`: fc(flatten(avgpool(prepool(x))))."""
        return self.fc(self.flatten(self.avgpool(self.prepool(x))))

    def init_conv(self, conv: nn.Conv2d) -> None:
        """Initialise one convolution the way this family initialises its own."""
        if self.conv_init == "kaiming_fan_out":
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
        else:
            conv.reset_parameters()

    def init_weights(self) -> None:
        """Family initialisation: convs per `conv_init`, BN to identity, linear layers as noted."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                self.init_conv(m)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


def scaled(channels: int, width_mult: float, divisor: int = 1) -> int:
    """Channel count multiplied by `width_mult`, rounded to a multiple of `divisor` (at least `divisor`)."""
    if width_mult == 1.0:
        return channels
    return max(divisor, round(channels * width_mult / divisor) * divisor)


def check_width(width_mult: float) -> float:
    try:
        width_mult = float(width_mult)
    except (TypeError, ValueError):
        raise ConfigError(f"width_mult must be a positive number, got {width_mult!r}") from None
    if not width_mult > 0 or math.isinf(width_mult):
        raise ConfigError(f"width_mult must be a positive number, got {width_mult!r}")
    return width_mult


def input_hw(input_size) -> tuple[int, int]:
    """`input_size` as (H, W): an int means a square image."""
    if isinstance(input_size, int) and not isinstance(input_size, bool):
        hw = (input_size, input_size)
    else:
        try:
            hw = tuple(int(v) for v in input_size)
        except (TypeError, ValueError):
            hw = ()
    if len(hw) != 2 or min(hw) < 1:
        raise ConfigError(f"input_size must be a positive int or [H, W], got {input_size!r}")
    return hw  # type: ignore[return-value]
