"""Feature taps: read any model's intermediate outputs through forward hooks, without rewriting the model."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from kdlab.errors import ConfigError

#: The layers mdistiller's CIFAR models hand the feature methods, per zoo family, as kdlab feature points: the one
#: table a method reads when its taps are not set (``distill.<method>.*_tap(s): null``). mdistiller's models return
#: ``feats`` = [f0, f1, .., fK] (stem, then each stage's output), ``preact_feats`` (the same before the last ReLU)
#: and ``pooled_feat`` (mdistiller/models/cifar/{resnet,wrn,vgg,mobilenetv2,ShuffleNetv1,ShuffleNetv2}.py, forward);
#: the entries are the lists its distillers read:
#:   hint           feats[2]                     FitNet (distillers/FitNet.py, HINT_LAYER 2)
#:   feats          feats[1:]                    AT (distillers/AT.py)
#:   last           feats[-1]                    SP (distillers/SP.py)
#:   review         feats[1:] + [pooled_feat]    ReviewKD's student (distillers/ReviewKD.py, STU_PREACT false)
#:   review_preact  preact_feats[1:] + [pooled]  ReviewKD's teacher
#: mdistiller's f_i is kdlab's ``stage<i>`` (vgg: ``stage<i+1>``, kdlab counts block0 as stage 1) and its pooled
#: feature kdlab's ``embedding``. ``prepool`` stands where it is the same tensor as the last stage (resnet, vgg,
#: shufflev1), the name these methods' defaults used before the table, so their stages keep their store keys.
#: mobilenetv2 has no ``preact_feats`` in mdistiller (no ReviewKD teacher entry). The zoo's tests name each of these
#: layers by module path and shape (tests/models/test_reference_taps.py).
REFERENCE_TAPS: dict[str, dict[str, str | list[str]]] = {
    "resnet": {  # resnet8 .. resnet110, resnet8x4, resnet32x4
        "hint": "stage2",
        "feats": ["stage1", "stage2", "prepool"],
        "last": "prepool",
        "review": ["stage1", "stage2", "stage3", "embedding"],
        "review_preact": ["preact1", "preact2", "preact3", "embedding"],
    },
    "wrn": {
        "hint": "stage2",
        "feats": ["stage1", "stage2", "stage3"],
        "last": "stage3",
        "review": ["stage1", "stage2", "stage3", "embedding"],
        "review_preact": ["preact1", "preact2", "preact3", "embedding"],
    },
    "vgg": {
        "hint": "stage3",
        "feats": ["stage2", "stage3", "stage4", "stage5"],
        "last": "prepool",
        "review": ["stage2", "stage3", "stage4", "stage5", "embedding"],
        "review_preact": ["preact2", "preact3", "preact4", "preact5", "embedding"],
    },
    "mobilenetv2": {
        "hint": "stage2",
        "feats": ["stage1", "stage2", "stage3", "stage4"],
        "last": "stage4",
        "review": ["stage1", "stage2", "stage3", "stage4", "embedding"],
    },
    "shufflev1": {
        "hint": "stage2",
        "feats": ["stage1", "stage2", "prepool"],
        "last": "prepool",
        "review": ["stage1", "stage2", "stage3", "embedding"],
        "review_preact": ["preact1", "preact2", "preact3", "embedding"],
    },
    "shufflev2": {
        "hint": "stage2",
        "feats": ["stage1", "stage2", "stage3"],
        "last": "stage3",
        "review": ["stage1", "stage2", "stage3", "embedding"],
        "review_preact": ["preact1", "preact2", "preact3", "embedding"],
    },
}


def reference_family(arch: str) -> str | None:
    """The row of :data:`REFERENCE_TAPS` for zoo model ``arch`` (None for a family without one: plain CNNs,
    LeNet, the DAFL ResNets, library models); the two ShuffleNets are rows of their own."""
    from kdlab.models.factory import model_family

    family = model_family(arch)
    family = arch if family == "shufflenet" else family
    return family if family in REFERENCE_TAPS else None


def reference_taps(arch: str, entry: str, where: str) -> str | list[str] | None:
    """The feature point(s) ``entry`` of :data:`REFERENCE_TAPS` for ``arch``; None when its family has no row (the
    method's own fallback applies), a ConfigError naming ``where`` when the row lacks the entry."""
    family = reference_family(arch)
    if family is None:
        return None
    row = REFERENCE_TAPS[family]
    if entry not in row:
        raise ConfigError(f"{where}: mdistiller's {family} has no {entry!r} layers (models of that family have no "
                          f"such reference layers), so set {where} for {arch!r}")
    value = row[entry]
    return list(value) if isinstance(value, list) else value


def feature_points(model: nn.Module) -> dict[str, str]:
    """The model's named feature points (point name -> dotted submodule path); {} for foreign models."""
    return dict(getattr(model, "feature_points", {}) or {})


def resolve_point(model: nn.Module, point: str) -> str:
    """Dotted submodule path of `point`: a feature-point name, or any name from `model.named_modules()`."""
    points = feature_points(model)
    if point in points:
        return points[point]
    modules = dict(model.named_modules())
    if isinstance(point, str) and point in modules:
        return point
    arch = getattr(model, "arch", type(model).__name__)
    known = ", ".join(points) if points else "none"
    raise ConfigError(
        f"unknown feature point {point!r} for model {arch!r}; known feature points: {known} "
        "(or any dotted submodule name of the model)"
    )


class FeatureTaps:
    """Record the outputs of some of a model's submodules on every forward.

        with FeatureTaps(model, ["prepool", "stage2"]) as taps:
            logits = model(x)
            f = taps.features["prepool"]

    or keep the object and call `.remove()` when done (the hooks keep the object alive until then). Tensors are stored as produced (with their autograd
    graph, so feature losses can back-propagate through them); `detach=True` stores detached tensors.
    A module that returns a tuple records its first element. `.features` always holds the latest forward.
    """

    def __init__(self, model: nn.Module, points: str | Iterable[str], detach: bool = False):
        if isinstance(points, str):
            points = [points]
        self.model = model
        self.points = list(points)
        self.paths = {p: resolve_point(model, p) for p in self.points}
        self.detach = detach
        self.features: dict[str, torch.Tensor] = {}
        modules = dict(model.named_modules())
        self._handles = [modules[path].register_forward_hook(self._hook(p)) for p, path in self.paths.items()]

    def _hook(self, point: str):
        def hook(module, inputs, output):
            if isinstance(output, (tuple, list)):
                output = output[0]
            self.features[point] = output.detach() if self.detach else output

        return hook

    def clear(self) -> None:
        self.features = {}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


@torch.no_grad()
def feature_shapes(model: nn.Module, points: str | Iterable[str], input_shape) -> dict[str, tuple[int, ...]]:
    """Shapes (without the batch dimension) of `points` for one input of `input_shape` ((C, H, W) or
    (B, C, H, W)), from a dummy forward in eval mode; the model's training flag is restored afterwards."""
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 3:
        shape = (1, *shape)
    param = next(model.parameters(), None)
    kw = {"device": param.device, "dtype": param.dtype} if param is not None else {}
    was_training = model.training
    model.eval()
    try:
        with FeatureTaps(model, points, detach=True) as taps:
            model(torch.zeros(shape, **kw))
            return {p: tuple(t.shape[1:]) for p, t in taps.features.items()}
    finally:
        model.train(was_training)
