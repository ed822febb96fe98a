"""Feature taps: read any model's intermediate outputs through forward hooks, without rewriting the model."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from kdlab.errors import ConfigError


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
