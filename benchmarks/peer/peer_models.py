"""Imported by the torchdistill config (``dependencies``): registers kdlab's plain CNNs in torchdistill's
model registry (the same code, so both frameworks train identical architectures), and the data split
helper that gives torchdistill exactly kdlab's train / validation / test images.

Runs in the peer venv (torch + torchdistill, no Lightning/Hydra); kdlab's model zoo needs only torch.
"""
from __future__ import annotations

import functools

import torch
from torch.utils.data import Subset
from torchdistill.models.registry import register_model

from kdlab.models import build_model

for _depth in (2, 4, 6, 8, 10):
    _name = f"plain{_depth}"
    register_model(key=_name)(functools.partial(build_model, _name))


def split(dataset, index_file: str, split: str) -> Subset:
    """``dataset`` restricted to kdlab's ``split`` ('train' | 'val' | 'test') indices (positions in the
    original training or test set), as saved by bench_peer.py."""
    index = torch.load(index_file, weights_only=True)[split]
    return Subset(dataset, index.tolist())
