"""Readers for the on-disk formats: IDX (MNIST family) and the CIFAR python pickles.

Both decode straight into numpy uint8 arrays in (N, C, H, W) layout. The CIFAR pickles are read with a
restricted unpickler that only rebuilds numpy arrays and builtins, never arbitrary objects.
"""
from __future__ import annotations

import gzip
import io
import pickle
import struct
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from kdlab.errors import DataError

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """Parse an IDX file (optionally gzipped) into a numpy array of its declared shape."""
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated (IDX header)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"{path} holds {len(raw) - header} data bytes but its header {tuple(dims)} needs {expected}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


# what a truncated, corrupt or foreign pickle can raise while loading
_UNPICKLE_ERRORS = (
    pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError,
    KeyError, struct.error,
)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only (the CIFAR batches hold nothing else)."""

    _ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
        ("__builtin__", "object"),
        ("builtins", "object"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


def _str_keys(d: Any, path: Path) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise DataError(f"{path} does not hold a CIFAR batch dictionary (got {type(d).__name__})")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in d.items()}


def load_cifar_pickle(path: str | Path) -> dict[str, Any]:
    """One CIFAR python batch as a dict with str keys (the originals are Python 2 pickles)."""
    path = Path(path)
    try:
        data = path.read_bytes()
        obj = _ArrayUnpickler(io.BytesIO(data), encoding="latin1").load()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from None
    except _UNPICKLE_ERRORS as e:  # any of these means a corrupt or foreign file
        raise DataError(f"{path} is not a readable CIFAR batch: {type(e).__name__}: {e}") from None
    return _str_keys(obj, path)


def cifar_batch_arrays(path: str | Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 3, 32, 32), labels int64 (N,)) of one CIFAR batch file, validated."""
    path = Path(path)
    d = load_cifar_pickle(path)
    if "data" not in d or label_key not in d:
        raise DataError(f"{path} lacks the 'data' or {label_key!r} entry (keys: {', '.join(sorted(d))})")
    data = np.asarray(d["data"])
    labels = np.asarray(d[label_key])
    if labels.size == 0:  # an empty list has no integer dtype; emptiness is reported by the caller
        labels = labels.astype(np.int64)
    if data.dtype != np.uint8:
        raise DataError(f"{path}: 'data' has dtype {data.dtype}, expected uint8")
    if data.ndim == 2 and data.shape[1] == 3 * 32 * 32:
        images = data.reshape(-1, 3, 32, 32)
    elif data.ndim == 4 and data.shape[1:] == (3, 32, 32):
        images = data
    else:
        raise DataError(
            f"{path}: 'data' has shape {tuple(data.shape)}, expected (N, 3072) rows of 3x32x32 images"
        )
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{path}: {len(images)} images but {labels.size} labels")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: {label_key!r} are not integers")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"{path}: label {int(labels.min() if labels.min() < 0 else labels.max())} "
            f"outside [0, {num_classes})"
        )
    return np.ascontiguousarray(images), labels.astype(np.int64)


def cifar_label_names(path: str | Path, key: str) -> list[str] | None:
    """Class names from a CIFAR meta file, or None when absent/unreadable (they are cosmetic)."""
    try:
        names = load_cifar_pickle(path).get(key)
    except DataError:
        return None
    if names is None:
        return None
    return [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]
