"""Where and at what precision a stage computes: the device, the Trainer's precision, the autocast dtype."""
from __future__ import annotations

from typing import Any

import torch

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

