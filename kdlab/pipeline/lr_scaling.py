"""Learning-rate scaling with the global batch: a recipe's lr is written for a reference global batch.

    optimizer.lr_scaling       none | linear | sqrt          (default none: lr as written)
    optimizer.reference_batch  the global batch the recipe's lr is for (default 256, the ImageNet recipes')

    effective lr = lr * (global_batch / reference_batch)        linear  (Goyal et al. 2017)
                 = lr * sqrt(global_batch / reference_batch)    sqrt    (Krizhevsky 2014; Hoffer et al. 2017)
    global_batch = data.batch_size x devices x num_nodes x accumulate_grad_batches

``data.batch_size`` is per process under Lightning DDP, so the world size is ``trainer.devices`` x
``trainer.num_nodes``. The effective lr replaces ``lr`` in the stage's optimizer node and the two keys are
dropped from it, so the store key hashes the lr the stage really trains with: two world sizes under
``linear`` are two stages, ``none`` leaves every key as it was before these keys existed, and a scaled lr
equal to an lr written by hand is the same stage.
"""
from __future__ import annotations

import math
from typing import Any

from kdlab.errors import ConfigError

RULES = ("none", "linear", "sqrt")
KEYS = ("lr_scaling", "reference_batch")
DEFAULT_REFERENCE = 256


def _count(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{what} must be a positive integer, got {value!r}")
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a positive integer, got {value!r}") from None
    if n < 1 or n != float(value):
        raise ConfigError(f"{what} must be a positive integer, got {value!r}")
    return n


def world_size(trainer: dict[str, Any]) -> int:
    """Processes of the run as Lightning counts them: devices (an int, a list of ids, "0,1", -1 / "auto":
    every visible GPU, or 1 on the CPU) x num_nodes."""
    devices = trainer.get("devices", 1)
    if devices is None:
        devices = "auto"
    if isinstance(devices, (list, tuple)):
        n = len(devices)
    elif isinstance(devices, str) and "," in devices:
        n = len([d for d in devices.split(",") if d.strip()])
    elif str(devices).strip() in ("auto", "-1"):
        import torch

        accelerator = str(trainer.get("accelerator", "auto"))
        n = torch.cuda.device_count() if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available() else 1
        n = max(n, 1)
    else:
        n = _count(devices, "trainer.devices")
    return n * _count(trainer.get("num_nodes") or 1, "trainer.num_nodes")


def global_batch(cfg: dict[str, Any]) -> int:
    """data.batch_size x world size x trainer.accumulate_grad_batches: the samples behind one optimizer step."""
    trainer = cfg.get("trainer") or {}
    per_process = _count((cfg.get("data") or {}).get("batch_size"), "data.batch_size")
    accumulate = _count(trainer.get("accumulate_grad_batches") or 1, "trainer.accumulate_grad_batches")
    return per_process * world_size(trainer) * accumulate


def scale_factor(rule: str, batch: int, reference: int) -> float:
    if rule == "none":
        return 1.0
    if rule == "linear":
        return batch / reference
    if rule == "sqrt":
        return math.sqrt(batch / reference)
    raise ConfigError(f"unknown optimizer.lr_scaling {rule!r}; known: {', '.join(RULES)}")


def scaled_optimizer(node: dict[str, Any], cfg: dict[str, Any], where: str = "optimizer"
                     ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(the optimizer node to instantiate and hash: lr scaled, lr_scaling / reference_batch dropped;
    what was done, or None for ``none``)."""
    out = dict(node)
    rule = out.pop("lr_scaling", "none")
    reference = out.pop("reference_batch", DEFAULT_REFERENCE)
    if rule is None:
        rule = "none"
    if rule not in RULES:
        raise ConfigError(f"unknown {where}.lr_scaling {rule!r}; known: {', '.join(RULES)}")
    reference = _count(reference, f"{where}.reference_batch")
    if rule == "none":
        return out, None
    if out.get("lr") is None:
        raise ConfigError(f"{where}.lr_scaling={rule} needs {where}.lr (the lr for a global batch of {reference})")
    batch = global_batch(cfg)
    base = float(out["lr"])
    out["lr"] = base * scale_factor(rule, batch, reference)
    return out, {"rule": rule, "base_lr": base, "global_batch": batch, "reference_batch": reference,
                 "lr": out["lr"]}


def describe(info: dict[str, Any]) -> str:
    """The log line's part: ``lr 0.2 = 0.1 x 512/256 (linear lr scaling, global batch 512)``."""
    ratio = f"{info['global_batch']}/{info['reference_batch']}"
    factor = ratio if info["rule"] == "linear" else f"sqrt({ratio})"
    return (f"lr {info['lr']:.6g} = {info['base_lr']:.6g} x {factor} ({info['rule']} lr scaling, global batch "
            f"{info['global_batch']} = data.batch_size x devices x num_nodes x accumulate_grad_batches)")
