"""ImageFolder data sets: images on disk in torchvision's class-per-folder layout, loaded by a DataLoader.

Layout: <root>/train/<class>/<image>, plus <root>/test/<class>/... and/or <root>/val/<class>/...
  - train + val + test: all three used as they are (data.val_split is ignored);
  - train + test:       val is split from train (data.val_split, data.split_seed);
  - train + val:        val/ serves as the test set (the ImageNet convention), val is split from train.
Class indices come from train/ (sorted folder names); val/test may lack classes but not add new ones.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from kdlab.data.base import DATASETS, KdDataModule
from kdlab.data.datasets import _root
from kdlab.data.loader import EpochSampler, EvalShardSampler
from kdlab.data.splits import take_subset, train_val_split
from kdlab.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class IndexedImages(Dataset):
    """(image tensor, label, index within the split) for a list of (path, label) samples."""

    def __init__(self, samples: list[tuple[str, int]], transform: Any, mode: str):
        self.samples, self.transform, self.mode = samples, transform, mode

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        from PIL import Image

        path, label = self.samples[i]
        try:
            with Image.open(path) as img:
                img = img.convert(self.mode)
        except OSError as e:
            raise DataError(f"cannot read image {path}: {e}") from None
        return self.transform(img), label, i


def _scan(directory: Path, class_to_idx: dict[str, int]) -> list[tuple[str, int]]:
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    extra = sorted(
        e.name for e in os.scandir(directory) if e.is_dir() and e.name not in class_to_idx
    )
    if extra:
        raise DataError(
            f"imagefolder: {directory} has class folder(s) {', '.join(extra)} that train/ lacks"
        )
    return make_dataset(str(directory), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)


@DATASETS.register("imagefolder")
class ImageFolderDataModule(KdDataModule):
    name = "imagefolder"

    def _load(self) -> None:
        from torchvision.datasets.folder import find_classes

        c = self.cfg
        root = _root(c)
        train_dir, val_dir, test_dir = root / "train", root / "val", root / "test"
        if not train_dir.is_dir():
            raise DataError(
                f"imagefolder not found; tried: {train_dir}; expected <root>/train/<class>/<image> "
                "and <root>/test/ or <root>/val/ (set data.root)"
            )
        if not test_dir.is_dir() and not val_dir.is_dir():
            raise DataError(f"imagefolder: neither {test_dir} nor {val_dir} exists; one is needed for testing")
        try:
            classes, class_to_idx = find_classes(str(train_dir))
        except FileNotFoundError:
            raise DataError(f"imagefolder: no class folders in {train_dir}") from None
        train_all = _scan(train_dir, class_to_idx)
        if not train_all:
            raise DataError(f"imagefolder: no images in {train_dir}")
        labels = np.array([y for _, y in train_all], dtype=np.int64)
        kept = take_subset(labels, c["subset"], c["split_seed"], "subset", self.name)
        if test_dir.is_dir() and val_dir.is_dir():
            self.train_index, val_samples = kept, _scan(val_dir, class_to_idx)
            self.val_index = np.arange(len(val_samples))
        else:
            tr, va = train_val_split(labels[kept], c["val_split"], c["split_seed"], self.name)
            self.train_index, self.val_index = kept[tr], kept[va]
            val_samples = [train_all[i] for i in self.val_index]
        test_all = _scan(test_dir if test_dir.is_dir() else val_dir, class_to_idx)
        for what, samples in (("validation", val_samples), ("test", test_all)):
            if not samples:
                raise DataError(f"imagefolder: the {what} set under {root} has no images")
        test_labels = np.array([y for _, y in test_all], dtype=np.int64)
        self.test_index = take_subset(test_labels, c["test_subset"], c["split_seed"], "test_subset", self.name)
        self.train_samples = [train_all[i] for i in self.train_index]
        self.val_samples = val_samples
        self.test_samples = [test_all[i] for i in self.test_index]
        self.classes = list(classes)
        self.num_classes = len(classes)
        self.in_channels = c["channels"]
        self.image_size = c["image_size"]
        self._root_dir = root
        if self.in_channels == 3:
            stats = IMAGENET_MEAN, IMAGENET_STD
        else:
            stats = (sum(IMAGENET_MEAN) / 3,), (sum(IMAGENET_STD) / 3,)
        self._set_stats(*stats)

    # ---- transforms and loaders ------------------------------------------------------------------
    def _transform(self, train: bool):
        from torchvision import transforms as T

        s = self.image_size
        aug = self.augment if train else "none"
        if aug == "crop_flip":
            ops = [T.RandomResizedCrop(s), T.RandomHorizontalFlip()]
        else:
            ops = [T.Resize(s), T.CenterCrop(s)]
            if aug == "flip":
                ops.append(T.RandomHorizontalFlip())
        return T.Compose([*ops, T.ToTensor(), T.Normalize(self.mean, self.std)])

    def _loader(self, samples, batch_size: int, train: bool, shard: bool = True) -> DataLoader:
        self.setup()
        workers = self.cfg["num_workers"]
        if workers is None:
            workers = min(8, os.cpu_count() or 1)
        mode = "RGB" if self.in_channels == 3 else "L"
        ds = IndexedImages(samples, self._transform(train), mode)
        g = torch.Generator().manual_seed(self.seed)  # seeds the workers' augmentation RNGs
        if train:
            sampler = EpochSampler(len(ds), shuffle=True, seed=self.seed)  # Lightning shards it, padded
        elif shard and self._dist()[1] > 1:
            # unpadded, so that val/test count every sample once; Lightning keeps a DistributedSampler
            sampler = EvalShardSampler(len(ds), *self._dist())
        else:
            sampler = None
        return DataLoader(
            ds,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
            generator=g,
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_samples, self.batch_size, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_samples, self.batch_size_eval, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_samples, self.batch_size_eval, train=False)

    def train_eval_dataloader(self) -> DataLoader:
        return self._loader(self.train_samples, self.batch_size_eval, train=False, shard=False)

    def split_size(self, split: str) -> int:
        return len(getattr(self, f"{split}_samples"))

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "pad": None}

    def _content_hash(self, h: Any) -> None:
        # file names (relative to root), sizes and labels: cheap, and independent of where root is
        for samples in (self.train_samples, self.val_samples, self.test_samples):
            h.update(b"|split|")
            for path, label in samples:
                rel = os.path.relpath(path, self._root_dir)
                h.update(f"{rel}\0{os.path.getsize(path)}\0{label}\n".encode())
