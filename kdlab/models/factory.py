"""The model registry and `build_model`, the one way the rest of kdlab makes a network."""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable

from torch import nn

from kdlab.errors import ConfigError, unknown_name
from kdlab.registry import Registry

MODELS = Registry("model")

# name patterns beyond the registered names, e.g. "wrn_22_8": (regex, family, fn(match) -> constructor | None)
_PATTERNS: list[tuple[re.Pattern, str, Callable[[re.Match], Callable | None]]] = []


def register_model(name: str, family: str, ctor: Callable, **fixed) -> None:
    """Register `ctor(num_classes=..., in_channels=..., **kwargs)` under `name` with `fixed` arguments."""
    fn = functools.partial(ctor, **fixed) if fixed else ctor
    MODELS.add(name, _tagged(fn, family))


def register_pattern(regex: str, family: str, make: Callable[[re.Match], Callable | None]) -> None:
    _PATTERNS.append((re.compile(regex), family, make))


def _tagged(fn: Callable, family: str) -> Callable:
    fn.family = family  # type: ignore[attr-defined]
    return fn


def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def list_models() -> list[str]:
    """The registered model names in natural order (plain2 < plain10); generic patterns such as
    wrn_<depth>_<width> and resnet<6n+2> also build but are not listed."""
    return sorted(MODELS.names(), key=_natural_key)


def check_model_name(name: str) -> None:
    """A ConfigError listing the known (or, for a library model, the close) names unless ``name`` builds."""
    _constructor(name)


def model_family(name: str) -> str:
    return getattr(_constructor(name), "family", "?")


def _constructor(name: str) -> Callable:
    if not isinstance(name, str):
        raise unknown_name("model", name, MODELS.names())
    if name in MODELS:
        return MODELS.get(name)
    for regex, family, make in _PATTERNS:
        m = regex.fullmatch(name)
        if m:
            ctor = make(m)
            if ctor is not None:
                return _tagged(ctor, family)
    raise unknown_name("model", name, MODELS.names())


def _accepted(ctor: Callable) -> tuple[set[str], bool]:
    sig = inspect.signature(ctor)
    var_kw = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    names = {n for n, p in sig.parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if isinstance(ctor, functools.partial):
        names -= set(ctor.keywords)
    return names, var_kw


def _positive_int(what: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what} must be a positive integer, got {value!r}")
    return value


def build_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    on_the_fly: bool = False,
    on_the_fly_n: int | None = None,
    on_the_fly_mode: str = "row",
    quant: dict | None = None,
    **kwargs,
) -> nn.Module:
    """Build zoo model `name` for `num_classes` classes and `in_channels`-channel images.

    `name` may also be a library model, ``timm/<name>`` or ``torchvision/<name>`` (`kdlab.models.library`):
    its library builds it without weights; ``kwargs`` go to the library's constructor.

    Family options go in `kwargs` (a value of None means "the default", so Hydra's nulls pass through):
    every model takes `input_size` (int or [H, W], default 32; 28 for Fashion-MNIST) and most take
    `width_mult`; plain CNNs take `variant` ("cifar10" | "cifar100", default from num_classes); WRNs
    take `drop_rate`. `on_the_fly=True` returns the 1 x N twin (`to_on_the_fly`, n=`on_the_fly_n`,
    mode=`on_the_fly_mode`). `quant` ({weight_bits, act_bits, first_last}, `kdlab.models.quant`) then
    quantizes its conv / linear layers. Unknown names or arguments raise ConfigError listing the accepted ones.
    """
    ctor = _constructor(name)
    num_classes = _positive_int("num_classes", num_classes)
    in_channels = _positive_int("in_channels", in_channels)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    accepted, var_kw = _accepted(ctor)
    bad = sorted(set(kwargs) - accepted)
    if bad and not var_kw:
        known = sorted(accepted - {"num_classes", "in_channels"})
        raise ConfigError(
            f"model {name!r} does not take argument(s) {', '.join(map(repr, bad))}; "
            f"accepted: {', '.join(known) or 'none'}"
        )
    model = ctor(num_classes=num_classes, in_channels=in_channels, **kwargs)
    model.arch = name
    model.num_classes = num_classes
    model.in_channels = in_channels
    if on_the_fly:
        from kdlab.models.onthefly import to_on_the_fly

        model = to_on_the_fly(model, n=on_the_fly_n, mode=on_the_fly_mode)
    if quant:
        from kdlab.models.base import input_hw
        from kdlab.models.quant import quant_config, to_quantized

        q = quant_config(dict(quant))
        if q is not None:
            shape = (in_channels, *input_hw(kwargs.get("input_size", 32)))
            model = to_quantized(model, q["weight_bits"], q["act_bits"], q["first_last"], input_shape=shape)
    return model


def _library(m: re.Match) -> Callable:
    from kdlab.models.library import check_library_name, library_constructor

    check_library_name(m.group(0))  # unknown: a ConfigError listing close matches
    return library_constructor(m.group(1), m.group(2))


register_pattern(r"(timm|torchvision)/(.+)", "library", _library)
