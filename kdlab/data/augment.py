"""Batched, vectorized augmentation of image tensors (no per-image Python loops, no PIL).

Everything works on a whole batch (B, C, H, W) on whatever device the batch lives on. The random
parameters (crop offsets, flip mask) are drawn by the caller, so tests can pass them explicitly and the
loader can draw a whole epoch's parameters from one seeded generator.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kdlab.errors import ConfigError

AUGMENTS = ("none", "flip", "crop_flip")


def check_augment(augment: str) -> str:
    if augment not in AUGMENTS:
        raise ConfigError(f"unknown data.augment {augment!r}; known: {', '.join(AUGMENTS)}")
    return augment


def crop_flip(
    x: torch.Tensor,
    pad: int,
    offsets: tuple[torch.Tensor, torch.Tensor] | None = None,
    flip: torch.Tensor | None = None,
) -> torch.Tensor:
    """Crop every sample of ``x`` out of its zero-padded version, then optionally mirror it.

    x: (B, C, H, W), any dtype. pad: zero padding on each side. offsets: (oy, ox), int64 (B,), each in
    [0, 2*pad]: the top-left corner of the H x W window inside the padded (H+2p, W+2p) image, so
    (pad, pad) is the identity. flip: bool (B,): samples to mirror left-right (after cropping).
    Implemented as two gathers with per-sample index grids: one pass over the batch, any device.
    """
    b, c, h, w = x.shape
    if pad < 0:
        raise ConfigError(f"data.pad must be >= 0, got {pad}")
    if offsets is None:
        if flip is None:
            return x
        # flip only: a mirrored copy selected per sample
        return torch.where(flip.view(b, 1, 1, 1), x.flip(3), x)
    oy, ox = offsets
    xp = F.pad(x, (pad, pad, pad, pad)) if pad else x
    wp = xp.shape[3]
    rows = oy.view(b, 1) + torch.arange(h, device=x.device).view(1, h)  # (B, H)
    cols = ox.view(b, 1) + torch.arange(w, device=x.device).view(1, w)  # (B, W)
    if flip is not None:
        # mirroring the crop = reading its columns right to left
        cols = torch.where(flip.view(b, 1), cols.flip(1), cols)
    out = xp.gather(2, rows.view(b, 1, h, 1).expand(b, c, h, wp))
    return out.gather(3, cols.view(b, 1, 1, w).expand(b, c, h, w))


def random_crop_flip_params(
    n: int, pad: int, crop: bool, flip: bool, generator: torch.Generator
) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, torch.Tensor | None]:
    """Draw crop offsets and a flip mask for ``n`` samples from ``generator`` (on the CPU)."""
    offsets = None
    if crop and pad > 0:
        o = torch.randint(0, 2 * pad + 1, (2, n), generator=generator)
        offsets = (o[0], o[1])
    mask = torch.rand(n, generator=generator) < 0.5 if flip else None
    return offsets, mask


class Normalizer:
    """uint8 (or float in [0, 255]) -> float32 (x / 255 - mean) / std, per channel."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        if len(mean) != len(std):
            raise ConfigError(f"data.mean has {len(mean)} values but data.std has {len(std)}")
        if any(s <= 0 for s in std):
            raise ConfigError(f"data.std must be > 0, got {list(std)}")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _consts(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._cache:
            m = torch.tensor(self.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1) * 255.0
            s = torch.tensor(self.std, dtype=torch.float32, device=device).view(1, -1, 1, 1) * 255.0
            self._cache[device] = (m, 1.0 / s)
        return self._cache[device]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shift, scale = self._consts(x.device)
        return x.to(torch.float32).sub_(shift).mul_(scale)
