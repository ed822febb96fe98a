"""Size and cost of a model: parameters and multiply-accumulates (MACs) per image."""

from __future__ import annotations

import torch
from torch import nn


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@torch.no_grad()
def count_macs(model: nn.Module, input_shape) -> int:
    """Multiply-accumulates of all Conv2d and Linear layers for ONE image of `input_shape` (C, H, W).

    Counted through forward hooks on a dummy input in eval mode (BN, activations, pooling and additions are
    not counted). The KD literature reports this number / 1e6 as "MFLOPs".
    """
    shape = (1, *(int(s) for s in input_shape))
    total = 0

    def conv_hook(m: nn.Conv2d, inputs, out):
        nonlocal total
        kh, kw = m.kernel_size
        total += out.numel() // out.shape[0] * (m.in_channels // m.groups) * kh * kw

    def linear_hook(m: nn.Linear, inputs, out):
        nonlocal total
        total += out.numel() // out.shape[-1] // shape[0] * m.in_features * m.out_features

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    param = next(model.parameters(), None)
    kw = {"device": param.device, "dtype": param.dtype} if param is not None else {}
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros(shape, **kw))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total
