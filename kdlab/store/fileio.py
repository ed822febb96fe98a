"""File I/O that survives a crash or a hostile file: atomic writes (temporary file, fsync, rename, directory
fsync), checksums, and loading weights with ``weights_only=True``."""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from kdlab.errors import ConfigError, KdlabError


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

