"""The data config: defaults per data set, and validation into a plain dict.

Every data set accepts the same key set (the union below), so one YAML layout serves them all; keys a data
set does not use are ignored, keys nobody knows are a ConfigError (catches typos).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from kdlab.data.augment import check_augment
from kdlab.errors import ConfigError

COMMON_DEFAULTS: dict[str, Any] = {
    "name": None,  # cifar10 | cifar100 | fashion_mnist | imagefolder | synthetic
    "root": "data",  # folder holding the data set (see each data set for the layout looked for)
    "download": False,  # fetch through torchvision when missing (cifar*, fashion_mnist)
    "subset": None,  # keep this many training images (seeded, stratified), before the val split
    "val_split": 0.1,  # fraction of the (subset) training set held out for validation, in (0, 0.9]
    "split_seed": 0,  # seeds subset, val split and test_subset; independent of the run seed
    "test_subset": None,  # keep this many test images (seeded, stratified)
    "augment": "crop_flip",  # none | flip | crop_flip
    "pad": 4,  # zero padding of the random crop (crop_flip on the in-memory path)
    "batch_size_eval": None,  # val/test/train_eval batch size; null -> 2 * batch_size
    "mean": None,  # per-channel normalization; null -> the data set's standard values
    "std": None,
}

IMAGEFOLDER_DEFAULTS: dict[str, Any] = {
    "image_size": 224,  # square side after resize / crop
    "channels": 3,  # 3 = RGB, 1 = grayscale
    "num_workers": None,  # DataLoader workers; null -> min(8, CPU count)
}

SYNTHETIC_DEFAULTS: dict[str, Any] = {
    "num_classes": 10,
    "channels": 1,
    "image_size": 28,
    "n_train": 2000,
    "n_test": 500,
    "noise": 1.0,  # strength of the within-class variation relative to the class prototypes
    "data_seed": 0,  # seeds the generated images themselves
}

DATA_DEFAULTS: dict[str, dict[str, Any]] = {
    "cifar10": {**COMMON_DEFAULTS, "name": "cifar10"},
    "cifar100": {**COMMON_DEFAULTS, "name": "cifar100"},
    "fashion_mnist": {**COMMON_DEFAULTS, "name": "fashion_mnist"},
    "imagefolder": {**COMMON_DEFAULTS, "name": "imagefolder", **IMAGEFOLDER_DEFAULTS},
    "synthetic": {**COMMON_DEFAULTS, "name": "synthetic", **SYNTHETIC_DEFAULTS},
}

KNOWN_KEYS = frozenset(COMMON_DEFAULTS) | frozenset(IMAGEFOLDER_DEFAULTS) | frozenset(SYNTHETIC_DEFAULTS)


def _to_dict(data_cfg: Any) -> dict[str, Any]:
    if data_cfg is None:
        return {}
    try:  # a Hydra DictConfig: resolve interpolations into plain containers
        from omegaconf import DictConfig, OmegaConf

        if isinstance(data_cfg, DictConfig):
            return dict(OmegaConf.to_container(data_cfg, resolve=True))
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if isinstance(data_cfg, Mapping):
        return dict(data_cfg)
    raise ConfigError(f"the data config must be a mapping, got {type(data_cfg).__name__}")


def _int(cfg: dict, key: str, lo: int | None = None, allow_none: bool = False) -> None:
    v = cfg[key]
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        else:
            raise ConfigError(f"data.{key} must be an integer{' or null' if allow_none else ''}, got {v!r}")
    if lo is not None and v < lo:
        raise ConfigError(f"data.{key} must be >= {lo}, got {v}")
    cfg[key] = v


def _floats(cfg: dict, key: str) -> None:
    v = cfg[key]
    if v is None:
        return
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        v = [v]
    try:
        cfg[key] = [float(x) for x in v]
    except (TypeError, ValueError):
        raise ConfigError(f"data.{key} must be a list of numbers or null, got {v!r}") from None


def resolve_data_cfg(data_cfg: Any, known_names: list[str]) -> dict[str, Any]:
    """Validate ``data_cfg`` and fill in defaults; returns a plain dict."""
    from kdlab.errors import unknown_name

    given = _to_dict(data_cfg)
    name = given.get("name")
    if name not in known_names:
        raise unknown_name("dataset", name, known_names)
    unknown = sorted(k for k in given if k not in KNOWN_KEYS)
    if unknown:
        raise ConfigError(
            f"unknown data config key(s) {', '.join(unknown)}; known: {', '.join(sorted(KNOWN_KEYS))}"
        )
    cfg = {**DATA_DEFAULTS.get(name, COMMON_DEFAULTS), **given}
    if cfg["root"] is None or not isinstance(cfg["root"], str) or not cfg["root"]:
        raise ConfigError(f"data.root must be a folder path, got {cfg['root']!r}")
    if not isinstance(cfg["download"], bool):
        raise ConfigError(f"data.download must be true or false, got {cfg['download']!r}")
    _int(cfg, "subset", lo=1, allow_none=True)
    _int(cfg, "test_subset", lo=1, allow_none=True)
    _int(cfg, "split_seed")
    _int(cfg, "pad", lo=0)
    _int(cfg, "batch_size_eval", lo=1, allow_none=True)
    vs = cfg["val_split"]
    if isinstance(vs, bool) or not isinstance(vs, (int, float)) or math.isnan(vs) or not 0 < vs <= 0.9:
        raise ConfigError(
            f"data.val_split must be a fraction in (0, 0.9] (the best epoch is chosen on it), got {vs!r}"
        )
    cfg["val_split"] = float(vs)
    check_augment(cfg["augment"])
    _floats(cfg, "mean")
    _floats(cfg, "std")
    if (cfg["mean"] is None) != (cfg["std"] is None):
        raise ConfigError("data.mean and data.std must be given together (or both null)")
    if name in ("imagefolder", "synthetic"):
        _int(cfg, "image_size", lo=1)
        _int(cfg, "channels", lo=1)
        if name == "imagefolder" and cfg["channels"] not in (1, 3):
            raise ConfigError(f"data.channels must be 1 or 3 for imagefolder, got {cfg['channels']}")
    if name == "imagefolder":
        _int(cfg, "num_workers", lo=0, allow_none=True)
    if name == "synthetic":
        _int(cfg, "num_classes", lo=2)
        _int(cfg, "n_train", lo=1)
        _int(cfg, "n_test", lo=1)
        _int(cfg, "data_seed")
        noise = cfg["noise"]
        if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not noise >= 0:
            raise ConfigError(f"data.noise must be a number >= 0, got {noise!r}")
        cfg["noise"] = float(noise)
    return cfg
