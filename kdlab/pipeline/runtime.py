"""Where and at what precision a stage computes: the device, the Trainer's precision, the autocast dtype."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from kdlab.errors import unknown_name
from kdlab.pipeline.context import RunContext


def resolve_precision(precision: Any, device: torch.device) -> Any:
    """``auto``: the fastest measured on each accelerator (benchmarks/bench_knobs.py): bf16-mixed on a GPU that
    supports bf16 and on a CPU with bf16 in hardware (AVX512-BF16 / AMX), fp32 elsewhere."""
    if str(precision) != "auto":
        return precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    # On the AMX Xeon of these machines, measured on a quiet machine: bf16-mixed 2.0-2.8x the fp32 samples/s
    # of a student stage with four live sources, 1.2-1.7x of the student alone, `make run` 96 s instead of
    # 159 s with the final student's test accuracy within 0.2 points. Without bf16 hardware it is emulated
    # (slower than fp32), so those CPUs keep fp32.
    if device.type == "cpu" and cpu_has_native_bf16():
        return "bf16-mixed"
    return "32-true"


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls/convolutions in hardware."""
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(torch.cpu, probe, None)
        try:
            if fn is not None and fn():
                return True
        except Exception:  # noqa: BLE001, S112 - a private probe that may change: then fp32 by default
            continue
    return False


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
