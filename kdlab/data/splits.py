"""Seeded, stratified subset / validation-split selection on label arrays (pure numpy)."""
from __future__ import annotations

import numpy as np

from kdlab.data.loader import derive_seed
from kdlab.errors import ConfigError


def stratified_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """A seeded permutation of range(len(labels)) whose every prefix is (near) class-proportional.

    Within each class the order is random; classes are interleaved by each sample's relative rank
    inside its class, so taking the first k gives about k * n_c / n samples of class c.
    """
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    rng = np.random.Generator(np.random.PCG64(seed))
    perm = rng.permutation(n)
    lab = labels[perm]
    by_class = np.argsort(lab, kind="stable")
    counts = np.bincount(lab) if n else np.zeros(0, dtype=np.int64)
    starts = np.cumsum(counts) - counts
    rank = np.empty(n, dtype=np.float64)
    rank[by_class] = np.arange(n) - np.repeat(starts, counts)
    key = (rank + 0.5) / counts[lab]
    return perm[np.argsort(key, kind="stable")]


def take_subset(labels: np.ndarray, k: int | None, seed: int, what: str, dataset: str) -> np.ndarray:
    """Sorted indices of a seeded stratified subset of size k (all indices when k is None)."""
    n = len(labels)
    if k is None:
        return np.arange(n)
    if k > n:
        raise ConfigError(f"data.{what}={k} is larger than the {n} images available in {dataset}")
    return np.sort(stratified_order(labels, derive_seed(what, seed))[:k])


def train_val_split(
    labels: np.ndarray, val_split: float, seed: int, dataset: str
) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, val indices), disjoint, sorted, stratified; val has round(val_split * n) >= 1 images, or
    none at all for ``val_split`` 0 (no validation split: every image trains)."""
    n = len(labels)
    if val_split == 0:
        return np.arange(n), np.arange(0)
    n_val = max(1, round(val_split * n))
    if n - n_val < 1:
        raise ConfigError(
            f"data.val_split={val_split} leaves no training images out of {n} in {dataset}; "
            "lower data.val_split or raise data.subset"
        )
    order = stratified_order(labels, derive_seed("val_split", seed))
    return np.sort(order[n_val:]), np.sort(order[:n_val])
