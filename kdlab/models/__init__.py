"""kdlab's model zoo: a registry of CIFAR-sized networks, forward-hook feature taps and the 1 x N transform.

from kdlab.models import build_model, list_models, FeatureTaps, to_on_the_fly
model = build_model("resnet20", num_classes=100, in_channels=3, input_size=32)
with FeatureTaps(model, ["prepool"]) as taps:
    logits = model(x)
    feat = taps.features["prepool"]
"""

# imported to register their models
from kdlab.models import lenet, mobilenetv2, plain, resnet, resnet4, shufflenet, vgg, wrn  # noqa: F401
from kdlab.models.base import ZooModel
from kdlab.models.factory import MODELS, build_model, list_models, model_family
from kdlab.models.generator import GENERATORS, build_generator
from kdlab.models.onthefly import to_on_the_fly
from kdlab.models.profile import count_macs, count_params
from kdlab.models.taps import FeatureTaps, feature_points, feature_shapes, resolve_point

__all__ = [
    "GENERATORS",
    "MODELS",
    "FeatureTaps",
    "ZooModel",
    "build_generator",
    "build_model",
    "count_macs",
    "count_params",
    "feature_points",
    "feature_shapes",
    "list_models",
    "model_family",
    "resolve_point",
    "to_on_the_fly",
]
