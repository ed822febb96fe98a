"""ImageFolder data sets: images on disk in torchvision's class-per-folder layout, loaded by a DataLoader.

Layout: <root>/train/<class>/<image>, plus <root>/test/<class>/... and/or <root>/val/<class>/...
  - train + val + test: all three used as they are (data.val_split is ignored, except 0: no validation split);
  - train + test:       val is split from train (data.val_split, data.split_seed);
  - train + val:        val/ serves as the test set (the ImageNet convention), val is split from train.
Class indices come from train/ (sorted folder names); val/test may lack classes but not add new ones.

The path at speed (docs/data.md): DataLoader workers read each file's bytes and decode them with
``torchvision.io.decode_image`` (libjpeg-turbo / libpng; PIL only for the formats it lacks), then apply
torchvision **v2** transforms to the uint8 tensor and normalize in one fused pass. Training:
RandomResizedCrop(image_size, data.rrc_scale) + horizontal flip (``crop_flip`` / ``imagenet``); evaluation:
Resize(floor(image_size / crop_pct)) + CenterCrop(image_size) (``crop_pct`` 0.875 for ``imagenet``: 256 -> 224).
``data.decode_device=cuda`` decodes JPEGs on the GPU instead (``torchvision.io.decode_jpeg(device=...)``) in
the training process: the workers only read bytes. A file that cannot be decoded is a DataError naming it,
raised when it is first read (a header scan of a million files at load would cost minutes on network storage).
"""
from __future__ import annotations

import math
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
from kdlab.errors import ConfigError, DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: data.augment for imagefolder: the shared ones plus ``imagenet`` (random-resized crop + flip, eval crop_pct 0.875)
FOLDER_AUGMENTS = ("none", "flip", "crop_flip", "imagenet")
DECODE_DEVICES = ("cpu", "cuda", "auto")
IMAGENET_CROP_PCT = 0.875  # the ImageNet convention: resize to 256, center-crop 224


def check_folder_cfg(cfg: dict[str, Any]) -> None:
    """imagefolder's own keys (data.resolve_data_cfg calls it): bad values are one ConfigError line."""
    aug = cfg["augment"]
    if aug not in FOLDER_AUGMENTS:
        raise ConfigError(f"unknown data.augment {aug!r} for imagefolder; known: {', '.join(FOLDER_AUGMENTS)}")
    scale = cfg["rrc_scale"]
    try:
        lo, hi = (float(v) for v in scale)
        ok = 0 < lo <= hi <= 1
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f"data.rrc_scale must be [min, max] with 0 < min <= max <= 1, got {scale!r}")
    cfg["rrc_scale"] = [lo, hi]
    pct = cfg["crop_pct"]
    if pct is not None:
        if isinstance(pct, bool) or not isinstance(pct, (int, float)) or not 0 < pct <= 1:
            raise ConfigError(f"data.crop_pct must be in (0, 1] or null (0.875 for augment=imagenet, else 1), "
                              f"got {pct!r}")
        cfg["crop_pct"] = float(pct)
    dev = cfg["decode_device"]
    if dev not in DECODE_DEVICES:
        raise ConfigError(f"unknown data.decode_device {dev!r}; known: {', '.join(DECODE_DEVICES)}")
    if dev == "cuda" and not torch.cuda.is_available():
        raise ConfigError("data.decode_device=cuda needs a CUDA GPU, and none is visible; use "
                          "data.decode_device=cpu (or auto: the GPU where the stage trains on one)")
    if cfg["pin_memory"] not in ("auto", True, False):
        raise ConfigError(f"data.pin_memory must be auto, true or false, got {cfg['pin_memory']!r}")
    for key in ("persistent_workers",):
        if not isinstance(cfg[key], bool):
            raise ConfigError(f"data.{key} must be true or false, got {cfg[key]!r}")
    pf = cfg["prefetch_factor"]
    if isinstance(pf, bool) or not isinstance(pf, int) or pf < 1:
        raise ConfigError(f"data.prefetch_factor must be an integer >= 1 (batches each worker keeps ready), "
                          f"got {pf!r}")


def crop_pct_of(augment: str, crop_pct: float | None) -> float:
    """The evaluation crop fraction: data.crop_pct, or 0.875 for augment=imagenet and 1 (resize to the crop
    size, kdlab's small-image behaviour) otherwise."""
    if crop_pct is not None:
        return float(crop_pct)
    return IMAGENET_CROP_PCT if augment == "imagenet" else 1.0


def _clean(e: Exception) -> str:
    """torchvision's decode errors start with the C++ source location: keep the reason only."""
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text.rsplit(", ", 1)[-1] if text.startswith(("decode_", "read_file")) else text


def decode_file(path: str, data: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 (C, H, W) of an encoded image; torchvision's decoders first, PIL for the other formats."""
    from torchvision.io import ImageReadMode, decode_image

    mode = ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY
    try:
        return decode_image(data, mode=mode)
    except RuntimeError as e:
        if "Unsupported image file" not in str(e):
            raise DataError(f"cannot decode image {path}: {_clean(e)}") from None
    from PIL import Image  # BMP, TIFF, PPM, ...: formats torchvision.io does not decode

    try:
        with Image.open(path) as img:
            arr = np.asarray(img.convert("RGB" if channels == 3 else "L"))
    except OSError as e:
        raise DataError(f"cannot read image {path}: {e}") from None
    t = torch.from_numpy(arr.copy())
    return t.permute(2, 0, 1).contiguous() if t.ndim == 3 else t.unsqueeze(0)


class FolderTransform:
    """uint8 (C, H, W) -> float32 normalized (C, S, S): torchvision v2 geometry, then one fused normalize.

    ``train`` with augment crop_flip / imagenet: RandomResizedCrop(S, scale) + RandomHorizontalFlip;
    otherwise Resize(floor(S / crop_pct)) + CenterCrop(S) (+ flip for augment=flip in training)."""

    def __init__(self, size: int, augment: str, train: bool, scale: tuple[float, float], crop_pct: float,
                 mean: tuple[float, ...], std: tuple[float, ...]):
        from torchvision.transforms import v2

        aug = augment if train else "none"
        if aug in ("crop_flip", "imagenet"):
            ops = [v2.RandomResizedCrop(size, scale=tuple(scale), antialias=True), v2.RandomHorizontalFlip()]
        else:
            ops = [v2.Resize(math.floor(size / crop_pct), antialias=True), v2.CenterCrop(size)]
            if aug == "flip":
                ops.append(v2.RandomHorizontalFlip())
        self.geometry = v2.Compose(ops)
        self.size = size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1) * 255.0
        self.inv_std = 1.0 / (torch.tensor(std, dtype=torch.float32).view(-1, 1, 1) * 255.0)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        x = self.geometry(img)
        mean, inv = self.mean.to(x.device), self.inv_std.to(x.device)
        return x.to(torch.float32).sub_(mean).mul_(inv)  # = Normalize(ToDtype(x, scale=True)), one pass


class IndexedImages(Dataset):
    """(image tensor, label, index within the split) for a list of (path, label) samples.

    ``transform`` None: the file's bytes (uint8, 1-D) instead of the image, decoded later on the GPU."""

    def __init__(self, samples: list[tuple[str, int]], transform: Any, channels: int):
        self.samples, self.transform, self.channels = samples, transform, channels

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        from torchvision.io import read_file

        path, label = self.samples[i]
        try:
            data = read_file(path)
        except RuntimeError as e:
            raise DataError(f"cannot read image {path}: {_clean(e)}") from None
        if self.transform is None:
            return data, label, i
        return self.transform(decode_file(path, data, self.channels)), label, i


def _bytes_collate(batch: list[tuple[torch.Tensor, int, int]]) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    data, labels, idx = zip(*batch)
    return list(data), torch.tensor(labels, dtype=torch.int64), torch.tensor(idx, dtype=torch.int64)


class GpuDecoder:
    """Decodes a batch of encoded images on ``device`` (nvJPEG through torchvision.io.decode_jpeg; PNG and
    the other formats on the CPU, then moved) and applies the stage's transform there."""

    def __init__(self, samples: list[tuple[str, int]], transform: FolderTransform, channels: int):
        self.samples, self.transform, self.channels = samples, transform, channels

    def __call__(self, batch):
        from torchvision.io import ImageReadMode, decode_jpeg

        data, labels, idx = batch
        device = torch.device("cuda", torch.cuda.current_device())  # Lightning sets each DDP rank's device
        mode = ImageReadMode.RGB if self.channels == 3 else ImageReadMode.GRAY
        jpeg = [k for k, d in enumerate(data) if d.numel() > 2 and int(d[0]) == 0xFF and int(d[1]) == 0xD8]
        images: list[torch.Tensor | None] = [None] * len(data)
        if jpeg:
            try:
                decoded = decode_jpeg([data[k] for k in jpeg], mode=mode, device=device)
            except RuntimeError:
                decoded = []
                for k in jpeg:  # one by one, to name the file that fails
                    try:
                        decoded.append(decode_jpeg(data[k], mode=mode, device=device))
                    except RuntimeError as e:
                        path = self.samples[int(idx[k])][0]
                        raise DataError(f"cannot decode image {path} on {device}: {_clean(e)}") from None
            for k, img in zip(jpeg, decoded):
                images[k] = img
        for k, img in enumerate(images):
            if img is None:
                path = self.samples[int(idx[k])][0]
                images[k] = decode_file(path, data[k], self.channels).to(device, non_blocking=True)
        x = torch.stack([self.transform(img) for img in images])
        return x, labels.to(device, non_blocking=True), idx.to(device, non_blocking=True)


class FolderLoader(DataLoader):
    """A DataLoader (Lightning shards and re-creates it as any other) whose batches come out finished: a
    DataError raised in a worker keeps its one-line message, and ``finish`` (GPU decoding) runs on each batch
    in the training process."""

    def __init__(self, *args: Any, finish: Any = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.finish = finish

    def __iter__(self):
        it = super().__iter__()
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except DataError as e:  # re-raised from a worker: "Caught DataError in DataLoader worker ..."
                raise DataError(_worker_message(e)) from None
            yield self.finish(batch) if self.finish is not None else batch


def _worker_message(e: DataError) -> str:
    lines = str(e).strip().splitlines()
    for line in reversed(lines):
        if line.startswith(("kdlab.errors.DataError: ", "DataError: ")):
            return line.split(": ", 1)[1]
    return lines[-1] if lines else "DataError"


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
    augments = FOLDER_AUGMENTS
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
        if test_dir.is_dir() and val_dir.is_dir() and c["val_split"] > 0:
            self.train_index, val_samples = kept, _scan(val_dir, class_to_idx)
            self.val_index = np.arange(len(val_samples))
        else:
            tr, va = train_val_split(labels[kept], c["val_split"], c["split_seed"], self.name)
            self.train_index, self.val_index = kept[tr], kept[va]
            val_samples = [train_all[i] for i in self.val_index]
        test_all = _scan(test_dir if test_dir.is_dir() else val_dir, class_to_idx)
        for what, samples in (("validation", val_samples), ("test", test_all)):
            if not samples and (what == "test" or c["val_split"] > 0):  # val_split 0: no validation split
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
    @property
    def crop_pct(self) -> float:
        return crop_pct_of(self.augment, self.cfg["crop_pct"])

    def _transform(self, train: bool) -> FolderTransform:
        return FolderTransform(self.image_size, self.augment, train, tuple(self.cfg["rrc_scale"]), self.crop_pct,
                               self.mean, self.std)

    def _accelerator(self) -> str | None:
        """The device type the attached Trainer trains on ("cuda", "cpu", ...), None without a Trainer."""
        trainer = getattr(self, "trainer", None)
        try:
            return trainer.strategy.root_device.type if trainer is not None else None
        except Exception:  # noqa: BLE001 - a Trainer still being set up
            return None

    def decode_on_gpu(self) -> bool:
        """data.decode_device: cuda always (checked: a GPU is visible), auto where the stage trains on one."""
        dev = self.cfg["decode_device"]
        if dev == "cuda":
            return True
        return dev == "auto" and torch.cuda.is_available() and self._accelerator() in ("cuda", None)

    def _loader(self, samples, batch_size: int, train: bool, shard: bool = True) -> DataLoader:
        self.setup()
        c = self.cfg
        workers = c["num_workers"]
        if workers is None:
            workers = min(8, os.cpu_count() or 1)
        pin = c["pin_memory"]
        if pin == "auto":  # pinned host memory only pays (and only exists) for copies to a GPU
            pin = torch.cuda.is_available() and self._accelerator() in ("cuda", None)
        transform = self._transform(train)
        gpu = self.decode_on_gpu()
        ds = IndexedImages(samples, None if gpu else transform, self.in_channels)
        g = torch.Generator().manual_seed(self.seed)  # seeds the workers' augmentation RNGs
        if train:
            sampler = EpochSampler(len(ds), shuffle=True, seed=self.seed)  # Lightning shards it, padded
        elif shard and self._dist()[1] > 1:
            # unpadded, so that val/test count every sample once; Lightning keeps a DistributedSampler
            sampler = EvalShardSampler(len(ds), *self._dist())
        else:
            sampler = None
        return FolderLoader(
            ds,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=workers,
            persistent_workers=bool(c["persistent_workers"]) and workers > 0,
            prefetch_factor=int(c["prefetch_factor"]) if workers > 0 else None,
            pin_memory=bool(pin),
            generator=g,
            drop_last=False,
            collate_fn=_bytes_collate if gpu else None,
            finish=GpuDecoder(samples, transform, self.in_channels) if gpu else None,
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
        ident = {**super().identity(), "pad": None}
        # the geometry keys only where they differ from what kdlab did before they existed (crop_flip with
        # torchvision's default scale, evaluation resized to the crop), so existing store keys stay valid
        scale = [float(v) for v in self.cfg["rrc_scale"]]
        if self.augment in ("crop_flip", "imagenet") and scale != [0.08, 1.0]:
            ident["rrc_scale"] = scale
        if self.crop_pct != 1.0:
            ident["crop_pct"] = self.crop_pct
        return ident

    def _content_hash(self, h: Any) -> None:
        # file names (relative to root), sizes and labels: cheap, and independent of where root is
        for samples in (self.train_samples, self.val_samples, self.test_samples):
            h.update(b"|split|")
            for path, label in samples:
                rel = os.path.relpath(path, self._root_dir)
                h.update(f"{rel}\0{os.path.getsize(path)}\0{label}\n".encode())
