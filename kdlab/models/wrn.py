"""Wide ResNets WRN-d-k (Zagoruyko & Komodakis), as in the CRD / RepDistiller zoo.

Pre-activation basic blocks (BN-ReLU-conv3x3-BN-ReLU-[dropout]-conv3x3); widths 16 / 16k / 32k / 64k over a
3x3 stem, (d - 4) / 6 blocks per stage at strides 1 / 2 / 2; a 1x1 convolution shortcut where the channel
count changes (its input is the block's activated input, as in the reference code); final BN + ReLU,
global average pooling (adaptive here, so 28x28 works), FC.

Registered: wrn_16_1, wrn_16_2, wrn_16_4, wrn_40_1, wrn_40_2, wrn_40_4, wrn_28_10; any `wrn_<d>_<k>` with
d = 6n + 4 also builds. "prepool" is the output of the final BN + ReLU, the tensor that is pooled; the stages
are the raw block outputs (residual sums), and ``preact1``..``preact3`` each stage's output after the BN that
precedes the next ReLU (mdistiller's ``preact_feats``).
"""

from __future__ import annotations

import functools

import torch.nn.functional as F
from torch import nn

from kdlab.errors import ConfigError
from kdlab.models.base import ZooModel, check_width, scaled
from kdlab.models.factory import register_model, register_pattern


class WideBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.shortcut = None
        if cin != cout or stride != 1:
            self.shortcut = nn.Conv2d(cin, cout, kernel_size=1, stride=stride, padding=0, bias=False)

    def forward(self, x):
        act = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(act)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        return out + (x if self.shortcut is None else self.shortcut(act))


class WideResNet(ZooModel):
    def __init__(
        self,
        depth: int,
        widen: int,
        num_classes: int,
        in_channels: int = 3,
        drop_rate: float = 0.0,
        width_mult: float = 1.0,
    ):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ConfigError(f"WRN depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}")
        if widen < 1:
            raise ConfigError(f"WRN widening factor must be >= 1, got {widen}")
        width_mult = check_width(width_mult)
        n = (depth - 4) // 6
        widths = [scaled(c, width_mult) for c in (16, 16 * widen, 32 * widen, 64 * widen)]
        self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        cin = widths[0]
        for i, (w, stride) in enumerate(zip(widths[1:], (1, 2, 2)), 1):
            blocks = [
                WideBlock(cin if j == 0 else w, w, stride if j == 0 else 1, drop_rate) for j in range(n)
            ]
            self.add_module(f"block{i}", nn.Sequential(*blocks))
            cin = w
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU()
        # preact<i>: stage i's output through the BN that precedes the next ReLU (the next stage's first block's
        # bn1; the final bn1 for stage 3): mdistiller's preact_feats of the WRN
        self.add_pooled_head(cin, num_classes, stages=("block1", "block2", "block3"), stem="conv1",
                             preacts=("block2.0.bn1", "block3.0.bn1", "bn1"))
        self.init_weights()
        nn.init.zeros_(self.fc.bias)

    def forward(self, x):
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.classify(self.relu(self.bn1(x)))


def wide_resnet(
    depth: int,
    widen: int,
    num_classes: int,
    in_channels: int = 3,
    input_size=32,
    drop_rate: float = 0.0,
    width_mult: float = 1.0,
) -> WideResNet:
    """`input_size` is accepted for a uniform interface; pooling is adaptive."""
    return WideResNet(depth, widen, num_classes, in_channels, float(drop_rate), width_mult)


for _d, _k in ((16, 1), (16, 2), (16, 4), (40, 1), (40, 2), (40, 4), (28, 10)):
    register_model(f"wrn_{_d}_{_k}", "wrn", wide_resnet, depth=_d, widen=_k)


def _generic(m):
    depth, widen = int(m.group(1)), int(m.group(2))
    if depth < 10 or (depth - 4) % 6 or widen < 1:
        return None
    return functools.partial(wide_resnet, depth=depth, widen=widen)


register_pattern(r"wrn_(\d+)_(\d+)", "wrn", _generic)
