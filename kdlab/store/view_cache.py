"""The view cache's format (``distill.cache=views``): a frozen source's outputs for every (training image,
view) of an augmented training set, as memory-mapped arrays on disk.

In a stage's ``cache/`` directory (:mod:`kdlab.store` decides where, and who may write):

    <data key>.views.json    the manifest, written last: schema, N, V, the logits' codec, and the shape,
                             dtype and sha256 of every array
    <data key>.views.<i>.bin one raw array each, row i * V + v = image i under view v: the logits as the codec
                             stores them (every logit fp16, or the top k and the rest) and ``features/<tap>`` fp16

This module holds the logit codecs, :class:`ViewCache` (the lookups a training step makes) and reading and
writing the files; :class:`kdlab.store.StageStore` keeps the paths, the writer / reader roles and the errors.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdlab.store import fileio
from kdlab.store.fileio import sha256_file

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
LogitCodec = FullLogits | TopKLogits


def logit_codec(num_classes: int, topk: int | None) -> LogitCodec:
    """The codec of ``distill.view_topk`` (None: every logit, fp16)."""
    return FullLogits(num_classes) if topk is None else TopKLogits(num_classes, topk)


def codec_from(identity: dict[str, Any], num_classes: int) -> LogitCodec:
    cls = LOGIT_CODECS[identity["codec"]]
    return cls(num_classes, **{k: v for k, v in identity.items() if k != "codec"})


class ViewCache:
    """A frozen source's outputs for every (training image, view), memory-mapped from disk (RAM holds only the
    pages a lookup touches): arrays of shape (N, V, ...), the logits as its ``codec`` stores them (every logit
    fp16, or the top k and the rest) and ``features/<tap>`` fp16.

    ``lookup(idx, views)`` returns the rows of a batch: image ``idx[b]`` under view ``views[b]``
    (:class:`kdlab.data.augment.ViewSpace` ids), logits decoded to (B, C) fp16."""

    def __init__(self, n: int, views: int, arrays: dict[str, np.ndarray], codec: LogitCodec,
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


def read_view_cache(manifest: Path) -> tuple[ViewCache | None, str | None]:
    """The view cache of ``manifest``, memory-mapped read-only, with every array checked against its size and
    sha256 in the manifest: ``(cache, None)``, or ``(None, what is wrong)``."""
    arrays = {}
    try:
        m = json.loads(manifest.read_text())
        n, views = int(m["n"]), int(m["views"])
        codec = codec_from(m.get("logits") or {"codec": "fp16"}, int(m["num_classes"]))
        for name, entry in m["arrays"].items():
            path = manifest.parent / entry["file"]
            layout = {name: (tuple(int(d) for d in entry["shape"]), str(entry.get("dtype", "float16")))}
            if path.stat().st_size != view_cache_bytes(n, views, layout):
                return None, f"{path.name} has the wrong size"
            if sha256_file(path) != entry["sha256"]:
                return None, f"{path.name} fails its checksum"
            arrays[name] = np.memmap(path, dtype=layout[name][1], mode="r", shape=(n, views, *layout[name][0]))
        if set(codec.layout()) - set(arrays):
            return None, f"the manifest lacks the {codec.name} logits"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"unreadable ({type(e).__name__}: {e})"
    return ViewCache(n, views, arrays, codec), None


def write_view_cache(final_dir: Path, work: Path, manifest: Path | None, data_key: str, n: int, views: int,
                     codec: LogitCodec, features: Layout, fill: Callable[[dict[str, np.ndarray]], None],
                     temp_dir: Path | None = None) -> ViewCache:
    """Allocate the arrays (n * views, *shape) in ``work`` (the codec's logits, then the ``features`` layout),
    let ``fill(arrays)`` write them in place through memory maps, fsync and checksum them, move them into
    ``final_dir`` and write ``manifest`` last (None: no manifest, a private copy in ``temp_dir``, removed when
    the cache is closed). On any failure ``work`` is removed and nothing is left that a reader would take for a
    cache (the error is raised)."""
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
        if manifest is not None:
            fileio.atomic_write_json(manifest, {"schema": VIEW_SCHEMA, "n": n, "views": views,
                                                "num_classes": codec.num_classes, "logits": codec.identity(),
                                                "arrays": entries})
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return ViewCache(n, views, {name: np.memmap(final_dir / files[name], dtype=layout[name][1], mode="r",
                                                shape=(n, views, *layout[name][0])) for name in names},
                     codec, temp_dir=temp_dir)
