"""The source-output cache: a frozen source's logits (and tapped features) on the training split,
computed once per source and data, kept in the store."""
from __future__ import annotations

import hashlib
import logging
from typing import Any

import torch
from torch import nn

from kdlab.errors import ConfigError
from kdlab.pipeline.context import RunContext
from kdlab.pipeline.runtime import autocast_dtype, compute_device
from kdlab.store import StageRecord, canonical_json

log = logging.getLogger(__name__)


def cache_enabled(ctx: RunContext) -> bool:
    mode = str((ctx.cfg.get("distill") or {}).get("cache", "auto"))
    if mode not in ("auto", "on", "off"):
        raise ConfigError(f"unknown distill.cache {mode!r}; known: auto, on, off")
    if mode == "off":
        return False
    if not ctx.dm.deterministic_train:
        if mode == "on":
            log.warning("distill.cache=on needs a deterministic training transform (data.augment=none); "
                        "the sources run live")
        return False
    return True


def source_outputs_cache(ctx: RunContext, record: StageRecord, model: nn.Module, taps: list[str]
                         ) -> dict[str, Any]:
    """Logits (and tapped features) of a frozen source for the training split, computed once, fp16.

    Computed under the same autocast as the live sources of the stage's training steps (bf16-mixed: bf16),
    so that cached and live outputs agree; the autocast dtype is part of the cache's key."""
    device = compute_device(ctx)
    dtype = autocast_dtype(ctx, device)
    ident = {"data": ctx.dm.fingerprint(), "taps": sorted(taps), **({"autocast": str(dtype)} if dtype else {})}
    data_key = hashlib.sha256(canonical_json(ident).encode()).hexdigest()[:16]
    cached = ctx.store.load_cache(record.key, data_key)
    if cached is not None:
        return cached
    from kdlab.models import FeatureTaps

    model = model.to(device).eval()
    hooks = FeatureTaps(model, taps) if taps else None
    logits, feats = [], {t: [] for t in taps}
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        for x, _, _ in ctx.dm.train_eval_dataloader():
            logits.append(model(x.to(device)).half().cpu())
            for t in taps:
                feats[t].append(hooks.features[t].half().cpu())
    if hooks is not None:
        hooks.remove()
    payload = {"logits": torch.cat(logits), "features": {t: torch.cat(v) for t, v in feats.items()}}
    ctx.store.save_cache(record.key, data_key, payload)
    return payload

