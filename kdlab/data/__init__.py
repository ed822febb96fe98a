"""Datamodules for kdlab: CIFAR-10/100, Fashion-MNIST, synthetic (in-memory tensors) and ImageFolder.

    dm = build_datamodule(cfg.data, batch_size=128, seed=0)
    dm.num_classes, dm.in_channels, dm.image_size, dm.train_size, dm.fingerprint()
    for x, y, idx in dm.train_dataloader(): ...

Config keys and their defaults per data set: ``DATA_DEFAULTS`` (kdlab/data/config.py).
"""
from __future__ import annotations

from typing import Any

from kdlab.data import datasets as _datasets  # noqa: F401  (registers cifar10, cifar100, ...)
from kdlab.data import imagefolder as _imagefolder  # noqa: F401  (registers imagefolder)
from kdlab.data.augment import AUGMENTS, Normalizer, crop_flip, random_crop_flip_params
from kdlab.data.base import DATASETS, KdDataModule, TensorDataModule
from kdlab.data.config import DATA_DEFAULTS, resolve_data_cfg
from kdlab.data.loader import EpochSampler, TensorLoader, derive_seed

__all__ = [
    "AUGMENTS",
    "DATASETS",
    "DATA_DEFAULTS",
    "EpochSampler",
    "KdDataModule",
    "Normalizer",
    "TensorDataModule",
    "TensorLoader",
    "build_datamodule",
    "crop_flip",
    "derive_seed",
    "random_crop_flip_params",
    "resolve_data_cfg",
]


def build_datamodule(data_cfg: Any, batch_size: int, seed: int = 0) -> KdDataModule:
    """Validate ``data_cfg``, fetch the data if asked (data.download=true), load it, and return the module.

    Loading happens here, once, so that bad or missing data fails before any stage trains and the
    shape attributes (num_classes, in_channels, image_size) are known to build models.
    """
    cfg = resolve_data_cfg(data_cfg, DATASETS.names())
    dm = DATASETS.get(cfg["name"])(cfg, batch_size=batch_size, seed=seed)
    dm.prepare_data()
    dm.setup()
    return dm
