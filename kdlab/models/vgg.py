"""VGG-8/11/13/16/19 with BatchNorm for 32x32 images, as in the CRD / RepDistiller zoo ("vgg13" = vgg13_bn).

Five blocks of 3x3 conv (with bias) + BN + ReLU; 2x2 max-pools after the first three blocks (and after
the fourth only for inputs of 64 pixels or more, as in the reference); adaptive average pooling; one FC
(no 4096-wide classifier layers). Stage i is block i-1's output (after its ReLU); "prepool" is the last
block's output; ``preact<i>`` stage i before its last ReLU (the block's last BN: mdistiller's ``preact_feats``).
"""

from __future__ import annotations

from torch import nn

from kdlab.models.base import ZooModel, check_width, input_hw, scaled
from kdlab.models.factory import register_model

VGG_CFGS: dict[str, list[list[int]]] = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


def _block(cin: int, channels: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for c in channels:
        layers += [nn.Conv2d(cin, c, kernel_size=3, padding=1, bias=True), nn.BatchNorm2d(c), nn.ReLU()]
        cin = c
    return nn.Sequential(*layers)


class VGG(ZooModel):
    def __init__(
        self,
        cfg: list[list[int]],
        num_classes: int,
        in_channels: int = 3,
        input_size=32,
        width_mult: float = 1.0,
    ):
        super().__init__()
        width_mult = check_width(width_mult)
        h, _ = input_hw(input_size)
        cfg = [[scaled(c, width_mult) for c in block] for block in cfg]
        cin = in_channels
        for i, channels in enumerate(cfg):
            self.add_module(f"block{i}", _block(cin, channels))
            cin = channels[-1]
            if i < 4:
                pool = nn.MaxPool2d(kernel_size=2, stride=2) if (i < 3 or h >= 64) else nn.Identity()
                self.add_module(f"pool{i}", pool)
        # preact<i>: stage i before its last ReLU, the output of block i-1's last BN (mdistiller's preact_feats)
        self.add_pooled_head(cin, num_classes, stages=[f"block{i}" for i in range(5)],
                             preacts=[f"block{i}.{3 * len(block) - 2}" for i, block in enumerate(cfg)])
        self.init_weights()
        nn.init.normal_(self.fc.weight, 0.0, 0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x):
        for i in range(4):
            x = getattr(self, f"pool{i}")(getattr(self, f"block{i}")(x))
        return self.classify(self.block4(x))


def vgg(cfg_name: str, num_classes: int, in_channels: int = 3, input_size=32, width_mult: float = 1.0) -> VGG:
    return VGG(VGG_CFGS[cfg_name], num_classes, in_channels, input_size, width_mult)


for _name in VGG_CFGS:
    register_model(_name, "vgg", vgg, cfg_name=_name)
