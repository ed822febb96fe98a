"""Datamodule base classes: KdDataModule (common contract) and TensorDataModule (in-memory path)."""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from kdlab.data.augment import AUGMENTS, Normalizer, ViewSpace, view_space
from kdlab.data.loader import TensorLoader
from kdlab.data.splits import take_subset, train_val_split
from kdlab.errors import ConfigError, DataError
from kdlab.registry import Registry

DATASETS = Registry("dataset")


class KdDataModule(pl.LightningDataModule):
    """What every kdlab datamodule offers; subclasses load in ``_load`` (called once by ``setup``).

    Attributes after setup: name, num_classes, in_channels, image_size (H), mean, std, classes,
    train_size / val_size / test_size, train_index / val_index (positions in the original training set).

    The training loader's settings are ``seed`` (order and augmentation draws), ``augment`` and ``train_views``;
    a stage trains on its own view of the data (:meth:`for_stage`), which shares the loaded splits.
    """

    name: str = ""
    #: training batches carry the view id of each sample (x, y, idx, view): a stage's view whose sources teach
    #: from view caches (distill.cache=views / auto; :meth:`for_stage`)
    train_views: bool = False
    default_mean: tuple[float, ...] = ()
    default_std: tuple[float, ...] = ()

    def __init__(self, cfg: dict[str, Any], batch_size: int, seed: int = 0):
        super().__init__()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.cfg = cfg
        self.batch_size = batch_size
        self.batch_size_eval = cfg["batch_size_eval"] or 2 * batch_size
        self.seed = int(seed)
        self.augment: str = cfg["augment"]
        self.pad: int = cfg["pad"]
        self.num_classes = 0
        self.in_channels = 0
        self.image_size = 0
        self.mean: tuple[float, ...] = ()
        self.std: tuple[float, ...] = ()
        self.classes: list[str] | None = None
        self._loaded = False
        self._fingerprints: dict[str, str] = {}  # by training augmentation, shared with the stages' views
        self._shared: KdDataModule | None = None  # the data module this one is a stage's view of

    # ---- lifecycle -------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if not self._loaded:
            self._load()
            self._loaded = True

    def _load(self) -> None:
        raise NotImplementedError

    #: the data.augment values this data module knows
    augments: tuple[str, ...] = AUGMENTS

    def check_augment(self, augment: str, where: str = "data.augment") -> str:
        if augment not in self.augments:
            raise ConfigError(f"unknown {where} {augment!r} for {self.name or 'this data set'}; known: "
                              f"{', '.join(self.augments)}")
        return augment

    def for_stage(self, seed: int | None = None, augment: str | None = None, views: bool = False) -> KdDataModule:
        """One stage's view of this data: the same loaded splits (tensors or file lists, shared, never copied) with
        the stage's own training settings: ``seed`` (its data order and augmentation draws; None: this module's),
        ``augment`` (its training augmentation, ``pipeline.per_stage.<stage>.augment``; None: this module's,
        ``data.augment``) and ``views`` (view ids on its training batches). Its fingerprint is that of its
        augmentation. This data module is not changed."""
        self.setup()
        stage = copy.copy(self)
        stage._shared = self.shared
        stage.seed = self.seed if seed is None else int(seed)
        stage.augment = self.augment if augment is None else self.check_augment(augment)
        stage.train_views = bool(views)
        stage.trainer = None  # Lightning attaches the Trainer that fits the view to the view
        return stage

    @property
    def shared(self) -> KdDataModule:
        """The data module whose loaded splits this one uses: the one a stage's view was made from, else itself."""
        return self._shared if self._shared is not None else self

    # ---- contract --------------------------------------------------------------------------------
    @property
    def deterministic_train(self) -> bool:
        """True when a training batch depends only on the order (no random augmentation)."""
        return self.augment == "none"

    def view_space(self) -> ViewSpace | None:
        """The finite views of the training augmentation, or None where there are none to enumerate (no
        augmentation, or one drawn per sample by a worker, like a random-resized crop)."""
        return None

    def split_size(self, split: str) -> int:
        """Samples in ``split`` (train | val | test)."""
        raise NotImplementedError

    @property
    def train_size(self) -> int:
        return self.split_size("train")

    @property
    def val_size(self) -> int:
        return self.split_size("val")

    @property
    def test_size(self) -> int:
        return self.split_size("test")

    def to_device(self, device: torch.device | str) -> KdDataModule:
        return self

    def identity(self) -> dict[str, Any]:
        """Everything that defines the data a stage sees (not where it lives on disk)."""
        c = self.cfg
        return {
            "name": self.name,
            "subset": c["subset"],
            "val_split": c["val_split"],
            "split_seed": c["split_seed"],
            "test_subset": c["test_subset"],
            "augment": self.augment,
            "pad": self.pad if self.augment == "crop_flip" else None,
            "image_size": self.image_size,
            "in_channels": self.in_channels,
            "num_classes": self.num_classes,
            "mean": [round(m, 6) for m in self.mean],
            "std": [round(s, 6) for s in self.std],
        }

    def _content_hash(self, h: Any) -> None:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """Stable short sha256 of identity() plus the content of the train/val/test splits (computed once per
        training augmentation)."""
        if self.augment not in self._fingerprints:
            self.setup()
            h = hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode())
            self._content_hash(h)
            self._fingerprints[self.augment] = h.hexdigest()[:16]
        return self._fingerprints[self.augment]

    def summary(self) -> dict[str, Any]:
        return {
            **self.identity(),
            "train_size": self.train_size,
            "val_size": self.val_size,
            "test_size": self.test_size,
            "fingerprint": self.fingerprint(),
        }

    def _dist(self) -> tuple[int, int]:
        """(rank, world size) of the attached Trainer, (0, 1) otherwise."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return int(getattr(trainer, "global_rank", 0)), int(getattr(trainer, "world_size", 1))

    def _set_stats(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        if self.cfg["mean"] is not None:
            mean, std = tuple(self.cfg["mean"]), tuple(self.cfg["std"])
        if len(mean) == 1 and self.in_channels > 1:
            mean, std = mean * self.in_channels, std * self.in_channels
        if len(mean) != self.in_channels or len(std) != self.in_channels:
            raise DataError(
                f"{self.name}: data.mean/std have {len(mean)}/{len(std)} values but the images have "
                f"{self.in_channels} channel(s)"
            )
        self.mean, self.std = tuple(mean), tuple(std)
        self.normalizer = Normalizer(self.mean, self.std)


@dataclass
class RawSplits:
    """What a reader returns: the data set's official train and test sets."""

    train_images: np.ndarray  # uint8 (N, C, H, W)
    train_labels: np.ndarray  # int (N,)
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    classes: list[str] | None = None


def _check_images(name: str, what: str, images: np.ndarray, labels: np.ndarray, num_classes: int) -> None:
    if images.dtype != np.uint8 or images.ndim != 4:
        raise DataError(f"{name}: {what} images must be uint8 (N, C, H, W), got {images.dtype} {images.shape}")
    if len(images) == 0:
        raise DataError(f"{name}: the {what} set is empty")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{name}: {len(images)} {what} images but {labels.size} labels")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise DataError(f"{name}: {what} labels outside [0, {num_classes})")


SPLIT_TENSORS = ("train_images", "train_labels", "val_images", "val_labels", "test_images", "test_labels")


class TensorDataModule(KdDataModule):
    """Data sets held in memory as uint8 NCHW tensors, batched by TensorLoader."""

    def read(self) -> RawSplits:
        raise NotImplementedError

    def _load(self) -> None:
        raw = self.read()
        nc = raw.num_classes
        _check_images(self.name, "training", raw.train_images, raw.train_labels, nc)
        _check_images(self.name, "test", raw.test_images, raw.test_labels, nc)
        if raw.train_images.shape[1:] != raw.test_images.shape[1:]:
            raise DataError(
                f"{self.name}: training images are {raw.train_images.shape[1:]} but test images are "
                f"{raw.test_images.shape[1:]} (C, H, W)"
            )
        c = self.cfg
        labels = np.asarray(raw.train_labels, dtype=np.int64)
        kept = take_subset(labels, c["subset"], c["split_seed"], "subset", self.name)
        tr, va = train_val_split(labels[kept], c["val_split"], c["split_seed"], self.name)
        self.train_index, self.val_index = kept[tr], kept[va]
        test_labels = np.asarray(raw.test_labels, dtype=np.int64)
        self.test_index = take_subset(test_labels, c["test_subset"], c["split_seed"], "test_subset", self.name)

        def tensors(images, labels, index):
            # fancy indexing copies, so the tensors own writable memory (the readers may return views)
            return torch.from_numpy(images[index]), torch.from_numpy(labels[index])

        self.train_images, self.train_labels = tensors(raw.train_images, labels, self.train_index)
        self.val_images, self.val_labels = tensors(raw.train_images, labels, self.val_index)
        self.test_images, self.test_labels = tensors(raw.test_images, test_labels, self.test_index)
        self.num_classes = nc
        self.classes = raw.classes
        self.in_channels, self.image_size = int(raw.train_images.shape[1]), int(raw.train_images.shape[2])
        self._set_stats(*self.stats())

    def stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Normalization (mean, std) in [0, 1] units; the data set's standard values by default."""
        return self.default_mean, self.default_std

    def split_size(self, split: str) -> int:
        return len(getattr(self, f"{split}_images"))

    def view_space(self) -> ViewSpace | None:
        return view_space(self.augment, self.pad)

    @property
    def device(self) -> torch.device:
        return self.train_images.device

    def to_device(self, device: torch.device | str) -> TensorDataModule:
        """Move all splits to ``device`` (on a GPU the whole data set then lives there): those of the shared data
        module, once for it and every stage's view of it (:meth:`for_stage`)."""
        shared = self.shared
        shared.setup()
        device = torch.device(device)
        for attr in SPLIT_TENSORS:
            setattr(shared, attr, getattr(shared, attr).to(device))
            setattr(self, attr, getattr(shared, attr))
        return self

    def _content_hash(self, h: Any) -> None:
        for t in (self.train_images, self.train_labels, self.val_images, self.val_labels,
                  self.test_images, self.test_labels):
            a = t.detach().cpu().contiguous().numpy()
            h.update(str((a.dtype.str, a.shape)).encode())
            if a.size:  # an empty split (data.val_split=0) is its shape alone
                h.update(memoryview(a).cast("B"))

    def _loader(self, images, labels, batch_size, train: bool, shard: bool = True) -> TensorLoader:
        """Training shards are padded to equal sizes (DDP steps together); evaluation shards are not, so
        that val/test metrics (summed across ranks by torchmetrics) count every sample exactly once."""
        self.setup()
        rank, world = self._dist() if shard else (0, 1)
        return TensorLoader(
            images, labels, batch_size, self.normalizer,
            augment=self.augment if train else "none", pad=self.pad, shuffle=train, seed=self.seed,
            rank=rank, world_size=world, even_shards=train, views=train and self.train_views,
        )

    def train_dataloader(self) -> TensorLoader:
        return self._loader(self.train_images, self.train_labels, self.batch_size, train=True)

    def val_dataloader(self) -> TensorLoader:
        return self._loader(self.val_images, self.val_labels, self.batch_size_eval, train=False)

    def test_dataloader(self) -> TensorLoader:
        return self._loader(self.test_images, self.test_labels, self.batch_size_eval, train=False)

    def train_eval_dataloader(self) -> TensorLoader:
        """The training split in order, unaugmented, unsharded (to cache sources' outputs by idx)."""
        return self._loader(self.train_images, self.train_labels, self.batch_size_eval, train=False,
                            shard=False)
