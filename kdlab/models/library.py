"""Library models: timm and torchvision networks as kdlab stages (``arch: timm/<name>``, ``torchvision/<name>``).

A library model is built by its library (``timm.create_model(name, pretrained=False, num_classes=...,
in_chans=...)``, ``torchvision.models.get_model(name, weights=None, num_classes=...)``) and gets what every
zoo model has: ``arch``, ``num_classes``, ``in_channels`` and ``feature_points`` (``logits`` = the classifier,
``embedding`` = the module run just before it; timm models also ``stage1``..``stageK`` from their
``feature_info`` and ``prepool`` where they have a ``global_pool``). Any dotted module name taps too. In-place
activations are switched off (a tap may hold any module's output), as in the zoo.

Library weights (``model.pretrained``; which file or download: :mod:`kdlab.models.weights`) and the preprocessing a
model expects are the other half of this module: :func:`load_pretrained` (checked key by key, one line for a mismatch) and :func:`attach_preprocess` (a parameter-free forward pre-hook that
turns a batch normalized for the data set into what the model expects).
"""
from __future__ import annotations

import difflib
import functools
import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdlab.errors import ConfigError

#: the spellings of ``model.preprocess`` besides a mapping {mean, std, input_size}
PREPROCESS = ("auto", "none")
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


def split_arch(arch: Any) -> tuple[str, str] | None:
    """("timm", "resnet18") for "timm/resnet18"; None for a zoo name."""
    if isinstance(arch, str) and "/" in arch:
        lib, _, name = arch.partition("/")
        if lib in LIBRARIES:
            return lib, name
    return None


def is_library_arch(arch: Any) -> bool:
    return split_arch(arch) is not None


def _close(name: str, known: Sequence[str], pattern_hits: Sequence[str] = ()) -> str:
    close = list(dict.fromkeys([*pattern_hits, *difflib.get_close_matches(name, known, n=8, cutoff=0.6)]))[:8]
    return ", ".join(close) if close else "none"


# -- construction --------------------------------------------------------------------------------------
def _timm_model(name: str, num_classes: int, in_channels: int, input_size: Any = None, *,
                pretrained: bool = False, **kwargs: Any) -> nn.Module:
    import timm

    if not timm.is_model(name):
        hits = timm.list_models(f"*{name}*")
        raise ConfigError(f"unknown timm model {name!r}; close matches: {_close(name, timm.list_models(), hits)} "
                          f"(timm.list_models('*{name}*') lists more)")
    args = {"pretrained": False, "num_classes": num_classes, "in_chans": in_channels, **kwargs}
    try:
        if not pretrained and input_size is not None and "img_size" not in kwargs:
            # a model trained here sees the data's size: models with a fixed grid (ViT) take img_size
            try:
                return timm.create_model(name, img_size=input_size, **args)
            except TypeError:
                pass
        return timm.create_model(name, **args)
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:
        raise ConfigError(f"timm model {name!r} rejects its arguments {sorted(kwargs)}: "
                          f"{(str(e).strip().splitlines() or [type(e).__name__])[0]}") from e


def _replace_first_conv(model: nn.Module, arch: str, in_channels: int) -> None:
    first = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    if first is None or first[1].in_channels != 3 or first[1].groups != 1:
        raise ConfigError(f"{arch} expects 3-channel images and has no plain first convolution to adapt to "
                          f"{in_channels} channels; use 3-channel data")
    name, conv = first
    new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                    dilation=conv.dilation, bias=conv.bias is not None, padding_mode=conv.padding_mode)
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def _torchvision_model(name: str, num_classes: int, in_channels: int, input_size: Any = None, *,
                       pretrained: bool = False, **kwargs: Any) -> nn.Module:
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)  # classification models only
    if name not in known:
        raise ConfigError(f"unknown torchvision model {name!r}; close matches: {_close(name, known)} "
                          f"(torchvision.models.list_models() lists all)")
    try:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"torchvision model {name!r} rejects its arguments {sorted(kwargs)}: "
                          f"{(str(e).strip().splitlines() or [type(e).__name__])[0]}") from e
    if in_channels != 3:
        _replace_first_conv(model, f"torchvision/{name}", in_channels)
    return model


#: library name -> constructor(name, num_classes, in_channels, input_size, pretrained=..., **kwargs)
LIBRARIES: dict[str, Callable[..., nn.Module]] = {"timm": _timm_model, "torchvision": _torchvision_model}


def _classifier_name(model: nn.Module, lib: str) -> str | None:
    if lib == "timm" and hasattr(model, "get_classifier"):
        head = model.get_classifier()
        name = next((n for n, m in model.named_modules() if m is head), None)
        if name and isinstance(head, nn.Linear):
            return name
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def library_points(model: nn.Module, lib: str) -> dict[str, str]:
    """The feature points of a library model (module doc), from its module names (no forward pass)."""
    names = [n for n, _ in model.named_modules() if n]
    points: dict[str, str] = {}
    if lib == "timm":
        info = getattr(model, "feature_info", None) or []
        stages = [f["module"] for f in info if isinstance(f, dict) and f.get("module") in names]
        points.update({f"stage{i}": path for i, path in enumerate(stages, 1)})
        pool = next((n for n in ("global_pool", "head.global_pool") if n in names), None)
        if pool is not None:  # the last top-level child before the pooled head: the final feature map
            top = [n for n, _ in model.named_children()]
            i = top.index(pool.split(".")[0])
            if i > 0:
                points["prepool"] = top[i - 1]
    cls = _classifier_name(model, lib)
    if cls is not None:
        i = names.index(cls)
        if i > 0 and not cls.startswith(names[i - 1] + ".") and not names[i - 1].startswith(cls + "."):
            points["embedding"] = names[i - 1]
        points["logits"] = cls
    return points


def library_constructor(lib: str, name: str) -> Callable[..., nn.Module]:
    """``ctor(num_classes, in_channels, input_size=None, pretrained=False, **kwargs)`` for ``lib/name``
    (what ``build_model`` calls for a ``<library>/<name>`` arch)."""
    make = LIBRARIES[lib]

    def ctor(num_classes: int, in_channels: int, input_size: Any = None, pretrained: Any = None,
             **kwargs: Any) -> nn.Module:
        model = make(name, num_classes, in_channels, input_size, pretrained=bool(pretrained), **kwargs)
        for m in model.modules():  # a tap may hold any module's output: nothing overwrites it
            if isinstance(getattr(m, "inplace", None), bool):
                m.inplace = False
        model.feature_points = library_points(model, lib)
        model.library = lib
        return model

    return ctor


def check_library_name(arch: str) -> None:
    """A ConfigError (close matches listed) for an unknown library model, without building it."""
    lib, name = split_arch(arch)  # type: ignore[misc]
    if lib == "timm":
        import timm

        if not timm.is_model(name):
            _timm_model(name, 1, 3)
    else:
        import torchvision

        if name not in torchvision.models.list_models(module=torchvision.models):
            _torchvision_model(name, 1, 3)


# -- what a model expects ------------------------------------------------------------------------------
def expected_input(model: nn.Module, arch: str) -> dict[str, Any] | None:
    """{mean, std, input_size} the model's library weights expect, or None when the library does not say."""
    split = split_arch(arch)
    if split is None:
        return None
    lib, name = split
    if lib == "timm":
        import timm.data

        cfg = timm.data.resolve_data_config({}, model=model)
        return {"mean": list(cfg["mean"]), "std": list(cfg["std"]), "input_size": list(cfg["input_size"][1:])}
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, KeyError, AttributeError):
        return None
    t = weights.transforms()
    size = list(getattr(t, "crop_size", None) or [])
    size = size * 2 if len(size) == 1 else size
    return {"mean": list(t.mean), "std": list(t.std), "input_size": size or None}


def preprocess_setting(value: Any, where: str) -> Any:
    """``model.preprocess`` checked: auto | none | {mean, std, input_size}."""
    if value is None or value in PREPROCESS:
        return value or "auto"
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"mean", "std", "input_size"})
        if unknown or ("mean" in value) != ("std" in value):
            raise ConfigError(f"{where} must be auto, none or a mapping {{mean, std, input_size}} (mean and std "
                              f"together), got {value!r}")
        return dict(value)
    raise ConfigError(f"{where} must be auto, none or a mapping {{mean, std, input_size}}, got {value!r}")


class InputAdapter:
    """Forward pre-hook: a batch normalized with the data's (mean_d, std_d) becomes one normalized with the
    model's (mean_m, std_m), ``x * std_d / std_m + (mean_d - mean_m) / std_m``, resized (bilinear, antialias)
    to ``size`` when that differs. No parameters or buffers: the state_dict keys stay the model's own."""

    def __init__(self, data_mean, data_std, model_mean, model_std, size: tuple[int, int] | None):
        dm, ds = torch.tensor(data_mean, dtype=torch.float32), torch.tensor(data_std, dtype=torch.float32)
        mm, ms = torch.tensor(model_mean, dtype=torch.float32), torch.tensor(model_std, dtype=torch.float32)
        self.scale = (ds / ms).view(1, -1, 1, 1)
        self.shift = ((dm - mm) / ms).view(1, -1, 1, 1)
        self.identity = bool(torch.allclose(self.scale, torch.ones(())) and torch.allclose(self.shift, torch.zeros(())))
        self.size = tuple(size) if size else None

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        x, *rest = args
        if not self.identity:
            x = x * self.scale.to(x.device, x.dtype) + self.shift.to(x.device, x.dtype)
        if self.size is not None and tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", antialias=True, align_corners=False)
        return (x, *rest)


def _per_channel(values: Sequence[float], channels: int, what: str) -> list[float]:
    values = [float(v) for v in values]
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    if channels == 1:  # a 3-channel model's statistics for grey images: their mean
        return [sum(values) / len(values)]
    raise ConfigError(f"{what} has {len(values)} values for {channels}-channel images")


def attach_preprocess(model: nn.Module, arch: str, setting: Any, data_mean: Sequence[float],
                      data_std: Sequence[float], input_size: int) -> nn.Module:
    """Hook :class:`InputAdapter` onto ``model`` where what it expects differs from the data (module doc).

    ``setting`` ``auto``: what the model's library weights expect (timm's ``resolve_data_config``,
    torchvision's ``weights.transforms()``); a mapping {mean, std, input_size}: those values in place of
    auto's (the data's own where the library says nothing, e.g. a zoo model); ``none``: nothing.
    Sets ``model.preprocess`` ({mean, std, input_size} it is fed) when a hook is attached."""
    if setting == "none" or not data_mean:
        return model
    # a mapping overrides what auto finds: {input_size: 64} keeps the weights' mean / std, at 64 px
    want = {**(expected_input(model, arch) or {}), **(dict(setting) if isinstance(setting, dict) else {})}
    if not want:
        return model
    channels = len(data_mean)
    mean = _per_channel(want.get("mean") or data_mean, channels, "model.preprocess.mean")
    std = _per_channel(want.get("std") or data_std, channels, "model.preprocess.std")
    size = want.get("input_size")
    if isinstance(size, int):
        size = [size, size]
    hw = tuple(int(s) for s in size) if size else None
    if hw == (input_size, input_size):
        hw = None
    adapter = InputAdapter(data_mean, data_std, mean, std, hw)
    if adapter.identity and hw is None:
        return model
    model.register_forward_pre_hook(adapter)
    model.preprocess = {"mean": mean, "std": std, "input_size": list(hw) if hw else None}
    return model


# -- library weights -----------------------------------------------------------------------------------
def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """A stable hash of a state_dict: every key, dtype, shape and the bytes, in key order."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """A state_dict from a local file: .safetensors (safetensors) or a torch file (weights_only=True); a
    Lightning checkpoint's ``state_dict`` (prefix ``model.``) and ``{"state_dict"|"model": ...}`` wrappers too."""
    from kdlab.store.fileio import load_weights

    if not path.is_file():
        raise ConfigError(f"model.pretrained {str(path)!r} does not exist or is not a file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path)))
        except (SafetensorError, OSError, ValueError) as e:
            raise ConfigError(f"cannot load model.pretrained {str(path)!r}: {e}") from e
    raw = load_weights(path, "model.pretrained")
    for wrapper in ("state_dict", "model", "state_dict_ema"):
        if isinstance(raw, dict) and isinstance(raw.get(wrapper), dict):
            raw = raw[wrapper]
            break
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise ConfigError(f"model.pretrained {str(path)!r} is not a state_dict (a mapping of names to tensors)")
    if raw and all(k.startswith("model.") for k in raw):  # a Lightning checkpoint of a kdlab stage
        raw = {k[len("model."):]: v for k, v in raw.items()}
    return raw


@functools.lru_cache(maxsize=2)
def _library_weights(arch: str, in_channels: int) -> tuple[dict[str, torch.Tensor], str]:
    lib, name = split_arch(arch)  # type: ignore[misc]
    if lib == "timm":
        import timm

        try:  # timm fetches them (Hugging Face hub) and adapts the stem to in_chans
            state = timm.create_model(name, pretrained=True, in_chans=in_channels).state_dict()
        except RuntimeError as e:
            raise ConfigError(f"timm has no pretrained weights for {name!r}: {str(e).splitlines()[0]}") from e
    else:
        import torchvision

        try:
            weights = torchvision.models.get_model_weights(name).DEFAULT
        except (ValueError, KeyError, AttributeError) as e:
            raise ConfigError(f"torchvision has no pretrained weights for {name!r}") from e
        state = weights.get_state_dict(progress=False)
    return state, state_sha256(state)


def load_pretrained(model: nn.Module, state: dict[str, torch.Tensor], arch: str, where: str,
                    num_classes: int, what: str = "pretrained weights") -> None:
    """Load ``state`` into ``model`` exactly, or one line naming the file (``what`` ``where``), the arch and a
    mismatching key. The one check of every imported stage (a library model's weights, a zoo model's
    ``pipeline.teacher_checkpoint``).

    A classifier of another class count is an error too (not silently re-initialised, as timm does): an
    imported stage is evaluated as it is, and a fresh classifier would make it a random teacher."""
    expected = model.state_dict()
    lib = getattr(model, "library", None)
    cls = _classifier_name(model, lib or "zoo")
    cls_weight = f"{cls}.weight" if cls else None
    if cls_weight and cls_weight in state and cls_weight in expected \
            and state[cls_weight].shape[0] != expected[cls_weight].shape[0]:
        raise ConfigError(f"{what} {where!r} has {state[cls_weight].shape[0]} classes; the data set has "
                          f"{num_classes} ({cls_weight}): an imported stage is evaluated as it is, so its "
                          f"classifier must match the data set's classes")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        example = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise ConfigError(f"{what} {where!r} do{'' if what.endswith('s') else 'es'} not match architecture "
                          f"{arch!r}: {len(missing)} missing and {len(unexpected)} unexpected keys (e.g. {example})")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ConfigError(f"{what} {where!r} do{'' if what.endswith('s') else 'es'} not match architecture "
                              f"{arch!r}: {name} has shape {tuple(tensor.shape)}, expected "
                              f"{tuple(expected[name].shape)}")
    model.load_state_dict(state)
