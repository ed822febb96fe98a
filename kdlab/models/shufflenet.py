"""ShuffleNetV1 (`shufflev1`, groups 3) and ShuffleNetV2 (`shufflev2`, 1x) as in the CRD / RepDistiller zoo.

Both use a 1x1 stem with 24 channels and no stem down-sampling (CIFAR-sized inputs), three stages that
each halve the resolution, global average pooling (adaptive here, so 28x28 works) and one FC.
V1: stages of 4 / 8 / 4 bottlenecks with widths 240 / 480 / 960, grouped 1x1 convs (the very first one
ungrouped), channel shuffle, 3x3 depthwise conv (ReLU after its BN, as in the reference code), and at
stride 2 a 3x3 average-pool shortcut concatenated with the branch. V2: widths 116 / 232 / 464, 3 / 7 / 3
basic units after a down-sampling unit per stage, then a 1x1 conv to 1024 channels. "prepool" is the map
that is pooled: stage 3's output (V1) or the 1024-channel conv output (V2). ``preact1``..``preact3``: each
stage's output before the last unit's final ReLU (V2: [x1, branch] before the shuffle), mdistiller's
``preact_feats``.
"""

from __future__ import annotations

import torch
from torch import nn

from kdlab.errors import ConfigError
from kdlab.models.base import ZooModel, check_width
from kdlab.models.factory import register_model


class ChannelShuffle(nn.Module):
    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups

    def forward(self, x):
        n, c, h, w = x.shape
        g = self.groups
        return x.view(n, g, c // g, h, w).transpose(1, 2).reshape(n, c, h, w)


def _bn_relu(c: int) -> list[nn.Module]:
    return [nn.BatchNorm2d(c), nn.ReLU()]


class ShuffleV1Unit(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, groups: int, first: bool = False):
        super().__init__()
        self.stride = stride
        mid = cout // 4
        g1 = 1 if first else groups
        self.conv1 = nn.Conv2d(cin, mid, kernel_size=1, groups=g1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.relu1 = nn.ReLU()
        self.shuffle = ChannelShuffle(g1)
        self.conv2 = nn.Conv2d(mid, mid, kernel_size=3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(mid, cout, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else nn.Identity()
        self.preact = nn.Identity()  # marks the unit's output before its last ReLU (feature point preact<i>)
        self.relu3 = nn.ReLU()

    def forward(self, x):
        out = self.shuffle(self.relu1(self.bn1(self.conv1(x))))
        out = self.bn3(self.conv3(self.relu2(self.bn2(self.conv2(out)))))
        res = self.shortcut(x)
        return self.relu3(self.preact(torch.cat([out, res], 1) if self.stride == 2 else out + res))


class ShuffleNetV1(ZooModel):
    conv_init = "torch"  # the reference leaves PyTorch's default initialisation

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        widths=(240, 480, 960),
        blocks=(4, 8, 4),
        groups: int = 3,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu = nn.ReLU()
        cin = 24
        for i, (w, n) in enumerate(zip(widths, blocks), 1):
            units = []
            for j in range(n):
                # at stride 2 the shortcut's cin channels are concatenated, so the branch makes w - cin
                units.append(
                    ShuffleV1Unit(
                        cin, w - cin if j == 0 else w, 2 if j == 0 else 1, groups, first=(i == 1 and j == 0)
                    )
                )
                cin = w
            self.add_module(f"layer{i}", nn.Sequential(*units))
        # preact<i>: stage i's output before the last unit's ReLU (mdistiller's preact_feats)
        self.add_pooled_head(cin, num_classes, stages=("layer1", "layer2", "layer3"), stem="relu",
                             preacts=[f"layer{i}.{n - 1}.preact" for i, n in enumerate(blocks, 1)])
        self.init_weights()

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        return self.classify(self.layer3(self.layer2(self.layer1(x))))


class ShuffleV2Down(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        mid = cout // 2
        self.left = nn.Sequential(
            nn.Conv2d(cin, cin, 3, stride=2, padding=1, groups=cin, bias=False),
            nn.BatchNorm2d(cin),
            nn.Conv2d(cin, mid, 1, bias=False),
            *_bn_relu(mid),
        )
        self.right = nn.Sequential(
            nn.Conv2d(cin, mid, 1, bias=False),
            *_bn_relu(mid),
            nn.Conv2d(mid, mid, 3, stride=2, padding=1, groups=mid, bias=False),
            nn.BatchNorm2d(mid),
            nn.Conv2d(mid, mid, 1, bias=False),
            *_bn_relu(mid),
        )
        self.shuffle = ChannelShuffle(2)

    def forward(self, x):
        return self.shuffle(torch.cat([self.left(x), self.right(x)], 1))


class ShuffleV2Unit(nn.Module):
    """A basic unit; ``preact=True`` (the last unit of a stage) adds the point ``preact``: the concatenation
    [x1, branch before its last ReLU], unshuffled (mdistiller's ``preact_feats`` of ShuffleNetV2)."""

    def __init__(self, channels: int, preact: bool = False):
        super().__init__()
        self.split = channels // 2
        c = channels - self.split
        self.branch = nn.Sequential(
            nn.Conv2d(c, c, 1, bias=False),
            *_bn_relu(c),
            nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False),
            nn.BatchNorm2d(c),
            nn.Conv2d(c, c, 1, bias=False),
            *_bn_relu(c),
        )
        self.shuffle = ChannelShuffle(2)
        self.preact = nn.Identity() if preact else None

    def forward(self, x):
        x1, x2 = x[:, : self.split], x[:, self.split :]
        if self.preact is None:
            return self.shuffle(torch.cat([x1, self.branch(x2)], 1))
        pre = x2
        for layer in self.branch[:-1]:  # all but the final ReLU
            pre = layer(pre)
        self.preact(torch.cat([x1, pre], 1))  # computed for its feature point only
        return self.shuffle(torch.cat([x1, self.branch[-1](pre)], 1))


class ShuffleNetV2(ZooModel):
    conv_init = "torch"

    def __init__(
        self, num_classes: int, in_channels: int = 3, widths=(116, 232, 464, 1024), blocks=(3, 7, 3)
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu = nn.ReLU()
        cin = 24
        for i, (w, n) in enumerate(zip(widths[:3], blocks), 1):
            units = [ShuffleV2Unit(w, preact=j == n - 1) for j in range(n)]
            self.add_module(f"layer{i}", nn.Sequential(ShuffleV2Down(cin, w), *units))
            cin = w
        self.conv2 = nn.Sequential(nn.Conv2d(cin, widths[3], 1, bias=False), *_bn_relu(widths[3]))
        self.add_pooled_head(widths[3], num_classes, stages=("layer1", "layer2", "layer3"), stem="relu",
                             preacts=[f"layer{i}.{n}.preact" for i, n in enumerate(blocks, 1)])
        self.init_weights()

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        return self.classify(self.conv2(self.layer3(self.layer2(self.layer1(x)))))


def _no_width(name: str, width_mult: float) -> None:
    if check_width(width_mult) != 1.0:
        raise ConfigError(
            f"model {name!r} supports only width_mult=1.0 (its channel groups are fixed), got {width_mult!r}"
        )


def shufflev1(num_classes: int, in_channels: int = 3, input_size=32, width_mult: float = 1.0) -> ShuffleNetV1:
    """`input_size` is accepted for a uniform interface; pooling is adaptive."""
    _no_width("shufflev1", width_mult)
    return ShuffleNetV1(num_classes, in_channels)


def shufflev2(num_classes: int, in_channels: int = 3, input_size=32, width_mult: float = 1.0) -> ShuffleNetV2:
    """`input_size` is accepted for a uniform interface; pooling is adaptive."""
    _no_width("shufflev2", width_mult)
    return ShuffleNetV2(num_classes, in_channels)


register_model("shufflev1", "shufflenet", shufflev1)
register_model("shufflev2", "shufflenet", shufflev2)
