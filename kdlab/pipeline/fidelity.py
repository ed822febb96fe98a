"""A stage's fidelity and calibration on the test split, for results.json: ``ece`` for every stage and, for a
stage taught by sources, ``agreement`` (with each source, by name), ``agreement_teacher``, ``kl_teacher`` and
``teacher_stages`` (the formulas: :mod:`kdlab.modules.fidelity`).

Everything comes from test-split logits at the checkpoint each stage reports (best-on-validation; a data-free stage:
its last epoch), kept in the store (``<store>/<key>/cache/test.pt``, :meth:`kdlab.store.StageStore.save_test_outputs`):
a stage's own test pass (the one that measured its reported ``test_acc``) writes them before the stage is committed,
and later stages, reruns and sweep jobs read them, so no source runs again for its metrics. A stage stored by an
older kdlab, without them, is run once over the test split (its stored weights, the run's precision) and they are
added to its entry; ``lookup`` never depends on them (they are a checksummed cache, not in the DONE marker).

"The teacher" of a stage is the pipeline's earlier stages of role ``teacher``: one (the usual chain) or several (an
ensemble, ``pipeline.topology=ensemble``), whose predictive distribution is then the mean of the members'
softmax distributions; a custom graph without a stage of role teacher has its first stage as the teacher.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from kdlab.modules.fidelity import fidelity, split_outputs
from kdlab.pipeline.assemble import build_stage_model
from kdlab.pipeline.context import RunContext
from kdlab.pipeline.runtime import autocast_dtype, compute_device, inference_format, sources_channels_last
from kdlab.pipeline.spec import StageSpec
from kdlab.store import StageRecord

log = logging.getLogger(__name__)

def keep_test_outputs(ctx: RunContext, key: str, outputs: dict[str, torch.Tensor] | None) -> None:
    """Store the test-split outputs of the pass that measured the stage's reported test_acc (a read-only store,
    a DDP rank other than 0, writes nothing)."""
    if outputs is not None:
        ctx.store.save_test_outputs(key, outputs)


def teacher_stages(spec: StageSpec, earlier: dict[str, tuple[StageSpec, StageRecord]]) -> list[str]:
    """The stages that are "the teacher" of ``spec``: the earlier stages of role teacher, else the first stage."""
    names = [name for name, (s, _) in earlier.items() if s.role == "teacher" and name != spec.name]
    return names or [next(iter(earlier))]


def stage_fidelity(ctx: RunContext, spec: StageSpec, record: StageRecord,
                   earlier: dict[str, tuple[StageSpec, StageRecord]]) -> dict[str, Any]:
    """The fidelity fields of a stage's results.json entry (``earlier``: the stages before it, in order)."""
    own = stage_test_outputs(ctx, spec, record)
    if not spec.sources:
        return fidelity(own["logits"], own["labels"], {}, [])
    teachers = teacher_stages(spec, {n: v for n, v in earlier.items() if n != spec.name})
    needed = list(dict.fromkeys([*spec.sources, *teachers]))
    logits = {name: stage_test_outputs(ctx, *earlier[name])["logits"] for name in needed}
    out = fidelity(own["logits"], own["labels"], {name: logits[name] for name in spec.sources},
                   [logits[name] for name in teachers])
    return {**out, "teacher_stages": teachers}


def stage_test_outputs(ctx: RunContext, spec: StageSpec, record: StageRecord) -> dict[str, torch.Tensor]:
    """A stored stage's test-split outputs: read from its store entry, or (stored by an older kdlab, or damaged)
    computed once from its weights and added to the entry."""
    stored = ctx.store.load_test_outputs(record.key)
    n = int(ctx.dm.test_size)
    if stored is not None and valid(stored, n, int(ctx.dm.num_classes)):
        return stored
    log.info("stage %s (%s): no stored test-split outputs; computing them once from its weights",
             spec.name, record.key)
    outputs = compute_test_outputs(ctx, spec, record)
    keep_test_outputs(ctx, record.key, outputs)
    return outputs


def valid(outputs: Any, n: int, classes: int) -> bool:
    """Whether a stored payload is test-split outputs of this data: (n, classes) logits and n labels."""
    if not isinstance(outputs, dict):
        return False
    logits, labels = outputs.get("logits"), outputs.get("labels")
    return (isinstance(logits, torch.Tensor) and isinstance(labels, torch.Tensor)
            and tuple(logits.shape) == (n, classes) and tuple(labels.shape) == (n,))


def compute_test_outputs(ctx: RunContext, spec: StageSpec, record: StageRecord) -> dict[str, torch.Tensor]:
    """Run a stored stage over the whole test split (eval mode, inference mode, the stage's autocast, the sources'
    memory format), as its test pass did."""
    device = compute_device(ctx)
    dtype = autocast_dtype(ctx, device)
    model = build_stage_model(spec, ctx.dm)
    model.load_state_dict(record.state_dict())
    model = model.to(device).eval()
    rows = []
    with unsharded(ctx.dm), inference_format(model, sources_channels_last(ctx.cfg, device)) as fmt, \
            torch.inference_mode(), torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        for x, y, idx in ctx.dm.test_dataloader():
            rows.append((idx, model(fmt(x.to(device))), y))
    model.to("cpu")
    return split_outputs(rows, gather=False)  # rank 0 alone, the whole split


@contextmanager
def unsharded(dm: Any) -> Iterator[None]:
    """The data module's loaders over the whole split: a data module shards evaluation by the ranks of the Trainer
    it was last attached to (a DDP run), but rank 0 computes the test outputs alone, outside any Trainer."""
    trainer = getattr(dm, "trainer", None)
    dm.trainer = None
    try:
        yield
    finally:
        dm.trainer = trainer
