"""Image generators for data-free distillation (DAFL), in a registry of their own.

A generator turns a latent batch into images of the data's shape (C, H, W), in the data's normalized
space. ``sample(n, rng)`` draws its latent batch on the CPU from a ``torch.Generator`` (so a seed gives the
same images on any device); ``forward(z)`` makes the images.

* ``dafl``: the generator of ``DAFL/DAFL-train.py`` (Chen et al., ICCV 2019): ``Linear(latent -> 128 h0 w0)``,
  reshape, ``BN(128)``, upsample x2, ``Conv3x3(128, 128)``, ``BN(128, eps=0.8)``, ``LeakyReLU(0.2)``,
  upsample, ``Conv3x3(128, 64)``, ``BN(64, eps=0.8)``, ``LeakyReLU(0.2)``, ``Conv3x3(64, C)``, ``Tanh``,
  ``BN(C, affine=False)``. The eps of 0.8 is the code's (``BatchNorm2d(128, 0.8)`` passes eps, not
  momentum), kept. ``(h0, w0) = (ceil(H / 4), ceil(W / 4))`` and the second upsampling goes to exactly
  (H, W), so any size works; for sides divisible by 4 (28, 32) it is the code's ``img_size // 4`` and two
  x2 upsamplings. The final BN standardizes each channel over the batch (in training mode), so the images
  match normalized data's scale rather than tanh's [-1, 1].
* ``noise``: no parameters; the images are the latent batch itself, standard Gaussian noise of the data's
  shape (the DAFL paper's "student trained on Gaussian noise" baseline).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdlab.errors import ConfigError
from kdlab.registry import Registry

GENERATORS = Registry("generator")


def image_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    try:
        out = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        out = ()
    if len(out) != 3 or min(out) < 1:
        raise ConfigError(f"a generator needs an image shape (C, H, W) of positive ints, got {shape!r}")
    return out  # type: ignore[return-value]


@GENERATORS.register("dafl")
class DAFLGenerator(nn.Module):
    def __init__(self, shape: Sequence[int], latent_dim: int = 100, width: int = 128):
        super().__init__()
        self.shape = image_shape(shape)
        self.latent_dim = int(latent_dim)
        c, h, w = self.shape
        self.init_size = (math.ceil(h / 4), math.ceil(w / 4))
        self.l1 = nn.Linear(self.latent_dim, width * self.init_size[0] * self.init_size[1])
        self.bn0 = nn.BatchNorm2d(width)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width, eps=0.8)
        self.act1 = nn.LeakyReLU(0.2)
        self.conv2 = nn.Conv2d(width, width // 2, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(width // 2, eps=0.8)
        self.act2 = nn.LeakyReLU(0.2)
        self.conv3 = nn.Conv2d(width // 2, c, 3, padding=1)
        self.tanh = nn.Tanh()
        self.bn_out = nn.BatchNorm2d(c, affine=False)

    def sample(self, n: int, rng: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(n, self.latent_dim, generator=rng)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.l1(z).view(z.shape[0], -1, *self.init_size)
        x = F.interpolate(self.bn0(x), scale_factor=2)
        x = self.act1(self.bn1(self.conv1(x)))
        x = F.interpolate(x, size=self.shape[1:])
        x = self.act2(self.bn2(self.conv2(x)))
        return self.bn_out(self.tanh(self.conv3(x)))


@GENERATORS.register("noise")
class GaussianNoise(nn.Module):
    def __init__(self, shape: Sequence[int], latent_dim: int = 100):
        super().__init__()
        self.shape = image_shape(shape)

    def sample(self, n: int, rng: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(n, *self.shape, generator=rng)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z


def build_generator(name: str, shape: Sequence[int], latent_dim: int = 100) -> nn.Module:
    """Generator ``name`` (an unknown one is a ConfigError listing the known) for images of ``shape``."""
    return GENERATORS.get(name)(shape, latent_dim=latent_dim)
