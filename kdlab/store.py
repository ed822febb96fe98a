"""The content-addressed stage store.

A finished stage lives in ``<store>/<key>/``:

    model.pt    the stage's weights (a plain state_dict, loaded with ``weights_only=True``)
    meta.json   its resolved stage config and metrics
    DONE        the completion marker, written last: JSON with the sha256 of model.pt and meta.json
    work/       Lightning checkpoints while it trains (used to resume after a crash; removed when done)
    cache/      outputs of this stage as a frozen source (logits, features), each with a .sha256 beside it;
                with distill.cache=views: <data key>.views.json (the manifest, written last: the logits'
                codec, shapes, dtypes and sha256 of every array) and <data key>.views.<i>.bin (raw arrays:
                fp16 logits and features, or top-k values, indices and rest; memory-mapped)

Every file is written to a temporary name, fsynced and renamed (then the directory is fsynced), so a
crash leaves either nothing or a whole file; the marker comes last, so a stage is done only when
everything it needs is on disk, and a stage without a marker is simply trained (or resumed) again.
A stage is trained by one process at a time: an OS file lock (``fcntl``), which the kernel releases
if its holder dies, so a killed job never blocks the others.

In a distributed (DDP) run only rank 0 writes: every other rank opens the store read-only
(``writer=False``) and follows rank 0's decisions (:class:`kdlab.ranks.RankSync`); its files are
written and read through :mod:`kdlab.fileio`.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock, Timeout

from kdlab import fileio
from kdlab.errors import ConfigError, StoreError, warn
from kdlab.fileio import load_weights, sha256_file

log = logging.getLogger(__name__)

STORE_SCHEMA = 1
ON_CORRUPT = ("retrain", "fail")
STAGE_FILES = ("model.pt", "meta.json")  # what DONE must vouch for


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)



def stage_key(spec: dict[str, Any]) -> str:
    """The store key of a stage: a hash of everything that determines its weights."""
    return hashlib.sha256(canonical_json({"store_schema": STORE_SCHEMA, **spec}).encode()).hexdigest()[:20]



# -- view caches (distill.cache=views) -----------------------------------------------------------------
VIEW_SCHEMA = 2  # 2: the logits codec (fp16 or top-k), per-array dtypes

#: per-sample layout of a view cache: array name -> (shape of one (image, view) row, numpy dtype name)
Layout = dict[str, tuple[tuple[int, ...], str]]


def view_cache_bytes(n: int, views: int, layout: Layout) -> int:
    """Bytes on disk of ``n`` images x ``views`` views of arrays with this per-row layout."""
    per_view = sum(int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
                   for shape, dtype in layout.values())
    return int(n) * int(views) * per_view


class FullLogits:
    """Every logit, fp16: ``logits`` (C,)."""

    name = "fp16"

    def __init__(self, num_classes: int):
        self.num_classes = int(num_classes)

    def identity(self) -> dict[str, Any]:
        return {"codec": self.name}

    def layout(self) -> Layout:
        return {"logits": ((self.num_classes,), "float16")}

    def encode(self, logits: torch.Tensor) -> dict[str, np.ndarray]:
        return {"logits": logits.half().cpu().numpy()}

    def decode(self, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        return rows["logits"]


class TopKLogits:
    """The k largest logits of each view (fp16 values, int16 / int32 class indices) and one ``rest`` logit (fp16)
    that every other class gets: ``z_rest = log(mean_{j not in top-k} exp(z_j))``.

    Decoded, ``softmax(z_hat)`` keeps the top-k probabilities and the rest of the mass ``m = 1 - sum(top-k)``
    exactly (at temperature 1, up to fp16 rounding) and spreads m uniformly over the C - k other classes (as FKD
    does with its stored soft labels). Its error: the other classes' distribution is replaced by the uniform
    one, so ``||p_hat - p||_1 <= 2 m`` and ``KL(p || p_hat) <= m log(C - k)``; at a temperature T > 1 the others'
    tempered mass is over-estimated (Jensen: mean exp(z/T) <= exp(z_rest / T)). docs/store.md."""

    name = "topk"

    def __init__(self, num_classes: int, k: int):
        self.num_classes, self.k = int(num_classes), int(k)
        self.index_dtype = "int16" if self.num_classes <= np.iinfo(np.int16).max + 1 else "int32"

    def identity(self) -> dict[str, Any]:
        return {"codec": self.name, "k": self.k}

    def layout(self) -> Layout:
        return {"logits/topk_values": ((self.k,), "float16"), "logits/topk_indices": ((self.k,), self.index_dtype),
                "logits/rest": ((), "float16")}

    def encode(self, logits: torch.Tensor) -> dict[str, np.ndarray]:
        z = logits.float()
        values, indices = z.topk(self.k, dim=1)
        others = z.scatter(1, indices, float("-inf"))  # the top k masked out
        rest = torch.logsumexp(others, dim=1) - math.log(self.num_classes - self.k)
        return {"logits/topk_values": values.half().cpu().numpy(),
                "logits/topk_indices": indices.to(getattr(torch, self.index_dtype)).cpu().numpy(),
                "logits/rest": rest.half().cpu().numpy()}

    def decode(self, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        rest = rows["logits/rest"]
        z = rest.view(-1, 1).expand(rest.shape[0], self.num_classes).clone()
        return z.scatter_(1, rows["logits/topk_indices"].long(), rows["logits/topk_values"])


LOGIT_CODECS = {"fp16": FullLogits, "topk": TopKLogits}


def logit_codec(num_classes: int, topk: int | None) -> FullLogits | TopKLogits:
    """The codec of ``distill.view_topk`` (None: every logit, fp16)."""
    return FullLogits(num_classes) if topk is None else TopKLogits(num_classes, topk)


def codec_from(identity: dict[str, Any], num_classes: int) -> FullLogits | TopKLogits:
    cls = LOGIT_CODECS[identity["codec"]]
    return cls(num_classes, **{k: v for k, v in identity.items() if k != "codec"})


class ViewCache:
    """A frozen source's outputs for every (training image, view), memory-mapped from disk (RAM holds only the
    pages a lookup touches): arrays of shape (N, V, ...), the logits as its ``codec`` stores them (every logit
    fp16, or the top k and the rest) and ``features/<tap>`` fp16.

    ``lookup(idx, views)`` returns the rows of a batch: image ``idx[b]`` under view ``views[b]``
    (:class:`kdlab.data.augment.ViewSpace` ids), logits decoded to (B, C) fp16."""

    def __init__(self, n: int, views: int, arrays: dict[str, np.ndarray], codec: FullLogits | TopKLogits,
                 temp_dir: Path | None = None):
        self.n, self.views, self.arrays, self.codec = int(n), int(views), arrays, codec
        self._temp_dir = temp_dir  # a private copy (a read-only store): removed by close()

    @property
    def taps(self) -> list[str]:
        return [k.split("/", 1)[1] for k in self.arrays if k.startswith("features/")]

    def lookup(self, idx: torch.Tensor, views: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        i = idx.detach().to("cpu", torch.int64).numpy()
        v = views.detach().to("cpu", torch.int64).numpy()
        rows = {k: torch.from_numpy(np.ascontiguousarray(a[i, v])) for k, a in self.arrays.items()}
        feats = {k.split("/", 1)[1]: t for k, t in rows.items() if k.startswith("features/")}
        return self.codec.decode(rows), feats

    def close(self) -> None:
        self.arrays = {}
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None


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
    def lock(self, key: str, label: str = "") -> Iterator[None]:
        """Hold the stage's lock; waits (with a message) while another process trains the stage.

        The lock is ``fcntl``-based: the kernel drops it when its holder exits, however it dies. A
        read-only store (the non-zero ranks of a DDP run) takes no lock: rank 0 holds it for them.
        """
        if not self.writer:
            yield
            return
        lock = FileLock(str(self.root / f"{key}.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log.info("waiting for stage %s (%s): another process is training it", label or key, key)
            try:
                lock.acquire(timeout=self.lock_timeout)
            except Timeout as e:
                raise StoreError(f"timed out waiting for the lock of stage {label or key} ({key})") from e
        except OSError as e:
            raise StoreError(f"cannot lock stage {label or key} in {str(self.root)!r}: {e.strerror or e}") from e
        try:
            yield
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
        problem, arrays, n, views, codec = None, {}, 0, 0, None
        try:
            m = json.loads(manifest.read_text())
            n, views = int(m["n"]), int(m["views"])
            codec = codec_from(m.get("logits") or {"codec": "fp16"}, int(m["num_classes"]))
            for name, entry in m["arrays"].items():
                path = manifest.parent / entry["file"]
                layout = {name: (tuple(int(d) for d in entry["shape"]), str(entry.get("dtype", "float16")))}
                if path.stat().st_size != view_cache_bytes(n, views, layout):
                    problem = f"{path.name} has the wrong size"
                elif sha256_file(path) != entry["sha256"]:
                    problem = f"{path.name} fails its checksum"
                if problem:
                    break
                arrays[name] = np.memmap(path, dtype=layout[name][1], mode="r", shape=(n, views, *layout[name][0]))
            if problem is None and set(codec.layout()) - set(arrays):
                problem = f"the manifest lacks the {codec.name} logits"
        except (OSError, ValueError, KeyError, TypeError) as e:
            problem = f"unreadable ({type(e).__name__}: {e})"
        if problem is None:
            return ViewCache(n, views, arrays, codec)
        if self.writer:
            warn(f"view cache {manifest}: {problem}; recomputing it")
            self._drop_view_cache(key, data_key)
        return None

    def _drop_view_cache(self, key: str, data_key: str) -> None:
        self.view_manifest(key, data_key).unlink(missing_ok=True)
        for f in self.cache_dir(key).glob(f"{data_key}.views.*.bin"):
            f.unlink(missing_ok=True)

    def write_view_cache(self, key: str, data_key: str, n: int, views: int, codec: FullLogits | TopKLogits,
                         features: Layout, fill: Any) -> ViewCache:
        """Allocate the arrays (n * views, *shape) on disk (the codec's logits, then the ``features`` layout),
        let ``fill(arrays)`` write them (in place, through memory maps), then checksum them, move them into
        place and write the manifest last.

        A read-only store (a DDP rank other than 0 that found no stored cache) writes into a private temporary
        directory instead, removed when the cache is closed. A failed write (a full disk) leaves no manifest:
        a StoreError."""
        temp_dir = None
        if self.writer:
            final_dir = self.cache_dir(key)
            work = final_dir / f".{data_key}.views.tmp-{os.getpid()}"
        else:
            final_dir = work = temp_dir = Path(tempfile.mkdtemp(prefix="kdlab-views-"))
        layout = {**codec.layout(), **features}
        names = list(layout)
        files = {name: f"{data_key}.views.{i}.bin" for i, name in enumerate(names)}
        try:
            work.mkdir(parents=True, exist_ok=True)
            arrays = {name: np.memmap(work / files[name], dtype=layout[name][1], mode="w+",
                                      shape=(n * views, *layout[name][0])) for name in names}
            fill(arrays)
            entries = {}
            for name, a in arrays.items():
                a.flush()
                path = work / files[name]
                with open(path, "rb+") as f:
                    os.fsync(f.fileno())
                entries[name] = {"file": files[name], "shape": list(layout[name][0]), "dtype": layout[name][1],
                                 "sha256": sha256_file(path)}
            del arrays
            if work != final_dir:
                for name in names:
                    os.replace(work / files[name], final_dir / files[name])
                shutil.rmtree(work, ignore_errors=True)
            if self.writer:
                fileio.atomic_write_json(self.view_manifest(key, data_key),
                                         {"schema": VIEW_SCHEMA, "n": n, "views": views,
                                          "num_classes": codec.num_classes, "logits": codec.identity(),
                                          "arrays": entries})
        except BaseException as e:
            shutil.rmtree(work, ignore_errors=True)
            if isinstance(e, OSError):
                raise StoreError(f"cannot write the view cache of stage {key} to {str(final_dir)!r}: "
                                 f"{e.strerror or e}") from e
            raise
        return ViewCache(n, views, {name: np.memmap(final_dir / files[name], dtype=layout[name][1], mode="r",
                                                    shape=(n, views, *layout[name][0])) for name in names},
                         codec, temp_dir=temp_dir)

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

