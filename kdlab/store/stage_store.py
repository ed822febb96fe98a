"""The content-addressed stage store.

A finished stage lives in ``<store>/<key>/``:

    model.pt    the stage's weights (a plain state_dict, loaded with ``weights_only=True``)
    meta.json   its resolved stage config and metrics
    DONE        the completion marker, written last: JSON with the sha256 of model.pt and meta.json
    work/       Lightning checkpoints while it trains (used to resume after a crash; removed when done)
    cache/      outputs of this stage as a frozen source (logits, features), each with a .sha256 beside it;
                test.pt (+ test.sha256): its logits and labels on the test split, kept from the test pass that
                measured its reported test_acc (fidelity and calibration read them instead of running it);
                with distill.cache=views: <data key>.views.json (the manifest, written last: the logits'
                codec, shapes, dtypes and sha256 of every array) and <data key>.views.<i>.bin (raw arrays:
                fp16 logits and features, or top-k values, indices and rest; memory-mapped)

Every file is written to a temporary name, fsynced and renamed (then the directory is fsynced), so a
crash leaves either nothing or a whole file; the marker comes last, so a stage is done only when
everything it needs is on disk, and a stage without a marker is simply trained (or resumed) again.
A stage is trained by one process at a time: an OS file lock (``fcntl``), which the kernel releases
if its holder dies, so a killed job never blocks the others.

In a distributed (DDP) run only rank 0 writes: every other rank opens the store read-only
(``writer=False``) and follows rank 0's decisions (:class:`kdlab.store.ranks.RankSync`); its files are
written and read through :mod:`kdlab.store.fileio`.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout

from kdlab.errors import ConfigError, StoreError, warn
from kdlab.store import fileio
from kdlab.store.fileio import load_weights, sha256_file
from kdlab.store.view_cache import Layout, LogitCodec, ViewCache, read_view_cache, write_view_cache

log = logging.getLogger(__name__)

STORE_SCHEMA = 1
ON_CORRUPT = ("retrain", "fail")
STAGE_FILES = ("model.pt", "meta.json")  # what DONE must vouch for
TEST_OUTPUTS = "test"  # cache/test.pt: a stage's test-split outputs (a cache: its own checksum, not in DONE)


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)



def stage_key(spec: dict[str, Any]) -> str:
    """The store key of a stage: a hash of everything that determines its weights."""
    return hashlib.sha256(canonical_json({"store_schema": STORE_SCHEMA, **spec}).encode()).hexdigest()[:20]



# -- the store -----------------------------------------------------------------------------------------
@dataclass
class StageRecord:
    key: str
    dir: Path
    meta: dict[str, Any]

    @property
    def weights_path(self) -> Path:
        return self.dir / "model.pt"

    def state_dict(self) -> dict[str, torch.Tensor]:
        return load_weights(self.weights_path, "stored weights", error=StoreError)



@dataclass
class LockWait:
    """Seconds a process waited for a stage's lock while another process held it (0.0: it was free)."""

    seconds: float = 0.0


class StageStore:
    def __init__(self, root: str | os.PathLike, on_corrupt: str = "retrain", lock_timeout: float = -1,
                 writer: bool = True):
        if on_corrupt not in ON_CORRUPT:
            raise ConfigError(f"unknown store.on_corrupt {on_corrupt!r}; known: {', '.join(ON_CORRUPT)}")
        self.root = Path(root)
        self.on_corrupt = on_corrupt
        self.lock_timeout = lock_timeout
        self.writer = writer
        if not writer:
            return
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create store directory {str(self.root)!r}: {e.strerror or e} "
                             f"(set paths.store_dir)") from e
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
    def lock(self, key: str, label: str = "") -> Iterator[LockWait]:
        """Hold the stage's lock; waits (with a message) while another process trains the stage. Yields how
        long this process waited for it (:class:`LockWait`: 0.0 when the lock was free), which the runner
        records per stage (``lock_wait_seconds`` in results.json).

        The lock is ``fcntl``-based: the kernel drops it when its holder exits, however it dies. A
        read-only store (the non-zero ranks of a DDP run) takes no lock: rank 0 holds it for them.
        """
        waited = LockWait()
        if not self.writer:
            yield waited
            return
        lock = FileLock(str(self.root / f"{key}.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log.info("waiting for stage %s (%s): another process is training it", label or key, key)
            t0 = time.perf_counter()
            try:
                lock.acquire(timeout=self.lock_timeout)
            except Timeout as e:
                raise StoreError(f"timed out waiting for the lock of stage {label or key} ({key})") from e
            finally:
                waited.seconds = time.perf_counter() - t0
            log.info("waited %.1f s for stage %s (%s)", waited.seconds, label or key, key)
        except OSError as e:
            raise StoreError(f"cannot lock stage {label or key} in {str(self.root)!r}: {e.strerror or e}") from e
        try:
            yield waited
        finally:
            lock.release()

    # -- reading ------------------------------------------------------------------------------------
    def lookup(self, key: str, label: str = "") -> StageRecord | None:
        """The finished stage, or None. A damaged one is never used: it is quarantined and reported as
        missing (so it is retrained, with a warning), or, with on_corrupt=fail, a StoreError."""
        d = self.stage_dir(key)
        if not (d / "DONE").exists():
            return None
        problem = self._verify(d)
        if problem is None:
            if self.writer and (d / "work").exists():  # killed between the marker and the clean-up
                shutil.rmtree(d / "work", ignore_errors=True)
            return StageRecord(key, d, json.loads((d / "meta.json").read_text()))
        message = f"stored stage {label or key} ({d}) is corrupted: {problem}"
        if self.on_corrupt == "fail":
            raise StoreError(message + "; remove it or set store.on_corrupt=retrain")
        if self.writer:
            warn(f"{message}; moved aside and retraining it")
            self.quarantine(key)
        return None

    def read(self, key: str, label: str = "") -> StageRecord:
        """A stage another process (rank 0) found or made complete: read without verifying again."""
        d = self.stage_dir(key)
        try:
            return StageRecord(key, d, json.loads((d / "meta.json").read_text()))
        except (OSError, ValueError) as e:
            raise StoreError(f"stage {label or key} is not in the store {str(self.root)!r}: {e}") from e

    def _verify(self, d: Path) -> str | None:
        try:
            marker = json.loads((d / "DONE").read_text())
            sums = marker["sha256"]
            if not isinstance(sums, dict):
                raise TypeError("sha256 is not a mapping")
        except (OSError, ValueError, KeyError, TypeError) as e:
            return f"unreadable completion marker DONE ({type(e).__name__}: {e})"
        for name in STAGE_FILES:
            if name not in sums:
                return f"the completion marker DONE has no checksum for {name}"
        for name, digest in sums.items():
            path = d / name
            try:
                if sha256_file(path) != digest:
                    return f"{name} fails its checksum"
            except FileNotFoundError:
                return f"{name} is missing"
            except OSError as e:
                return f"{name} is unreadable ({e.strerror or e})"
        try:
            if not isinstance(json.loads((d / "meta.json").read_text()), dict):
                return "meta.json is not a JSON object"
        except ValueError as e:
            return f"meta.json is not valid JSON ({e})"
        return None

    def quarantine(self, key: str) -> Path | None:
        """Move a damaged stage aside (``<key>.corrupt-<time>``) for inspection; it no longer counts."""
        d = self.stage_dir(key)
        target = self.root / f"{key}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        try:
            os.replace(d, target)
            return target
        except OSError:
            shutil.rmtree(d, ignore_errors=True)
            return None

    # -- writing ------------------------------------------------------------------------------------
    def commit(self, key: str, state_dict: dict[str, torch.Tensor], meta: dict[str, Any]) -> StageRecord:
        """Store a finished stage: weights, then metadata, each atomically; then the completion marker.

        A crash (or a full disk) before the marker leaves the stage not done; it is trained again (or
        resumed from ``work/``) by the next run. A read-only store writes nothing (rank 0 commits).
        """
        d = self.stage_dir(key)
        if not self.writer:
            return StageRecord(key, d, meta)
        try:
            d.mkdir(parents=True, exist_ok=True)
            (d / "DONE").unlink(missing_ok=True)
            weights = fileio.state_dict_bytes(state_dict)
            meta_bytes = (json.dumps(meta, indent=2, default=str) + "\n").encode()
            fileio.atomic_write_bytes(d / "model.pt", weights)
            fileio.atomic_write_bytes(d / "meta.json", meta_bytes)
            sums = {"model.pt": hashlib.sha256(weights).hexdigest(),
                    "meta.json": hashlib.sha256(meta_bytes).hexdigest()}
            fileio.atomic_write_json(d / "DONE", {"sha256": sums, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
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
        """A source-output cache, or None if absent or damaged (then it is recomputed)."""
        path = self.cache_path(key, data_key)
        sums = path.with_suffix(".sha256")
        try:
            if not path.exists() or not sums.exists():
                return None
            ok = sha256_file(path) == sums.read_text().strip()
        except OSError:
            ok = False
        if ok:
            try:
                return load_weights(path, "source-output cache", error=StoreError)
            except StoreError:
                ok = False
        if self.writer:
            warn(f"source-output cache {path} fails its checksum or cannot be read; recomputing it")
            path.unlink(missing_ok=True)
            sums.unlink(missing_ok=True)
        return None

    def load_test_outputs(self, key: str) -> dict[str, Any] | None:
        """The stage's test-split outputs (``{"logits": (N, K) fp16, "labels": (N,)}``), or None if absent or damaged.

        A cache file beside the stage, not in its DONE marker: the stage's key fixes its data, so one file per
        stage; one added later (by a run of a newer kdlab, for a stage an older one stored) leaves ``lookup``
        as it was, and a damaged one is dropped and computed again from the weights."""
        return self.load_cache(key, TEST_OUTPUTS)

    def save_test_outputs(self, key: str, outputs: dict[str, Any]) -> None:
        self.save_cache(key, TEST_OUTPUTS, outputs)

    def view_manifest(self, key: str, data_key: str) -> Path:
        return self.cache_dir(key) / f"{data_key}.views.json"

    def has_view_cache(self, key: str, data_key: str) -> bool:
        return self.view_manifest(key, data_key).exists()

    def load_view_cache(self, key: str, data_key: str) -> ViewCache | None:
        """A stored view cache, memory-mapped read-only, or None if absent or damaged (then it is recomputed:
        a writer removes the damaged files). Every array is checked against its size and sha256 in the manifest."""
        manifest = self.view_manifest(key, data_key)
        if not manifest.exists():
            return None
        cache, problem = read_view_cache(manifest)
        if cache is not None:
            return cache
        if self.writer:
            warn(f"view cache {manifest}: {problem}; recomputing it")
            self._drop_view_cache(key, data_key)
        return None

    def _drop_view_cache(self, key: str, data_key: str) -> None:
        self.view_manifest(key, data_key).unlink(missing_ok=True)
        for f in self.cache_dir(key).glob(f"{data_key}.views.*.bin"):
            f.unlink(missing_ok=True)

    def write_view_cache(self, key: str, data_key: str, n: int, views: int, codec: LogitCodec,
                         features: Layout, fill: Any) -> ViewCache:
        """Allocate the arrays (n * views, *shape) on disk (the codec's logits, then the ``features`` layout),
        let ``fill(arrays)`` write them (in place, through memory maps), then checksum them, move them into
        place and write the manifest last (:func:`kdlab.store.view_cache.write_view_cache`).

        A read-only store (a DDP rank other than 0 that found no stored cache) writes into a private temporary
        directory instead, removed when the cache is closed. A failed write (a full disk) leaves no manifest:
        a StoreError."""
        if self.writer:
            final_dir, temp_dir = self.cache_dir(key), None
            work = final_dir / f".{data_key}.views.tmp-{os.getpid()}"
            manifest = self.view_manifest(key, data_key)
        else:  # no manifest: the copy is this process's alone
            final_dir = work = temp_dir = Path(tempfile.mkdtemp(prefix="kdlab-views-"))
            manifest = None
        try:
            return write_view_cache(final_dir, work, manifest, data_key, n, views, codec, features, fill, temp_dir)
        except OSError as e:
            raise StoreError(f"cannot write the view cache of stage {key} to {str(final_dir)!r}: "
                             f"{e.strerror or e}") from e

    def save_cache(self, key: str, data_key: str, payload: dict[str, Any]) -> None:
        if not self.writer:
            return
        path = self.cache_path(key, data_key)
        buf = io.BytesIO()
        torch.save(payload, buf)
        data = buf.getvalue()
        try:
            fileio.atomic_write_bytes(path, data)
            fileio.atomic_write_bytes(path.with_suffix(".sha256"), hashlib.sha256(data).hexdigest().encode())
        except OSError as e:  # a cache is an optimization: without it the sources run live next time
            warn(f"cannot write source-output cache {path}: {e.strerror or e}")

