"""Batched, vectorized augmentation of image tensors (no per-image Python loops, no PIL).

Everything works on a whole batch (B, C, H, W) on whatever device the batch lives on. The random
parameters (crop offsets, flip mask) are drawn by the caller, so tests can pass them explicitly and the
loader can draw a whole epoch's parameters from one seeded generator.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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


@dataclass(frozen=True)
class ViewSpace:
    """The finite set of views the batched augmentation draws from, each named by an int64 id.

    A view is a crop offset (oy, ox), each in [0, 2 * pad] (only with ``crop``), and a flip bit; its id is
    ``(oy * side + ox) * 2 + flip`` with ``side = 2 * pad + 1`` (``side = 1`` without crop: the id is the
    flip bit). ``count`` ids in all: (2p + 1)^2 x 2 for crop_flip (162 for p = 4), 2 for flip.
    """

    pad: int
    crop: bool

    @property
    def side(self) -> int:
        return 2 * self.pad + 1 if self.crop else 1

    @property
    def count(self) -> int:
        return self.side * self.side * 2

    def encode(self, offsets: tuple[torch.Tensor, torch.Tensor] | None, flip: torch.Tensor) -> torch.Tensor:
        """View ids of the parameters :func:`random_crop_flip_params` drew."""
        f = flip.long()
        if offsets is None:
            return f
        return (offsets[0] * self.side + offsets[1]) * 2 + f

    def decode(self, views: torch.Tensor
               ) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, torch.Tensor]:
        """(offsets or None, flip mask) of view ids: the arguments of :func:`crop_flip`."""
        flip = (views % 2).bool()
        if not self.crop:
            return None, flip
        cell = views // 2
        return (cell // self.side, cell % self.side), flip


def view_space(augment: str, pad: int) -> ViewSpace | None:
    """The views of the batched ``augment`` (None for ``none``: one view per image)."""
    check_augment(augment)
    if augment == "none":
        return None
    return ViewSpace(pad=int(pad) if augment == "crop_flip" else 0, crop=augment == "crop_flip" and pad > 0)


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
