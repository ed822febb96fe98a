"""MobileNetV2 as in the CRD / RepDistiller zoo: `mobilenetv2` is their "mobile_half" (expansion 6, width 0.5).

A 3x3 stride-2 stem, seven groups of inverted residual blocks (1x1 expand - 3x3 depthwise - 1x1 project,
BN after each, ReLU after the first two; residual when stride 1 and widths match; the reference keeps
the 1x1 expansion even where the expansion factor is 1), a 1x1 conv to 1280 channels + BN + ReLU,
global average pooling (adaptive here, so 28x28 works) and one FC. `width_mult` multiplies the 0.5
width (channel counts rounded down as in the reference; the last 1x1 layer stays 1280 wide unless the
effective width exceeds 1). Stages follow CRD's feature list: outputs of groups 1, 2, 4 and 6;
"prepool" is the 1280-channel map that is pooled.
"""

from __future__ import annotations

from torch import nn

from kdlab.models.base import ZooModel, check_width
from kdlab.models.factory import register_model

# expansion t, channels c, blocks n, first stride s ("T" = the model's expansion factor)
SETTINGS = [
    (1, 16, 1, 1),
    ("T", 24, 2, 1),
    ("T", 32, 3, 2),
    ("T", 64, 4, 2),
    ("T", 96, 3, 1),
    ("T", 160, 3, 2),
    ("T", 320, 1, 1),
]


def conv_bn_relu(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    ]


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.use_residual = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            *conv_bn_relu(cin, mid, 1),
            *conv_bn_relu(mid, mid, 3, stride, groups=mid),
            nn.Conv2d(mid, cout, 1, 1, 0, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x):
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(ZooModel):
    def __init__(self, num_classes: int, in_channels: int = 3, expansion: int = 6, width: float = 0.5):
        super().__init__()
        c = int(32 * width)
        self.conv1 = nn.Sequential(*conv_bn_relu(in_channels, c, 3, 2))
        groups = []
        for t, ch, n, s in SETTINGS:
            cout = int(ch * width)
            blocks = []
            for j in range(n):
                blocks.append(InvertedResidual(c, cout, s if j == 0 else 1, expansion if t == "T" else t))
                c = cout
            groups.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*groups)
        last = int(1280 * width) if width > 1.0 else 1280
        self.conv2 = nn.Sequential(*conv_bn_relu(c, last, 1))
        # stages: outputs of groups 1, 2, 4 and 6 (CRD's feature list)
        self.add_pooled_head(
            last, num_classes, stages=("blocks.1", "blocks.2", "blocks.4", "blocks.6"), stem="conv1"
        )
        self.init_weights()
        nn.init.normal_(self.fc.weight, 0.0, 0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x):
        return self.classify(self.conv2(self.blocks(self.conv1(x))))


def mobilenetv2(
    num_classes: int, in_channels: int = 3, input_size=32, width_mult: float = 1.0, expansion: int = 6
) -> MobileNetV2:
    """`input_size` is accepted for a uniform interface; pooling is adaptive."""
    return MobileNetV2(num_classes, in_channels, int(expansion), 0.5 * check_width(width_mult))


register_model("mobilenetv2", "mobilenetv2", mobilenetv2)
