"""LeNet-5 and two halves of it: DAFL's student and the LeNet-5-Half of Lopes et al. (2017) and ZSKD.

LeNet-5: conv 5x5 (6) - ReLU - max-pool 2 - conv 5x5 (16) - ReLU - max-pool 2 - conv 5x5 (120) - ReLU -
FC 84 - ReLU - FC ``num_classes``. PyTorch's default initialisation, as in the DAFL code.

Two students carry the name "LeNet-5-half" in the literature, and they differ:

* ``lenet5_half``: DAFL's (Chen et al., ICCV 2019; ``DAFL/lenet.py``) halves every width (3, 8, 60, 42),
  ``width_mult=0.5``;
* ``lenet5_half_conv``: Lopes et al.'s (2017, ``models/lenet5_half.py`` of irapha/replayed_distillation), the
  student of ZSKD's MNIST and Fashion-MNIST tables (Nayak et al., ICML 2019), halves the two convolutions only
  (3, 8) and keeps the fully connected widths (120, 84): ``width_mult=0.5, fc_mult=1.0``.

Parameter counts for 10 classes: 61,706 (``lenet5``, ZSKD's "61706 parameters"), 15,738 (``lenet5_half``) and
35,820 (``lenet5_half_conv``, ZSKD's "35820 parameters").

Departures, so that the model fits the zoo's contract (a 4-d ``prepool`` map, then global pooling and one
linear classifier) and any image size:

* FC 84 is a 1x1 convolution on the 120-channel map. On the 1x1 map of a 32x32 input (and of 28x28, see
  the padding) it computes exactly the linear layer, with the same parameters.
* The DAFL code resizes MNIST to 32x32; kdlab keeps the data's own size and pads the first convolution by
  ``(32 - side + 1) // 2`` (2 for 28x28, LeCun's own way of feeding MNIST to LeNet-5), so the third
  convolution still sees a 5x5 map. Larger inputs give a larger map, averaged by the global pool.

Feature points: ``stage1`` / ``stage2`` (after each pool), ``stage3`` (the ReLU of the 120-channel
convolution: DAFL's ``feature``, the input of the fully connected part), ``prepool`` (the 84-channel map),
``embedding`` (its pooled vector), ``logits``.
"""
from __future__ import annotations

from torch import nn

from kdlab.models.base import ZooModel, check_width, input_hw, scaled
from kdlab.models.factory import register_model


class LeNet5(ZooModel):
    conv_init = "torch"

    def __init__(self, num_classes: int, in_channels: int = 1, input_size=32, width_mult: float = 1.0,
                 fc_mult: float | None = None):
        super().__init__()
        width_mult = check_width(width_mult)
        fc_mult = width_mult if fc_mult is None else check_width(fc_mult)
        c1, c2 = (scaled(c, width_mult) for c in (6, 16))
        c3, f1 = (scaled(c, fc_mult) for c in (120, 84))  # the 120-channel convolution is LeNet's FC 120
        side = min(input_hw(input_size))
        pad = max(0, (32 - side + 1) // 2)
        self.conv1 = nn.Conv2d(in_channels, c1, 5, padding=pad)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(c1, c2, 5)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2, 2)
        self.conv3 = nn.Conv2d(c2, c3, 5)
        self.relu3 = nn.ReLU()
        self.fc1 = nn.Conv2d(c3, f1, 1)  # FC 84 as a 1x1 convolution (see the module docstring)
        self.relu4 = nn.ReLU()
        self.add_pooled_head(f1, num_classes, stages=("pool1", "pool2", "relu3"))

    def forward(self, x):
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = self.relu3(self.conv3(x))
        return self.classify(self.relu4(self.fc1(x)))


def lenet5(num_classes: int, in_channels: int = 1, input_size=32, width_mult: float = 1.0,
           fc_mult: float | None = None) -> LeNet5:
    """``width_mult`` scales every width, ``fc_mult`` (default: ``width_mult``) the fully connected ones."""
    return LeNet5(num_classes, in_channels, input_size, width_mult, fc_mult)


register_model("lenet5", "lenet", lenet5)
register_model("lenet5_half", "lenet", lenet5, width_mult=0.5)
register_model("lenet5_half_conv", "lenet", lenet5, width_mult=0.5, fc_mult=1.0)
