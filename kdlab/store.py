"""The content-addressed stage store.

A finished stage lives in ``<store>/<key>/``:

    model.pt    the stage's weights (a plain state_dict, loaded with ``weights_only=True``)
    meta.json   its resolved stage config and metrics
    DONE        the completion marker, written last: JSON with the sha256 of model.pt and meta.json
    work/       Lightning checkpoints while it trains (used to resume after a crash; removed when done)
    cache/      outputs of this stage as a frozen source (logits, features) for a given data set

Every file is written to a temporary name, fsynced and renamed, so a crash leaves either nothing or a
whole file; the marker comes last, so a stage is done only when everything it needs is on disk. A stage
is trained by one process at a time (an OS file lock, released by the kernel if its holder dies).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout

from kdlab.errors import ConfigError, StoreError

log = logging.getLogger(__name__)

STORE_SCHEMA = 1
ON_CORRUPT = ("retrain", "fail")


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def stage_key(spec: dict[str, Any]) -> str:
    """The store key of a stage: a hash of everything that determines its weights."""
    return hashlib.sha256(canonical_json({"store_schema": STORE_SCHEMA, **spec}).encode()).hexdigest()[:20]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file, fsync and rename (plus a directory fsync)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:  # some file systems do not support directory fsync
        pass


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=str) + "\n").encode())


def save_state_dict(path: Path, state_dict: dict[str, torch.Tensor]) -> None:
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_weights(path: str | os.PathLike, what: str = "checkpoint") -> Any:
    """Load a tensor file safely: ``weights_only=True`` refuses pickles that would run code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise ConfigError(f"{what} {str(path)!r} does not exist") from e
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError, ...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"refusing to load {what} {str(path)!r}: not a plain weights file "
                          f"(weights_only=True rejected it: {reason[:200]})") from e


@dataclass
class StageRecord:
    key: str
    dir: Path
    meta: dict[str, Any]

    @property
    def weights_path(self) -> Path:
        return self.dir / "model.pt"

    def state_dict(self) -> dict[str, torch.Tensor]:
        return load_weights(self.weights_path, "stored weights")


class StageStore:
    def __init__(self, root: str | os.PathLike, on_corrupt: str = "retrain", lock_timeout: float = -1):
        if on_corrupt not in ON_CORRUPT:
            raise ConfigError(f"unknown store.on_corrupt {on_corrupt!r}; known: {', '.join(ON_CORRUPT)}")
        self.root = Path(root)
        self.on_corrupt = on_corrupt
        self.lock_timeout = lock_timeout
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create store directory {str(self.root)!r}: {e.strerror or e}") from e
        if not os.access(self.root, os.W_OK):
            raise StoreError(f"store directory {str(self.root)!r} is not writable (set paths.store_dir)")

    def stage_dir(self, key: str) -> Path:
        return self.root / key

    def work_dir(self, key: str) -> Path:
        return self.stage_dir(key) / "work"

    def cache_dir(self, key: str) -> Path:
        return self.stage_dir(key) / "cache"

    # -- locking ------------------------------------------------------------------------------------
    @contextmanager
    def lock(self, key: str, label: str = "") -> Iterator[None]:
        """Hold the stage's lock; waits (with a message) while another process trains the stage."""
        lock = FileLock(str(self.root / f"{key}.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log.info("waiting for stage %s (%s): another process is training it", label or key, key)
            try:
                lock.acquire(timeout=self.lock_timeout)
            except Timeout as e:
                raise StoreError(f"timed out waiting for the lock of stage {label or key} ({key})") from e
        try:
            yield
        finally:
            lock.release()

    # -- reading ------------------------------------------------------------------------------------
    def lookup(self, key: str, label: str = "") -> StageRecord | None:
        """The finished stage, or None. A damaged one is quarantined (or, with on_corrupt=fail, an error)."""
        d = self.stage_dir(key)
        marker = d / "DONE"
        if not marker.exists():
            return None
        problem = self._verify(d)
        if problem is None:
            return StageRecord(key, d, json.loads((d / "meta.json").read_text()))
        message = f"stored stage {label or key} ({d}) is corrupted: {problem}"
        if self.on_corrupt == "fail":
            raise StoreError(message + "; remove it or set store.on_corrupt=retrain")
        log.warning("%s; retraining it", message)
        self.quarantine(key)
        return None

    def _verify(self, d: Path) -> str | None:
        try:
            marker = json.loads((d / "DONE").read_text())
        except (OSError, ValueError) as e:
            return f"unreadable completion marker ({e})"
        for name, digest in marker.get("sha256", {}).items():
            path = d / name
            if not path.exists():
                return f"{name} is missing"
            if sha256_file(path) != digest:
                return f"{name} fails its checksum"
        return None

    def quarantine(self, key: str) -> None:
        d = self.stage_dir(key)
        target = self.root / f"{key}.corrupt-{int(time.time())}"
        try:
            os.replace(d, target)
        except OSError:
            shutil.rmtree(d, ignore_errors=True)

    # -- writing ------------------------------------------------------------------------------------
    def commit(self, key: str, state_dict: dict[str, torch.Tensor], meta: dict[str, Any]) -> StageRecord:
        """Store a finished stage: weights, then metadata, then the completion marker."""
        d = self.stage_dir(key)
        try:
            d.mkdir(parents=True, exist_ok=True)
            (d / "DONE").unlink(missing_ok=True)
            save_state_dict(d / "model.pt", state_dict)
            atomic_write_json(d / "meta.json", meta)
            files = ("model.pt", "meta.json")
            atomic_write_json(d / "DONE", {"sha256": {f: sha256_file(d / f) for f in files},
                                           "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
        except OSError as e:
            (d / "DONE").unlink(missing_ok=True)
            raise StoreError(f"cannot write stage {meta.get('name', key)} to {str(d)!r}: "
                             f"{e.strerror or e}") from e
        shutil.rmtree(d / "work", ignore_errors=True)
        return StageRecord(key, d, meta)

    # -- source-output caches -----------------------------------------------------------------------
    def cache_path(self, key: str, data_key: str) -> Path:
        return self.cache_dir(key) / f"{data_key}.pt"

    def load_cache(self, key: str, data_key: str) -> dict[str, Any] | None:
        path = self.cache_path(key, data_key)
        sums = path.with_suffix(".sha256")
        if not path.exists() or not sums.exists():
            return None
        if sha256_file(path) != sums.read_text().strip():
            log.warning("source-output cache %s fails its checksum; recomputing it", path)
            path.unlink(missing_ok=True)
            return None
        return load_weights(path, "source-output cache")

    def save_cache(self, key: str, data_key: str, payload: dict[str, Any]) -> None:
        path = self.cache_path(key, data_key)
        buf = io.BytesIO()
        torch.save(payload, buf)
        atomic_write_bytes(path, buf.getvalue())
        atomic_write_bytes(path.with_suffix(".sha256"), sha256_file(path).encode())
