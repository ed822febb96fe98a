"""Size and cost of a model: parameters and multiply-accumulates (MACs) per image."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@torch.no_grad()
def count_macs(model: nn.Module, input_shape) -> int:
    """Multiply-accumulates of all convolutions and matrix products (Conv2d, Linear) for ONE image of
    `input_shape` (C, H, W), from a dummy forward in eval mode under PyTorch's
    `torch.utils.flop_counter.FlopCounterMode`.

    FlopCounterMode counts 2 FLOPs per multiply-add and skips biases, BN, activations, pooling and
    additions; this returns its total / 2, the number the KD literature reports / 1e6 as "MFLOPs".
    """
    shape = (1, *(int(s) for s in input_shape))
    param = next(model.parameters(), None)
    kw = {"device": param.device, "dtype": param.dtype} if param is not None else {}
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(torch.zeros(shape, **kw))
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2
