"""The in-memory batch loader: uint8 tensors in, normalized (augmented) float batches out.

Per batch it indexes the uint8 tensor, crops/flips in uint8 on the tensor's device and normalizes; no
worker processes and no PIL. Order and augmentation are drawn from CPU generators seeded from
(seed, epoch), so a rerun is identical and every epoch differs. Lightning calls
``loader.sampler.set_epoch(e)`` before each epoch (as it does for DataLoaders), which keeps the order
right after a resume; without Lightning the epoch advances by one per pass (taken at the first batch).
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator

import torch

from kdlab.data.augment import Normalizer, check_augment, crop_flip, random_crop_flip_params


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any tuple of simple values (stable across processes and platforms)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class EpochSampler(torch.utils.data.Sampler[int]):
    """Indices 0..n-1, shuffled per epoch from (seed, epoch), optionally one shard of a distributed run.

    Each ``iter()`` uses the current epoch and then advances it; ``set_epoch`` overrides it.
    Sharding follows DistributedSampler: the order is padded (by wrapping) to a multiple of world_size
    and rank r takes every world_size-th index starting at r.
    """

    def __init__(self, n: int, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.n, self.shuffle, self.seed = n, shuffle, int(seed)
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def order(self, epoch: int) -> torch.Tensor:
        if self.shuffle:
            g = torch.Generator().manual_seed(derive_seed("order", self.seed, epoch))
            idx = torch.randperm(self.n, generator=g)
        else:
            idx = torch.arange(self.n)
        if self.world_size > 1:
            total = math.ceil(self.n / self.world_size) * self.world_size
            if total > self.n:
                idx = torch.cat([idx, idx[: total - self.n]])
            idx = idx[self.rank :: self.world_size]
        return idx

    def next_order(self) -> tuple[int, torch.Tensor]:
        epoch = self.epoch
        self.epoch += 1
        return epoch, self.order(epoch)

    def __len__(self) -> int:
        return math.ceil(self.n / self.world_size) if self.world_size > 1 else self.n

    def __iter__(self) -> Iterator[int]:
        # a generator, so the epoch is taken at the first next() (after Lightning's set_epoch)
        yield from self.next_order()[1].tolist()


class TensorLoader:
    """Batches (x float32 normalized NCHW, y int64, idx int64) of an in-memory uint8 image tensor.

    idx is the position of the sample in ``images`` (its index within the split). drop_last is False.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        normalizer: Normalizer,
        *,
        augment: str = "none",
        pad: int = 4,
        shuffle: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.images, self.labels = images, labels
        self.batch_size = int(batch_size)
        self.normalizer = normalizer
        self.augment = check_augment(augment)
        self.pad = int(pad)
        self.seed = int(seed)
        self.sampler = EpochSampler(len(images), shuffle, seed, rank, world_size)
        # Lightning inspects these like a DataLoader's; there is no batch sampler
        self.batch_sampler = None

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        # A generator: the epoch is read at the first next(), not at iter(). Lightning creates its
        # iterators before calling set_epoch, so reading it eagerly would replay an order.
        epoch, order = self.sampler.next_order()
        offsets = flip = None
        if self.augment != "none":
            g = torch.Generator().manual_seed(derive_seed("augment", self.seed, epoch))
            offsets, flip = random_crop_flip_params(
                len(order), self.pad, crop=self.augment == "crop_flip", flip=True, generator=g
            )
        device = self.images.device
        order = order.to(device)
        if offsets is not None:
            offsets = (offsets[0].to(device), offsets[1].to(device))
        if flip is not None:
            flip = flip.to(device)
        yield from self._batches(order, offsets, flip)

    def _batches(self, order, offsets, flip):
        bs = self.batch_size
        for start in range(0, len(order), bs):
            idx = order[start : start + bs]
            x = self.images[idx]
            if offsets is not None or flip is not None:
                x = crop_flip(
                    x,
                    self.pad,
                    None if offsets is None else (offsets[0][start : start + bs], offsets[1][start : start + bs]),
                    None if flip is None else flip[start : start + bs],
                )
            yield self.normalizer(x), self.labels[idx], idx
