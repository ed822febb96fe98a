"""Where and at what precision a stage computes: the device, the Trainer's precision, the autocast dtype."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from kdlab.errors import unknown_name
from kdlab.pipeline.context import RunContext


def resolve_precision(precision: Any, device: torch.device) -> Any:
    """``auto``: bf16-mixed on a GPU that supports bf16 (the measured fastest there), fp32 on every CPU.

    On CPUs fp32 is the default for numbers a newcomer can check (README, "The default run"): bf16-mixed resolves
    to different kernels on an AMX Xeon, an AVX512-BF16 EPYC and a CPU that emulates it, so the same command gave
    the same store key but other weights per CPU model (the README's teacher 89.02 % on a Xeon, 90.00 % on an
    EPYC). fp32 is one configuration on every x86 CPU, at a measured cost (docs/performance.md, "Precision on
    CPUs"); ``trainer.precision=bf16-mixed`` keeps the speed where live sources dominate."""
    if str(precision) != "auto":
        return precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def compute_device(ctx: RunContext) -> torch.device:
    acc = str((ctx.cfg.get("trainer") or {}).get("accelerator", "auto"))
    if acc in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def autocast_dtype(ctx: RunContext, device: torch.device) -> torch.dtype | None:
    """The autocast dtype the stage's Trainer uses (None for fp32): the cache is computed the same way."""
    precision = str(resolve_precision((ctx.cfg.get("trainer") or {}).get("precision", "auto"), device))
    if precision in ("bf16", "bf16-mixed") or (precision in ("16", "16-mixed") and device.type == "cpu"):
        return torch.bfloat16  # Lightning runs 16-mixed as bf16-mixed on a CPU
    if precision in ("16", "16-mixed"):
        return torch.float16
    return None


SOURCES_CHANNELS_LAST = ("auto", "true", "false")


def sources_channels_last(cfg: Any, device: torch.device) -> bool:
    """Whether frozen models' inference passes (a source's forward in a student's step, its output and view
    caches, an imported teacher's evaluation) run in channels_last memory format (``speed.sources_channels_last``).

    ``auto``: on a CPU always -- oneDNN's NHWC convolutions ran every CNN of the zoo measured 1.25-2.2x faster
    in inference (docs/performance.md), outputs bit-identical under bf16 autocast and within 1e-6 relative at
    fp32; on CUDA only under mixed precision, where tensor cores want NHWC (fp32 NHWC is not faster on every
    GPU). Memory format never changes what a model computes, so it is not part of any store key."""
    value = str((cfg.get("speed") or {}).get("sources_channels_last", "auto")).lower()
    if value not in SOURCES_CHANNELS_LAST:
        raise unknown_name("speed.sources_channels_last", value, SOURCES_CHANNELS_LAST)
    if value != "auto":
        return value == "true"
    if device.type == "cpu":
        return True
    precision = str(resolve_precision((cfg.get("trainer") or {}).get("precision", "auto"), device))
    return device.type == "cuda" and "16" in precision


@contextmanager
def inference_format(model: torch.nn.Module, channels_last: bool) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
    """``model`` in channels_last for the block (back to the default format after it); yields the conversion
    for its image batches."""
    if not channels_last:
        yield lambda x: x
        return
    model.to(memory_format=torch.channels_last)
    try:
        yield lambda x: x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
    finally:
        model.to(memory_format=torch.contiguous_format)
