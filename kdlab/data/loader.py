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
from torch.utils.data import DistributedSampler

from kdlab.data.augment import Normalizer, check_augment, crop_flip, random_crop_flip_params, view_space
from kdlab.errors import DataError


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any tuple of simple values (stable across processes and platforms)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class EpochSampler(torch.utils.data.Sampler[int]):
    """Indices 0..n-1, shuffled per epoch from (seed, epoch), optionally one shard of a distributed run.

    Each ``iter()`` uses the current epoch and then advances it; ``set_epoch`` overrides it.
    Rank r takes every world_size-th index of the order, starting at r. With ``pad`` (training) the order is
    first padded by wrapping to a multiple of world_size, as DistributedSampler does, so that every rank has
    the same number of samples (and of steps, which DDP's gradient sync needs); up to world_size - 1 samples
    then appear twice. Without it (evaluation) the shards are disjoint, their union is every sample exactly
    once, and their sizes differ by at most one.
    """

    def __init__(self, n: int, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1,
                 pad: bool = True):
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if not pad and world_size > n:
            # an empty shard would leave its rank out of the evaluation's collective metric sync (a hang)
            raise DataError(
                f"cannot shard {n} evaluation sample(s) over {world_size} processes without repeating some; "
                "every process needs at least one (use a larger split or fewer devices)"
            )
        self.n, self.shuffle, self.seed = n, shuffle, int(seed)
        self.rank, self.world_size, self.pad = rank, world_size, bool(pad)
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
            if self.pad and total > self.n:
                idx = torch.cat([idx, idx[: total - self.n]])
            idx = idx[self.rank :: self.world_size]
        return idx

    def next_order(self) -> tuple[int, torch.Tensor]:
        epoch = self.epoch
        self.epoch += 1
        return epoch, self.order(epoch)

    def __len__(self) -> int:
        if self.pad:
            return math.ceil(self.n / self.world_size)
        return len(range(self.rank, self.n, self.world_size))

    def __iter__(self) -> Iterator[int]:
        # a generator, so the epoch is taken at the first next() (after Lightning's set_epoch)
        yield from self.next_order()[1].tolist()


class EvalShardSampler(DistributedSampler):
    """Rank ``rank``'s evaluation shard of 0..n-1, in order and unpadded (``EpochSampler(pad=False)``).

    For torch DataLoaders under Lightning: with ``use_distributed_sampler`` (the default) Lightning replaces
    a SequentialSampler by a padding DistributedSampler and wraps any other sampler in a padding
    DistributedSamplerWrapper, but it keeps a DistributedSampler as it is; hence the base class.
    """

    def __init__(self, n: int, rank: int, world_size: int):
        super().__init__(range(n), num_replicas=world_size, rank=rank, shuffle=False, drop_last=False)
        self._shard = EpochSampler(n, shuffle=False, rank=rank, world_size=world_size, pad=False)
        self.num_samples, self.total_size = len(self._shard), n

    def __len__(self) -> int:
        return len(self._shard)

    def __iter__(self) -> Iterator[int]:
        return iter(self._shard.order(0).tolist())


class TensorLoader:
    """Batches (x float32 normalized NCHW, y int64, idx int64) of an in-memory uint8 image tensor.

    idx is the position of the sample in ``images`` (its index within the split). drop_last is False.
    ``even_shards`` (training) pads the order so that every rank of a distributed run gets as many samples
    (and batches) as the others; without it (evaluation) each sample is in exactly one rank's shard and the
    shards' sizes differ by at most one (see EpochSampler). Lightning does not wrap this loader (it is not a
    torch DataLoader), so this sharding is the only one.
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
        even_shards: bool = True,
        views: bool = False,
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
        self.views = view_space(self.augment, self.pad) if views else None
        if views and self.views is None:
            raise ValueError("a loader reports views only with augmentation (augment=flip or crop_flip)")
        self.sampler = EpochSampler(len(images), shuffle, seed, rank, world_size, pad=even_shards)
        # Lightning inspects these like a DataLoader's; there is no batch sampler
        self.batch_sampler = None

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
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
        views = self.views.encode(offsets, flip) if self.views is not None else None
        yield from self._batches(order, offsets, flip, views)

    def _batches(self, order, offsets, flip, views=None):
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
            if views is None:
                yield self.normalizer(x), self.labels[idx], idx
            else:
                yield self.normalizer(x), self.labels[idx], idx, views[start : start + bs]
