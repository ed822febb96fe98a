"""The hand-written PyTorch baseline of the overhead benchmark: exactly the math of a DGKD student step,
no framework.

Per batch: index the in-memory uint8 training tensor, normalize, student forward, every source forward
under ``torch.inference_mode``, ``(1 - lam) * CE + lam * sum_k T^2 KL(p_k || p_s)``, ``zero_grad``,
``backward``, SGD step. Per epoch (for the whole-fit comparison): a validation pass of the student and a
checkpoint (student and optimizer state) written to disk, as kdlab does. Nothing else: no metrics, no
logging, no hooks.

``autocast``: the dtype kdlab's default precision (``trainer.precision=auto``) resolves to on this machine
(bf16 on a CPU with native bf16), used the way Lightning uses it (forward and loss under autocast, backward
outside), so both sides do the same arithmetic.

Timed like kdlab's BatchTimer: per epoch from the start of batch 1 (already fetched) to the end of the
last batch's optimizer step.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def load_frozen(arch: str, weights: str | Path, num_classes: int, in_channels: int, size: int) -> nn.Module:
    from kdlab.models import build_model

    m = build_model(arch, num_classes=num_classes, in_channels=in_channels, input_size=size)
    m.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    m.eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def train_dgkd_student(student: nn.Module, sources: list[nn.Module], images: torch.Tensor, labels: torch.Tensor,
                       val_images: torch.Tensor, val_labels: torch.Tensor, mean: tuple[float, ...],
                       std: tuple[float, ...], *, epochs: int, batch_size: int, lr: float, momentum: float,
                       weight_decay: float, temperature: float, lam: float, seed: int = 0,
                       ckpt: Path | None = None, skip: int = 1, autocast: torch.dtype | None = None
                       ) -> dict[str, Any]:
    device = images.device
    shift = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255.0
    scale = 1.0 / (torch.tensor(std, device=device).view(1, -1, 1, 1) * 255.0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    dev = device.type
    opt = torch.optim.SGD(student.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    n, t2 = len(images), temperature * temperature
    timed_s, timed_n = 0.0, 0
    t_fit = time.perf_counter()
    val_acc = []
    for _ in range(epochs):
        student.train()
        order = torch.randperm(n, generator=g).to(device)
        t0 = t1 = None
        for b, start in enumerate(range(0, n, batch_size)):
            idx = order[start:start + batch_size]
            x = images[idx].to(torch.float32).sub_(shift).mul_(scale)
            y = labels[idx]
            if b == skip:
                sync()
                t0 = time.perf_counter()
            with torch.autocast(dev, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
                logits = student(x)
                with torch.inference_mode():
                    source_logits = [s(x) for s in sources]
                log_p = F.log_softmax(logits.float() / temperature, dim=1)
                kd = sum(F.kl_div(log_p, F.softmax(t.clone().float() / temperature, dim=1), reduction="batchmean")
                         for t in source_logits) * t2
                loss = (1.0 - lam) * F.cross_entropy(logits, y) + lam * kd
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if b >= skip:
                timed_n += len(y)
                if start + batch_size >= n:
                    sync()
                t1 = time.perf_counter()
        if t0 is not None and t1 is not None:
            timed_s += t1 - t0
        # the per-epoch work kdlab also does: validate, keep a checkpoint
        student.eval()
        correct = 0
        with torch.inference_mode(), torch.autocast(dev, dtype=autocast or torch.bfloat16,
                                                    enabled=autocast is not None):
            for start in range(0, len(val_images), 2 * batch_size):
                xv = val_images[start:start + 2 * batch_size].to(torch.float32).sub_(shift).mul_(scale)
                correct += int((student(xv).argmax(1) == val_labels[start:start + 2 * batch_size]).sum())
        val_acc.append(correct / max(len(val_images), 1))
        if ckpt is not None:
            torch.save({"model": student.state_dict(), "optimizer": opt.state_dict()}, ckpt)
    fit = time.perf_counter() - t_fit
    return {"samples_per_second": round(timed_n / timed_s, 1) if timed_s > 0 else None,
            "timed_samples": timed_n, "timed_seconds": round(timed_s, 3), "fit_seconds": round(fit, 3),
            "val_acc": val_acc[-1] if val_acc else None}
