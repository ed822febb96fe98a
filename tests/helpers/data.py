"""Data for the tests: a small in-memory synthetic datamodule, and writers of the real on-disk formats (the CIFAR
pickles as Python 2 wrote them, Fashion-MNIST's IDX files, ImageFolder PNGs and JPEGs) read back through kdlab's
loaders. ``make check-gpu`` (benchmarks/check_gpu.py) writes its CIFAR-100 archive and ImageFolder with them too."""
from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np


def synthetic_datamodule(batch_size: int = 32, seed: int = 0, **data: Any):
    """``build_datamodule({"name": "synthetic", **data}, batch_size, seed)``, loaded (prepare_data and setup
    done); ``data`` are synthetic's keys (n_train, n_test, augment, image_size, ...: kdlab/data/config.py)."""
    from kdlab.data import build_datamodule

    return build_datamodule({"name": "synthetic", **data}, batch_size=batch_size, seed=seed)



class Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 ``str`` opcodes, as the original CIFAR pickles (made by Python 2) hold
    them: loaded with encoding="latin1" they become str keys ('data'), with "bytes" b'data'."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def dump_py2(obj, path: Path) -> None:
    with open(path, "wb") as f:
        Py2Pickler(f, protocol=2).dump(obj)


def write_cifar100(root: Path, n_train=60, n_test=20, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = rng.integers(0, 100, n).tolist()
        dump_py2(
            {
                b"filenames": [f"img_{i}.png".encode() for i in range(n)],
                b"batch_label": f"{split} batch".encode(),
                b"fine_labels": fine,
                b"coarse_labels": [f // 5 for f in fine],
                b"data": data,
            },
            d / split,
        )
        out[split] = (data.reshape(n, 3, 32, 32), np.array(fine))
    dump_py2(
        {
            b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)],
        },
        d / "meta",
    )
    return out


def write_cifar10(root: Path, per_batch=10, seed=1) -> dict:
    """CIFAR-10 written by Python 3 with bytes keys (the other variant found in the wild)."""
    rng = np.random.default_rng(seed)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    xs, ys = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        with open(d / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                         b"filenames": [b"x.png"] * per_batch}, f, protocol=2)
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(np.array(labels))
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)], b"num_vis": 3072}, f, protocol=2)
    return {"train": (np.concatenate(xs[:5]), np.concatenate(ys[:5])), "test": (xs[5], ys[5])}


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def write_fmnist(root: Path, n_train=40, n_test=12, gz=True, seed=2) -> dict:
    rng = np.random.default_rng(seed)
    d = root / "FashionMNIST" / "raw"
    d.mkdir(parents=True)
    ext = ".gz" if gz else ""
    out = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        write_idx(d / f"{prefix}-images-idx3-ubyte{ext}", images)
        write_idx(d / f"{prefix}-labels-idx1-ubyte{ext}", labels)
        out[split] = (images[:, None], labels.astype(np.int64))
    return out


def write_pngs(root: Path, split: str, per_class: dict[str, int], size=(20, 14)) -> None:
    from PIL import Image

    rng = np.random.default_rng(len(split))
    for cls, n in per_class.items():
        d = root / split / cls
        d.mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(d / f"{i}.png")


def write_jpegs(root: Path, split: str, per_class: dict[str, int], size=(40, 30), seed=0) -> None:
    """Class-coloured noisy JPEGs (learnable: each class has its own mean colour), encoded by torchvision, in
    ``root/split/<class>/<i>.jpg``."""
    import torch
    from torchvision.io import encode_jpeg

    g = torch.Generator().manual_seed(seed + len(split))
    for c, (cls, n) in enumerate(per_class.items()):
        d = root / split / cls
        d.mkdir(parents=True)
        base = torch.tensor([(60 + 150 * ((c >> b) & 1)) for b in range(3)], dtype=torch.float32).view(3, 1, 1)
        for i in range(n):
            x = (base + 30 * torch.randn(3, size[1], size[0], generator=g)).clamp(0, 255).to(torch.uint8)
            (d / f"{i}.jpg").write_bytes(encode_jpeg(x, quality=90).numpy().tobytes())
