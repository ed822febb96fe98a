"""The content-addressed stage store.

A finished stage lives in ``<store>/<key>/``:

    model.pt    the stage's weights (a plain state_dict, loaded with ``weights_only=True``)
    meta.json   its resolved stage config and metrics
    DONE        the completion marker, written last: JSON with the sha256 of model.pt and meta.json
    work/       Lightning checkpoints while it trains (used to resume after a crash; removed when done)
    cache/      outputs of this stage as a frozen source (logits, features), each with a .sha256 beside it

Every file is written to a temporary name, fsynced and renamed (then the directory is fsynced), so a
crash leaves either nothing or a whole file; the marker comes last, so a stage is done only when
everything it needs is on disk, and a stage without a marker is simply trained (or resumed) again.
A stage is trained by one process at a time: an OS file lock (``fcntl``), which the kernel releases
if its holder dies, so a killed job never blocks the others.

In a distributed (DDP) run only rank 0 writes: every other rank opens the store read-only
(``writer=False``) and follows rank 0's decisions (:class:`RankSync`).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout

from kdlab.errors import ConfigError, KdlabError, StoreError, warn

log = logging.getLogger(__name__)

STORE_SCHEMA = 1
ON_CORRUPT = ("retrain", "fail")
STAGE_FILES = ("model.pt", "meta.json")  # what DONE must vouch for


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


def _fsync_dir(path: Path) -> None:
    try:
        dir_fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:  # some file systems do not support directory fsync
        pass


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
    _fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=str) + "\n").encode())


def state_dict_bytes(state_dict: dict[str, torch.Tensor]) -> bytes:
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, buf)
    return buf.getvalue()


def save_state_dict(path: Path, state_dict: dict[str, torch.Tensor]) -> None:
    atomic_write_bytes(path, state_dict_bytes(state_dict))


def _load_failure(e: BaseException, path: str | os.PathLike) -> tuple[bool, str]:
    """(whether the file carries code, a short reason) for an exception of ``torch.load(weights_only=True)``."""
    text = str(e)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return True, f"it holds a pickled reference to {found.group(1)}, which could run code"
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        head = b""
    if not head.startswith((b"PK", b"\x80")):  # neither torch.save's zip format nor a (legacy) pickle
        return False, "it is not a PyTorch weights file"
    truncated = r"zip archive|central directory|EOF|truncated|file not found in archive"
    if isinstance(e, EOFError) or re.search(truncated, text, re.IGNORECASE):
        return False, "it is truncated or not a PyTorch file"
    if "Unsupported operand" in text or "invalid load key" in text or "could not find MARK" in text:
        return False, "it is not a PyTorch weights file"
    first = next((ln.strip() for ln in text.splitlines() if ln.strip() and "weights_only" not in ln
                  and "PyTorch 2.6" not in ln), type(e).__name__)
    return False, f"it is not a plain weights file ({first[:160]})"


def load_weights(path: str | os.PathLike, what: str = "checkpoint",
                 error: type[KdlabError] = ConfigError) -> Any:
    """Load a tensor file safely: ``weights_only=True`` refuses pickles that would run code.

    Failures raise ``error`` (a ConfigError, exit 2, for files the user hands over; a StoreError, exit 1,
    for the store's own files) with one line saying why; a pickled payload is never executed.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise error(f"{what} {str(path)!r} does not exist") from e
    except IsADirectoryError as e:
        raise error(f"{what} {str(path)!r} is a directory, not a weights file") from e
    except Exception as e:
        code, reason = _load_failure(e, path)
        verb = "refusing to load" if code else "cannot load"
        raise error(f"{verb} {what} {str(path)!r}: {reason}; only plain weights (tensors in dicts) are "
                    f"accepted (torch.load weights_only=True)") from e


# -- distributed runs ----------------------------------------------------------------------------------
def is_rank_zero() -> bool:
    """False in the non-zero ranks of a distributed run (known from the environment before Lightning sets
    up the process group: torchrun's RANK, Lightning's LOCAL_RANK/NODE_RANK, SLURM's SLURM_PROCID)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    env = os.environ
    if any(env.get(var, "0").strip() not in ("", "0") for var in ("RANK", "LOCAL_RANK", "NODE_RANK")):
        return False
    try:
        slurm_tasks = int(env.get("SLURM_NTASKS", "1") or 1)
    except ValueError:
        slurm_tasks = 1
    return not (slurm_tasks > 1 and env.get("SLURM_PROCID", "0") not in ("", "0"))


class RankSync:
    """Makes every rank of a DDP run take rank 0's decision for each stage: reuse it, or train it (and
    whether to resume). All ranks walk the same stages and must train the same ones together.

    Rank 0 decides under the store lock and shares the decision through torch.distributed once a process
    group exists (after the first trained stage). Lightning's launcher starts the other ranks at rank 0's
    first trained stage; they inherit that decision through the environment and know that every stage
    before it was reused. A rank with neither (started externally, e.g. by torchrun or srun, before the
    first trained stage) looks the store up read-only. Ranks started by rank 0 stop when rank 0 exits.
    """

    ENV = "KDLAB_DDP_PLAN"
    LEADER = "KDLAB_DDP_LEADER_PID"

    def __init__(self) -> None:
        self.leader = is_rank_zero()
        if not self.leader and os.environ.get(self.LEADER):
            start_leader_watchdog(int(os.environ[self.LEADER]))

    @staticmethod
    def _group() -> bool:
        import torch.distributed as dist

        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def share(self, plan: dict[str, Any]) -> dict[str, Any]:
        """Rank 0: publish this stage's plan ({key, train, resume})."""
        if self._group():
            import torch.distributed as dist

            dist.broadcast_object_list([plan], src=0)
        if plan["train"]:  # inherited by the ranks Lightning launches at this stage
            os.environ[self.ENV] = json.dumps(plan)
            os.environ[self.LEADER] = str(os.getpid())
        return plan

    def receive(self, key: str, store: StageStore) -> dict[str, Any]:
        """Other ranks: rank 0's plan for the stage with store key ``key``."""
        if self._group():
            import torch.distributed as dist

            box: list[Any] = [None]
            dist.broadcast_object_list(box, src=0)
            plan = box[0]
        elif os.environ.get(self.ENV):
            plan = json.loads(os.environ[self.ENV])
            if plan["key"] != key:  # rank 0 reused every stage before the one it launched us at
                plan = {"key": key, "train": False, "resume": None}
        else:  # started externally, before any process group: the store (read-only) is all we have
            return {"key": key, "train": store.lookup(key) is None, "resume": "auto"}
        if plan["key"] != key:
            raise StoreError(f"distributed ranks disagree on the stage to run: rank 0 has {plan['key']}, "
                             f"this rank {key} (do all ranks run the same command and data?)")
        return plan


def start_leader_watchdog(pid: int, period: float = 1.0) -> None:
    """A rank launched by rank 0 would wait forever in a collective if rank 0 died: exit with it."""

    def watch() -> None:
        while True:
            time.sleep(period)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                print(f"kdlab: error: rank 0 (pid {pid}) exited; stopping this rank", file=sys.stderr, flush=True)
                os._exit(1)
            except PermissionError:
                pass

    threading.Thread(target=watch, name="kdlab-rank0-watchdog", daemon=True).start()


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
            weights = state_dict_bytes(state_dict)
            meta_bytes = (json.dumps(meta, indent=2, default=str) + "\n").encode()
            atomic_write_bytes(d / "model.pt", weights)
            atomic_write_bytes(d / "meta.json", meta_bytes)
            sums = {"model.pt": hashlib.sha256(weights).hexdigest(),
                    "meta.json": hashlib.sha256(meta_bytes).hexdigest()}
            atomic_write_json(d / "DONE", {"sha256": sums, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
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

    def save_cache(self, key: str, data_key: str, payload: dict[str, Any]) -> None:
        if not self.writer:
            return
        path = self.cache_path(key, data_key)
        buf = io.BytesIO()
        torch.save(payload, buf)
        data = buf.getvalue()
        try:
            atomic_write_bytes(path, data)
            atomic_write_bytes(path.with_suffix(".sha256"), hashlib.sha256(data).hexdigest().encode())
        except OSError as e:  # a cache is an optimization: without it the sources run live next time
            warn(f"cannot write source-output cache {path}: {e.strerror or e}")
