"""The in-memory data sets: CIFAR-10, CIFAR-100, Fashion-MNIST and a generated synthetic set.

Layouts looked for under ``data.root`` (the first complete one wins):
  cifar10:       <root>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}, or <root> itself,
                 or <root>/cifar-10-python.tar.gz (extracted in place)
  cifar100:      <root>/cifar-100-python/{train,test,meta}, or <root> itself, or <root>/cifar-100-python.tar.gz
  fashion_mnist: <root>/FashionMNIST/raw, <root>/fashion-mnist, <root>, then the Debian package's
                 /usr/share/datasets/fashion-mnist; files {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]
``data.download=true`` fetches missing CIFAR / Fashion-MNIST through torchvision into <root>, after which
the same readers load them (torchvision's own dataset classes would reject anything but the originals).
"""
from __future__ import annotations

import math
import os
import tarfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kdlab.data.base import DATASETS, RawSplits, TensorDataModule
from kdlab.data.formats import cifar_batch_arrays, cifar_label_names, read_idx
from kdlab.data.loader import derive_seed
from kdlab.errors import DataError

# The Debian package dataset-fashion-mnist installs here; a module attribute so tests can hide it.
SYSTEM_FASHION_MNIST_DIRS: list[str] = ["/usr/share/datasets/fashion-mnist"]

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]


def _root(cfg: dict) -> Path:
    return Path(os.path.expandvars(os.path.expanduser(cfg["root"])))


@contextmanager
def _download_lock(root: Path, name: str):
    """Serialize downloads of one data set into one root (parallel sweep jobs, DDP ranks)."""
    from filelock import FileLock

    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f".kdlab-{name}.lock")):
        yield


def _torchvision_download(name: str, root: Path, fetch: Callable[[str], object]) -> None:
    with _download_lock(root, name):
        try:
            fetch(str(root))
        except (OSError, RuntimeError, ValueError) as e:  # network (URLError is an OSError), disk, checksum
            reason = " ".join(str(e).split())  # torchvision's messages span lines
            raise DataError(f"downloading {name} into {root} failed: {type(e).__name__}: {reason}") from None


# ---- CIFAR ---------------------------------------------------------------------------------------


class _CifarDataModule(TensorDataModule):
    folder = ""
    archive = ""
    train_files: tuple[str, ...] = ()
    test_files: tuple[str, ...] = ()
    meta_file = ""
    names_key = ""
    label_key = ""
    n_classes = 0
    torchvision_class = ""  # the torchvision.datasets class that downloads it (data.download=true)

    def _candidates(self, root: Path) -> list[Path]:
        return [root / self.folder, root]

    def _complete(self, d: Path) -> bool:
        return all((d / f).is_file() for f in self.train_files + self.test_files)

    def _find(self, root: Path) -> Path | None:
        for d in self._candidates(root):
            if self._complete(d):
                return d
        archive = root / self.archive
        if archive.is_file():  # a downloaded but not yet extracted archive
            with _download_lock(root, self.name):
                if not self._complete(root / self.folder):
                    try:
                        with tarfile.open(archive) as tar:
                            # the "data" filter refuses absolute paths, links out of root, devices
                            kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                            tar.extractall(root, **kw)
                    except (OSError, tarfile.TarError) as e:
                        raise DataError(f"cannot extract {archive}: {e}") from None
            if self._complete(root / self.folder):
                return root / self.folder
        return None

    def prepare_data(self) -> None:
        root = _root(self.cfg)
        if self._find(root) is None and self.cfg["download"]:
            import torchvision.datasets

            cls = getattr(torchvision.datasets, self.torchvision_class)
            _torchvision_download(self.name, root, lambda r: cls(r, train=True, download=True))

    def read(self) -> RawSplits:
        root = _root(self.cfg)
        d = self._find(root)
        if d is None:
            tried = ", ".join(str(p) for p in self._candidates(root)) + f", {root / self.archive}"
            raise DataError(
                f"{self.name} not found; tried: {tried}; set data.download=true to fetch it into {root}, "
                f"or set data.root to the folder holding {self.folder}/"
            )

        def read_files(files):
            parts = [cifar_batch_arrays(d / f, self.label_key, self.n_classes) for f in files]
            return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

        train_x, train_y = read_files(self.train_files)
        test_x, test_y = read_files(self.test_files)
        names = cifar_label_names(d / self.meta_file, self.names_key) if (d / self.meta_file).is_file() else None
        if names is not None and len(names) != self.n_classes:
            names = None
        return RawSplits(train_x, train_y, test_x, test_y, self.n_classes, names)


@DATASETS.register("cifar10")
class Cifar10DataModule(_CifarDataModule):
    name, folder, archive = "cifar10", "cifar-10-batches-py", "cifar-10-python.tar.gz"
    train_files, test_files = tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",)
    meta_file, names_key, label_key, n_classes = "batches.meta", "label_names", "labels", 10
    default_mean, default_std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    torchvision_class = "CIFAR10"


@DATASETS.register("cifar100")
class Cifar100DataModule(_CifarDataModule):
    name, folder, archive = "cifar100", "cifar-100-python", "cifar-100-python.tar.gz"
    train_files, test_files = ("train",), ("test",)
    meta_file, names_key, label_key, n_classes = "meta", "fine_label_names", "fine_labels", 100
    default_mean, default_std = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
    torchvision_class = "CIFAR100"


# ---- Fashion-MNIST -------------------------------------------------------------------------------

_FMNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _idx_file(d: Path, stem: str) -> Path | None:
    for p in (d / stem, d / f"{stem}.gz"):
        if p.is_file():
            return p
    return None


@DATASETS.register("fashion_mnist")
class FashionMnistDataModule(TensorDataModule):
    name = "fashion_mnist"
    default_mean = (0.2860,)
    default_std = (0.3530,)

    def _candidates(self) -> list[Path]:
        root = _root(self.cfg)
        return [root / "FashionMNIST" / "raw", root / "fashion-mnist", root] + [
            Path(p) for p in SYSTEM_FASHION_MNIST_DIRS
        ]

    def _find(self) -> dict[str, Path] | None:
        for d in self._candidates():
            files = {k: _idx_file(d, stem) for k, stem in _FMNIST_FILES.items()}
            if all(files.values()):
                return files
        return None

    def prepare_data(self) -> None:
        if self._find() is None and self.cfg["download"]:
            from torchvision.datasets import FashionMNIST

            def fetch(root: str) -> None:
                FashionMNIST(root, train=True, download=True)

            _torchvision_download(self.name, _root(self.cfg), fetch)

    def read(self) -> RawSplits:
        files = self._find()
        if files is None:
            tried = ", ".join(str(p) for p in self._candidates())
            raise DataError(
                f"fashion_mnist not found; tried: {tried}; install it with "
                "`apt-get install dataset-fashion-mnist` or set data.download=true"
            )
        arrays = {k: read_idx(p) for k, p in files.items()}
        out = []
        for split in ("train", "test"):
            images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
            path = files[f"{split}_images"]
            if images.ndim != 3 or images.dtype != np.uint8:
                raise DataError(f"{path}: expected uint8 images (N, H, W), got {images.dtype} {images.shape}")
            if labels.ndim != 1 or len(labels) != len(images):
                raise DataError(f"{path}: {len(images)} images but {files[f'{split}_labels']} has {labels.size} labels")
            out += [images[:, None], labels.astype(np.int64)]
        return RawSplits(*out, num_classes=10, classes=list(FASHION_MNIST_CLASSES))


# ---- synthetic -----------------------------------------------------------------------------------


def _smooth_fields(n: int, channels: int, size: int, g: torch.Generator) -> torch.Tensor:
    """n random smooth images (n, C, size, size), each with zero mean and unit std.

    A coarse and a medium scale of Gaussian noise, bilinearly upsampled: blob-like structure that a
    CNN picks up easily and that pixel noise does not wash out.
    """
    out = torch.zeros(n, channels, size, size)
    for cells, weight in ((max(2, size // 7), 1.0), (max(3, size // 4), 0.6)):
        low = torch.randn(n, channels, cells, cells, generator=g)
        out += weight * F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    out -= out.mean(dim=(1, 2, 3), keepdim=True)
    return out / out.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)


def make_synthetic(
    num_classes: int, channels: int, image_size: int, n: int, noise: float, seed: int, part: str
) -> tuple[np.ndarray, np.ndarray]:
    """A class-conditional texture set: a class-specific grating under a random mask, on a noisy background.

    Class c fixes a grating's orientation (|angle| on a grid in [0, 90] degrees, the sign is random per
    image so horizontal flips keep the class) and spatial frequency (a grid in [0.15, 0.30] cycles per
    pixel); each image jitters both, draws a random phase, shows the grating through a random smooth
    mask and adds a smooth background and pixel noise, both scaled by ``noise``. What identifies the
    class is local and translation invariant, as for natural images. ``seed`` fixes the per-channel
    gains, ``part`` ("train"/"test") seeds the samples. Returns (uint8 (n, C, H, W), int64 labels (n,)).
    """
    n_orient = max(2, math.ceil(math.sqrt(2 * num_classes)))
    n_freq = math.ceil(num_classes / n_orient)
    cls = torch.arange(num_classes)
    angle = (cls % n_orient).double() * (math.pi / 2) / (n_orient - 1)
    freq = 0.15 + (cls // n_orient).double() * (0.15 / max(1, n_freq - 1))
    g = torch.Generator().manual_seed(derive_seed("synthetic-gains", seed, channels))
    gains = (0.6 + 0.8 * torch.rand(channels, generator=g)).view(1, channels, 1, 1)
    g = torch.Generator().manual_seed(derive_seed("synthetic-samples", seed, num_classes, image_size, part))
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]
    coords = torch.arange(image_size, dtype=torch.float64) - (image_size - 1) / 2
    yy, xx = coords.view(1, -1, 1), coords.view(1, 1, -1)
    images = torch.empty(n, channels, image_size, image_size, dtype=torch.uint8)
    chunk = 1024
    for s in range(0, n, chunk):
        y = labels[s : s + chunk]
        m = len(y)
        sign = torch.randint(0, 2, (m,), generator=g).double() * 2 - 1
        a = (sign * (angle[y] + 0.06 * torch.randn(m, generator=g, dtype=torch.float64))).view(m, 1, 1)
        f = (freq[y] * (1 + 0.05 * torch.randn(m, generator=g, dtype=torch.float64))).view(m, 1, 1)
        phase = (2 * math.pi * torch.rand(m, generator=g, dtype=torch.float64)).view(m, 1, 1)
        grating = torch.cos(2 * math.pi * f * (xx * torch.cos(a) + yy * torch.sin(a)) + phase).float()
        mask = torch.sigmoid(2.0 * _smooth_fields(m, 1, image_size, g))
        x = 1.5 * (mask * grating.unsqueeze(1)) * gains
        x += noise * _smooth_fields(m, channels, image_size, g)
        x += 0.5 * noise * torch.randn(x.shape, generator=g)
        images[s : s + m] = (128.0 + 40.0 * x).round_().clamp_(0, 255).to(torch.uint8)
    return images.numpy(), labels.numpy().astype(np.int64)


@DATASETS.register("synthetic")
class SyntheticDataModule(TensorDataModule):
    """Generated in memory; learnable by a small CNN in a few epochs but not at once (noise=1)."""

    name = "synthetic"

    def read(self) -> RawSplits:
        c = self.cfg
        args = (c["num_classes"], c["channels"], c["image_size"])
        train = make_synthetic(*args, c["n_train"], c["noise"], c["data_seed"], "train")
        test = make_synthetic(*args, c["n_test"], c["noise"], c["data_seed"], "test")
        return RawSplits(*train, *test, num_classes=c["num_classes"])

    def stats(self):
        # measured on the training split (deterministic: it depends only on the config)
        x = self.train_images.to(torch.float64) / 255.0
        mean = x.mean(dim=(0, 2, 3))
        std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
        return tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std)

    def identity(self):
        c = self.cfg
        return {**super().identity(), **{k: c[k] for k in ("n_train", "n_test", "noise", "data_seed")}}
