"""Plain CNNs plain2 .. plain10 of TAKD (Mirzadeh et al. 2020) and DGKD (Son et al. 2021).

Layer tables as in the authors' released code (ALGORITHMS.md): every "C<c>" is a 3x3 convolution with
bias, padding 1, then BatchNorm and ReLU; "MP" a 2x2 max-pool (stride 2); then fully connected layers,
ReLU between them, no dropout. The last FC has `num_classes` outputs. CIFAR-10 and CIFAR-100 use
different tables: `variant` picks one ("cifar10" | "cifar100"), by default "cifar10" when
num_classes <= 10, else "cifar100". The first FC's input size is computed for `input_size` (default
32; 28 for Fashion-MNIST), pooling with floor as nn.MaxPool2d does, so no lazy layers are needed.

Stages: the convolutions up to and including each max-pool form a stage (trailing convolutions without a
pool, as in CIFAR-100 plain6, form the last stage); "prepool" is the last stage's output, the feature map
that is flattened into the classifier.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from kdlab.errors import ConfigError
from kdlab.models.base import ZooModel, check_width, input_hw, point_map, scaled
from kdlab.models.factory import register_model

# last "FC" has num_classes outputs
PLAIN_TABLES: dict[str, dict[int, str]] = {
    "cifar10": {
        2: "C16-MP-C16-MP-FC",
        4: "C16-C16-MP-C32-C32-MP-FC",
        6: "C16-C16-MP-C32-C32-MP-C64-C64-MP-FC",
        8: "C16-C16-MP-C32-C32-MP-C64-C64-MP-C128-C128-MP-FC64-FC",
        10: "C32-C32-MP-C64-C64-MP-C128-C128-MP-C256-C256-C256-C256-MP-FC128-FC",
    },
    "cifar100": {
        2: "C32-MP-C32-MP-FC",
        4: "C32-C32-MP-C64-C64-MP-FC",
        6: "C32-C32-MP-C64-C64-MP-C128-C128-FC",
        8: "C32-C32-MP-C64-C64-MP-C128-C128-MP-C256-C256-MP-FC64-FC",
        10: "C32-C32-MP-C64-C64-MP-C128-C128-MP-C256-C256-C256-C256-MP-FC512-FC",
    },
}


def conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=True),
            bn=nn.BatchNorm2d(cout),
            relu=nn.ReLU(),
        )
    )


class PlainCNN(ZooModel):
    conv_init = "torch"  # the released code keeps PyTorch's default initialisation

    def __init__(
        self, spec: str, num_classes: int, in_channels: int = 3, input_size=32, width_mult: float = 1.0
    ):
        super().__init__()
        width_mult = check_width(width_mult)
        h, w = input_hw(input_size)
        tokens = spec.split("-")
        stages: list[list[nn.Module]] = [[]]
        c = in_channels
        fc_sizes: list[int] = []
        for tok in tokens:
            if tok.startswith("C"):
                cout = scaled(int(tok[1:]), width_mult)
                stages[-1].append(conv_bn_relu(c, cout))
                c = cout
            elif tok == "MP":
                stages[-1].append(nn.MaxPool2d(kernel_size=2, stride=2))
                stages.append([])
                h, w = h // 2, w // 2
            elif tok.startswith("FC"):
                fc_sizes.append(int(tok[2:]) if len(tok) > 2 else num_classes)
        stages = [s for s in stages if s]
        if h < 1 or w < 1:
            raise ConfigError(f"input_size {input_size!r} is too small for plain CNN {spec}")
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for i, mods in enumerate(stages, 1):
            layers[f"stage{i}"] = nn.Sequential(*mods)
        layers["prepool"] = nn.Identity()
        self.features = nn.Sequential(layers)
        self.flatten = nn.Flatten()
        hidden: list[nn.Module] = []
        n_in = c * h * w
        for size in fc_sizes[:-1]:
            hidden += [nn.Linear(n_in, size), nn.ReLU()]
            n_in = size
        self.head = nn.Sequential(*hidden)
        self.fc = nn.Linear(n_in, fc_sizes[-1])
        self.spec = spec
        self.feature_points = point_map(
            [f"features.stage{i}" for i in range(1, len(stages) + 1)],
            prepool="features.prepool",
            embedding="head" if hidden else "flatten",
        )
        self.init_weights()

    def forward(self, x):
        return self.fc(self.head(self.flatten(self.features(x))))


def plain_cnn(
    depth: int,
    num_classes: int,
    in_channels: int = 3,
    input_size=32,
    variant: str | None = None,
    width_mult: float = 1.0,
) -> PlainCNN:
    if variant is None:
        variant = "cifar10" if num_classes <= 10 else "cifar100"
    if variant not in PLAIN_TABLES:
        raise ConfigError(f"unknown plain CNN variant {variant!r}; known: {', '.join(PLAIN_TABLES)}")
    model = PlainCNN(PLAIN_TABLES[variant][depth], num_classes, in_channels, input_size, width_mult)
    model.variant = variant
    return model


for _d in (2, 4, 6, 8, 10):
    register_model(f"plain{_d}", "plain", plain_cnn, depth=_d)
