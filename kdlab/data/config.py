"""The data config: defaults per data set, and validation into a plain dict.

The defaults are written once, in the CLI's ``conf/data/<name>.yaml`` (one file per data set, read here with
OmegaConf at import; ``${paths.data_dir}`` resolves against ``conf/paths/default.yaml``). This module adds
only what those files do not say: the keys they leave out (`EXTRA_DEFAULTS`, set on the command line with
``+data.<key>=...``) and the few defaults a config built in code gets instead of the CLI's
(`CODE_DEFAULTS`). ``batch_size`` in the YAML is the run's (``data.batch_size``), given to
``build_datamodule`` apart, not a data key.

Every data set accepts the same key set (the union of all), so one YAML layout serves them all; keys a data
set does not use are ignored, keys nobody knows are a ConfigError (catches typos).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from kdlab import config_tree
from kdlab.data.augment import check_augment
from kdlab.errors import ConfigError

#: the CLI's config tree (the one ``python -m kdlab`` composes)
CONF_DIR = config_tree.CONF_DIR
#: keys of conf/data/*.yaml that belong to the run, not to the data set
RUN_KEYS = frozenset({"batch_size"})

#: keys conf/data/*.yaml leaves out, per data set ("*": every data set)
EXTRA_DEFAULTS: dict[str, dict[str, Any]] = {
    "*": {
        "mean": None,  # per-channel normalization; null -> the data set's standard values
        "std": None,
    },
    "imagefolder": {"channels": 3},  # 3 = RGB, 1 = grayscale
    "synthetic": {"data_seed": 0},  # seeds the generated images themselves
}

#: where a config built in code (``build_datamodule({"name": ...})``) gets another default than the CLI's
#: conf/data/<name>.yaml gives
CODE_DEFAULTS: dict[str, dict[str, Any]] = {
    "imagefolder": {
        "root": "data",  # the YAML's ??? makes data.root mandatory on the command line
        "image_size": 224,  # square side after resize / crop
        "num_workers": None,  # DataLoader workers; null -> min(8, CPU count)
    },
    "synthetic": {
        "augment": "crop_flip",
        "noise": 1.0,  # strength of the within-class variation relative to the class prototypes
    },
}


def _yaml_defaults() -> dict[str, dict[str, Any]]:
    """conf/data/<name>.yaml per name, interpolations resolved, mandatory values (???) as None."""
    from omegaconf import OmegaConf

    files = sorted((CONF_DIR / "data").glob("*.yaml"))
    if not files:
        raise ConfigError(f"no data set configs (conf/data/*.yaml) under {CONF_DIR}")
    paths = OmegaConf.load(CONF_DIR / "paths" / "default.yaml")
    out = {}
    for f in files:
        data = OmegaConf.create({"paths": paths, "data": OmegaConf.load(f)}).data
        values = OmegaConf.to_container(data, resolve=True, throw_on_missing=False)
        out[f.stem] = {
            k: None if OmegaConf.is_missing(data, k) else v for k, v in values.items() if k not in RUN_KEYS
        }
    return out


def _defaults() -> dict[str, dict[str, Any]]:
    return {
        name: {**cfg, **EXTRA_DEFAULTS["*"], **EXTRA_DEFAULTS.get(name, {}), **CODE_DEFAULTS.get(name, {})}
        for name, cfg in _yaml_defaults().items()
    }


#: data set name -> every key with the default a config built in code gets
DATA_DEFAULTS: dict[str, dict[str, Any]] = _defaults()
#: the defaults every data set shares (name None), for a data set without a conf/data file
COMMON_DEFAULTS: dict[str, Any] = {
    "name": None,
    **{
        k: v
        for k, v in next(iter(DATA_DEFAULTS.values())).items()
        if k != "name" and all(k in d and d[k] == v for d in DATA_DEFAULTS.values())
    },
}
KNOWN_KEYS = frozenset().union(*DATA_DEFAULTS.values())


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
    if cfg["root"] == "???":  # conf/data/imagefolder.yaml's mandatory value, not given
        raise ConfigError(f"data.root is required for data={name}: data.root=/path/to/folder")
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
    if isinstance(vs, bool) or not isinstance(vs, (int, float)) or math.isnan(vs) or not 0 <= vs <= 0.9:
        raise ConfigError(
            f"data.val_split must be a fraction in [0, 0.9] (the best epoch is chosen on it; 0: no validation "
            f"split, the whole training split trains: protocol=reference), got {vs!r}"
        )
    cfg["val_split"] = float(vs)
    if name == "imagefolder":  # its own augment values (imagenet) and loader keys
        from kdlab.data.imagefolder import check_folder_cfg

        check_folder_cfg(cfg)
    else:
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
