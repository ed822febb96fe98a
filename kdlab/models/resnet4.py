"""ResNet-18 / ResNet-34 in their CIFAR form (four stages, 64 / 128 / 256 / 512 channels): DAFL's CIFAR pair.

He et al.'s basic-block ResNets with a 3x3 stride-1 stem and no max-pool, the variant of ``DAFL/resnet.py``
(and of the widely used kuangliu/pytorch-cifar): stem conv 3x3 (64) + BN + ReLU, stages of [2, 2, 2, 2]
(ResNet-18) or [3, 4, 6, 3] (ResNet-34) basic blocks at strides 1 / 2 / 2 / 2, global average pooling, one
FC. Shortcut: identity where shapes match, else 1x1 convolution + BN (as in that code). PyTorch's default
initialisation. The global pool is adaptive (the code's ``avg_pool2d(out, 4)`` is the same on 32x32).
Not to be confused with the CIFAR ResNet-d family (resnet8 .. resnet110, three stages of 16 / 32 / 64).
"""
from __future__ import annotations

from torch import nn

from kdlab.models.base import ZooModel, check_width, scaled
from kdlab.models.factory import register_model
from kdlab.models.resnet import BasicBlock, conv3x3

BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


class ResNet4(ZooModel):
    conv_init = "torch"

    def __init__(self, blocks: tuple[int, ...], num_classes: int, in_channels: int = 3, width_mult: float = 1.0):
        super().__init__()
        width_mult = check_width(width_mult)
        widths = [scaled(w, width_mult) for w in (64, 128, 256, 512)]
        self.conv1 = conv3x3(in_channels, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        cin = widths[0]
        for i, (w, n, stride) in enumerate(zip(widths, blocks, (1, 2, 2, 2)), 1):
            self.add_module(f"layer{i}", nn.Sequential(
                *[BasicBlock(cin if j == 0 else w, w, stride if j == 0 else 1) for j in range(n)]))
            cin = w
        self.add_pooled_head(cin, num_classes, stages=("layer1", "layer2", "layer3", "layer4"), stem="relu")
        self.init_weights()

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.classify(x)


def resnet4(depth: int, num_classes: int, in_channels: int = 3, input_size=32, width_mult: float = 1.0) -> ResNet4:
    """`input_size` is accepted for a uniform interface; pooling is adaptive."""
    return ResNet4(BLOCKS[depth], num_classes, in_channels, width_mult)


for _d in BLOCKS:
    register_model(f"resnet{_d}", "resnet4", resnet4, depth=_d)
