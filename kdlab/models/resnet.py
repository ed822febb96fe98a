"""CIFAR ResNets: resnet8 .. resnet110 (TAKD / DGKD / CRD) and the 4x-wide resnet8x4 / resnet32x4 (CRD).

ResNet-d: 3x3 conv stem + BN + ReLU, three stages of (d - 2) / 6 basic blocks (two 3x3 convs, BN, ReLU)
at strides 1 / 2 / 2, global average pooling, one FC. Widths: stem 16, stages 16 / 32 / 64; the x4
variants follow RepDistiller's `resnet8x4` / `resnet32x4`: stem 32, stages 64 / 128 / 256.

Shortcut: identity where shapes match, otherwise a 1x1 convolution (with the block's stride) + BN, i.e.
option B of He et al., as in both the TAKD and the RepDistiller (CRD) code; the parameter counts therefore
match those repositories (e.g. resnet20 / 100 classes: 278,324; resnet8x4: 1,233,540). Global pooling is
adaptive, so 28x28 inputs work too (the originals used AvgPool2d(8) for 32x32).

Feature points: ``stem``, ``stage1``..``stage3`` (the stages' outputs, after the last block's ReLU),
``preact1``..``preact3`` (the same residual sums before that ReLU, mdistiller's ``preact_feats``),
``prepool`` (= stage 3), ``embedding``, ``logits``.
"""

from __future__ import annotations

import functools

from torch import nn

from kdlab.errors import ConfigError
from kdlab.models.base import ZooModel, check_width, scaled
from kdlab.models.factory import register_model, register_pattern


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )
        self.preact = nn.Identity()  # marks the residual sum before the last ReLU (feature point preact<i>)
        self.relu2 = nn.ReLU()

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu2(self.preact(out + shortcut))


class CifarResNet(ZooModel):
    def __init__(
        self,
        depth: int,
        widths: tuple[int, int, int, int],
        num_classes: int,
        in_channels: int = 3,
        width_mult: float = 1.0,
    ):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ConfigError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (8, 14, 20, ...), got {depth}")
        width_mult = check_width(width_mult)
        widths = tuple(scaled(w, width_mult) for w in widths)
        n = (depth - 2) // 6
        self.conv1 = conv3x3(in_channels, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        cin = widths[0]
        for i, (w, stride) in enumerate(zip(widths[1:], (1, 2, 2)), 1):
            blocks = [BasicBlock(cin if j == 0 else w, w, stride if j == 0 else 1) for j in range(n)]
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
            cin = w
        # preact<i>: stage i's output before its last ReLU (the last block's residual sum: mdistiller's preact_feats)
        self.add_pooled_head(cin, num_classes, stages=("layer1", "layer2", "layer3"), stem="relu",
                             preacts=[f"layer{i}.{n - 1}.preact" for i in (1, 2, 3)])
        self.init_weights()

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.classify(x)


def cifar_resnet(
    depth: int,
    num_classes: int,
    in_channels: int = 3,
    input_size=32,
    width_mult: float = 1.0,
    widths: tuple[int, int, int, int] = (16, 16, 32, 64),
) -> CifarResNet:
    """`input_size` is accepted for a uniform interface; pooling is adaptive."""
    return CifarResNet(depth, widths, num_classes, in_channels, width_mult)


for _d in (8, 14, 20, 26, 32, 44, 56, 110):
    register_model(f"resnet{_d}", "resnet", cifar_resnet, depth=_d)
for _d in (8, 32):
    register_model(f"resnet{_d}x4", "resnet", cifar_resnet, depth=_d, widths=(32, 64, 128, 256))


def _generic(m):
    depth = int(m.group(1))
    if depth < 8 or (depth - 2) % 6:
        return None
    return functools.partial(cifar_resnet, depth=depth)


register_pattern(r"resnet(\d+)", "resnet", _generic)
