"""What produced a number: package versions, Python, CPU/GPU and platform.

Accuracies and timings depend on more than the config (the torch build, the CPU, the GPU), so every
``results.json`` records this dict under ``environment``: a result can be traced to what computed it and
compared with a rerun elsewhere. ``make install`` installs the versions pinned in ``requirements.lock``.
Cheap to call: metadata look-ups and ``/proc/cpuinfo``; torch is imported only inside the function.
"""
from __future__ import annotations

import logging
import os
import platform
import sys
from importlib import metadata
from typing import Any

log = logging.getLogger(__name__)

# key in the returned dict -> distribution name
PACKAGES = {"kdlab": "kdlab", "torch": "torch", "torchvision": "torchvision", "lightning": "pytorch-lightning",
            "hydra": "hydra-core", "torchmetrics": "torchmetrics", "numpy": "numpy"}


def package_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str | None:
    """The CPU's model name: ``/proc/cpuinfo`` on Linux, else ``platform.processor()``, else None."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or None


def describe_device(trainer: dict[str, Any] | None) -> str:
    """Where a run's stages compute: ``cpu``, or ``cuda:`` and the GPU(s) as this machine numbers them (the
    entries of CUDA_VISIBLE_DEVICES, which a sweep's local launcher sets per job: kdlab.cli.resources), e.g.
    ``cuda:3`` or ``cuda:0,1`` for ``trainer.devices=2``."""
    import torch

    trainer = trainer or {}
    if str(trainer.get("accelerator", "auto")) == "cpu" or not torch.cuda.is_available():
        return "cpu"
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    visible = visible or [str(i) for i in range(torch.cuda.device_count())]
    devices = trainer.get("devices", 1)
    if isinstance(devices, (list, tuple)):
        used = [visible[int(i)] for i in devices if 0 <= int(i) < len(visible)]
    elif str(devices).strip().lstrip("-").isdigit() and int(devices) > 0:
        used = visible[:int(devices)]
    else:  # auto, -1, "0,1": every visible one (what Lightning takes)
        used = visible
    return "cuda:" + ",".join(used or visible[:1])


def describe_environment(trainer: dict[str, Any] | None = None) -> dict[str, Any]:
    """Versions (None when a package is not installed), CPU, GPU (None without CUDA), CUDA and platform; the
    torch threads this process computes with and its device (:func:`describe_device` of ``trainer``, the run's
    Trainer settings)."""
    env: dict[str, Any] = {"kdlab": package_version("kdlab"), "python": platform.python_version()}
    env.update({key: package_version(dist) for key, dist in PACKAGES.items() if key != "kdlab"})
    env.update({"cpu": cpu_model(), "cpu_count": os.cpu_count(), "gpu": None, "cuda": None, "threads": None,
                "device": None})
    if env["torch"] is not None or "torch" in sys.modules:
        try:
            import torch

            env["threads"] = torch.get_num_threads()
            env["cuda"] = torch.version.cuda
            env["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
            env["device"] = describe_device(trainer)
        except Exception as e:  # noqa: BLE001 - a broken CUDA setup must not cost the run its results.json
            log.debug("describe_environment: no CUDA details (%s: %s)", type(e).__name__, e)
    env["platform"] = platform.platform()
    return env
