"""Fidelity and calibration of a stage on the test split: what a student learned from its teacher.

Stanton et al., "Does Knowledge Distillation Really Work?" (NeurIPS 2021) measure a student by its *fidelity* to
its teacher as well as by its accuracy: how often their top-1 predictions agree, and how far apart their predictive
distributions are. Here, from test-split logits in split order (the stage's own, kept by its test pass, and its
sources', read from the store; :mod:`kdlab.pipeline.fidelity`):

* ``agreement(a, b)``: the fraction of test images on which the top-1 classes of ``a`` and ``b`` are the same (on a
  tie, the first of the tied classes, as ``argmax`` takes it);
* ``kl_from_teacher``: the mean over test images of KL(p_teacher || p_student) at T = 1, in nats, in float64;
* ``expected_calibration_error``: torchmetrics' ``MulticlassCalibrationError`` (15 equal-width bins, l1 norm): the
  bin-weighted mean |accuracy - confidence| of the top-1 prediction. Its bins are left-closed, [i/15, (i+1)/15),
  with the edges torch.linspace(0, 1, 16) in float32; a confidence of exactly 1 (float32) is a bin of its own;
* the teacher's distribution: the teacher stage's softmax; for an ensemble of teachers the mean of their softmax
  distributions (the ensemble's predictive distribution, as Stanton et al. define an ensemble teacher's).

The test pass of a module collects its logits with :func:`split_outputs` (every rank's shard gathered in DDP).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

ECE_BINS = 15
FP16_MAX = 65504.0


def agreement(a_logits: torch.Tensor, b_logits: torch.Tensor) -> float:
    """Top-1 agreement of two (N, K) logit (or probability) tensors: a fraction in [0, 1]."""
    return float((a_logits.argmax(1) == b_logits.argmax(1)).double().mean())


def teacher_log_probs(teachers: Sequence[torch.Tensor]) -> torch.Tensor:
    """log p_teacher (N, K) in float64 at T = 1: one teacher's log-softmax, or the log of the mean of an ensemble's
    softmax distributions (log-sum-exp, so no probability underflows to log 0 on the way)."""
    if not teachers:
        raise ValueError("teacher_log_probs needs at least one teacher")
    logp = torch.stack([F.log_softmax(t.double(), dim=1) for t in teachers])
    return torch.logsumexp(logp, dim=0) - math.log(len(teachers))


def kl_from_teacher(teacher_logp: torch.Tensor, student_logits: torch.Tensor) -> float:
    """Mean over images of KL(p_teacher || p_student) = sum_k p_t,k (log p_t,k - log p_s,k), nats, float64.

    A class the teacher gives probability 0 (underflow) adds 0, as in the definition (0 log 0 = 0)."""
    s_logp = F.log_softmax(student_logits.double(), dim=1)
    p_t = teacher_logp.exp()
    terms = torch.where(p_t > 0, p_t * (teacher_logp - s_logp), torch.zeros_like(p_t))
    return float(terms.sum(1).mean())


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = ECE_BINS) -> float:
    """The expected calibration error (l1) of (N, K) class probabilities, torchmetrics' MulticlassCalibrationError."""
    from torchmetrics.classification import MulticlassCalibrationError

    metric = MulticlassCalibrationError(num_classes=int(probs.shape[1]), n_bins=n_bins, norm="l1")
    return float(metric(probs.float(), labels.long()))


def fidelity(student_logits: torch.Tensor, labels: torch.Tensor, sources: dict[str, torch.Tensor],
             teachers: Sequence[torch.Tensor]) -> dict[str, Any]:
    """The fidelity fields of a stage: ``ece`` always; with sources also ``agreement`` ({source: fraction}),
    ``agreement_teacher`` and ``kl_teacher`` (against ``teachers``: one stage, or an ensemble's members)."""
    s = student_logits.double()
    out: dict[str, Any] = {"ece": expected_calibration_error(F.softmax(s, dim=1), labels)}
    if sources:
        t_logp = teacher_log_probs(teachers)
        out["agreement"] = {name: agreement(s, logits.double()) for name, logits in sources.items()}
        out["agreement_teacher"] = agreement(s, t_logp)
        out["kl_teacher"] = kl_from_teacher(t_logp, s)
    return out


def split_outputs(rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], gather: bool = True
                  ) -> dict[str, torch.Tensor] | None:
    """A test pass's ``(idx, logits, labels)`` batches as ``{"logits": (N, K) fp16, "labels": (N,) int64}`` on the
    CPU, in split order (row i: test image i); fp16 as the source-output caches (clipped to its range).

    In a DDP run every rank evaluates a shard of the split: the ranks' rows are summed into one (N, K + 2) table
    (logits, label, count) across the ranks, a collective that every rank calls, so each rank gets the whole
    split (a sample that two shards hold is averaged). None when the pass left a test image out (e.g.
    ``trainer.limit_test_batches``): then no stage outputs are kept from it. ``gather=False``: one process's pass
    over the whole split (no collective)."""
    import torch.distributed as dist

    grouped = gather and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if not rows and not grouped:
        return None
    logits = torch.cat([r[1] for r in rows]).float()
    idx = torch.cat([r[0] for r in rows]).long().to(logits.device)  # one device for the collectives (NCCL: CUDA)
    labels = torch.cat([r[2] for r in rows]).float().to(logits.device)
    n = (idx.max() + 1).reshape(1)
    if grouped:
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
    table = torch.zeros(int(n.item()), logits.shape[1] + 2, dtype=torch.float32, device=logits.device)
    table.index_add_(0, idx, torch.cat([logits, labels[:, None], torch.ones_like(labels)[:, None]], dim=1))
    if grouped:
        dist.all_reduce(table)
    table = table.cpu()
    count = table[:, -1:]
    if bool((count == 0).any()):
        return None
    table = table / count
    return {"logits": table[:, :-2].clamp(-FP16_MAX, FP16_MAX).half(), "labels": table[:, -2].round().long()}
