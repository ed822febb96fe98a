"""The source-output cache: a frozen source's logits (and tapped features) on the training split,
computed once per source and data, kept in the store.

``distill.cache=views`` (augmented training): the outputs for every (training image, crop offset, flip) of
the batched augmentation, computed once in large inference batches into memory-mapped fp16 arrays
(:class:`kdlab.store.view_cache.ViewCache`); the training batches carry the view id of each sample, and the bank looks
the outputs up by (idx, view)."""
from __future__ import annotations

import hashlib
import logging
from typing import Any

import torch
from torch import nn

from kdlab.errors import ConfigError
from kdlab.pipeline.context import RunContext
from kdlab.pipeline.runtime import autocast_dtype, compute_device, inference_format, sources_channels_last
from kdlab.store import StageRecord, canonical_json
from kdlab.store.view_cache import ViewCache, logit_codec, view_cache_bytes

log = logging.getLogger(__name__)

CACHE_MODES = ("auto", "on", "off", "views")


def cache_mode(ctx: RunContext) -> str:
    mode = str((ctx.cfg.get("distill") or {}).get("cache", "auto"))
    if mode not in CACHE_MODES:
        raise ConfigError(f"unknown distill.cache {mode!r}; known: {', '.join(CACHE_MODES)}")
    return mode


def cache_enabled(ctx: RunContext, data: Any) -> bool:
    """The per-image cache (auto / on) for a stage whose training batches (``data``, the stage's view of the data)
    are unaugmented."""
    mode = cache_mode(ctx)
    if mode in ("off", "views"):
        return False
    if not data.deterministic_train:
        if mode == "on":
            log.warning("distill.cache=on needs a deterministic training transform (data.augment=none); "
                        "the sources run live (distill.cache=views caches every augmented view)")
        return False
    return True


def source_outputs_cache(ctx: RunContext, data: Any, record: StageRecord, model: nn.Module, taps: list[str]
                         ) -> dict[str, Any]:
    """Logits (and tapped features) of a frozen source for the training split of ``data`` (the stage's view of the
    data, whose fingerprint keys the cache), computed once, fp16.

    Computed under the same autocast as the live sources of the stage's training steps (bf16-mixed: bf16),
    so that cached and live outputs agree; the autocast dtype is part of the cache's key."""
    device = compute_device(ctx)
    dtype = autocast_dtype(ctx, device)
    ident = {"data": data.fingerprint(), "taps": sorted(taps), **({"autocast": str(dtype)} if dtype else {})}
    data_key = hashlib.sha256(canonical_json(ident).encode()).hexdigest()[:16]
    cached = ctx.store.load_cache(record.key, data_key)
    if cached is not None:
        return cached
    from kdlab.models import FeatureTaps

    model = model.to(device).eval()
    hooks = FeatureTaps(model, taps) if taps else None
    logits, feats = [], {t: [] for t in taps}
    with inference_format(model, sources_channels_last(ctx.cfg, device)) as fmt, torch.inference_mode(), \
            torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        for x, _, _ in data.train_eval_dataloader():
            logits.append(model(fmt(x.to(device))).half().cpu())
            for t in taps:
                feats[t].append(hooks.features[t].half().cpu().contiguous())
    if hooks is not None:
        hooks.remove()
    payload = {"logits": torch.cat(logits), "features": {t: torch.cat(v) for t, v in feats.items()}}
    ctx.store.save_cache(record.key, data_key, payload)
    return payload



# -- distill.cache=views ---------------------------------------------------------------------------------
def require_view_space(dm: Any):
    """The training augmentation's finite views, or a ConfigError saying why there are none to cache."""
    augment = getattr(dm, "augment", "none")
    if augment == "none":
        raise ConfigError("distill.cache=views caches the views of an augmented training set, but "
                          "data.augment=none has one view per image: use distill.cache=on (or auto)")
    space = dm.view_space()
    if space is None:
        raise ConfigError(f"distill.cache=views needs enumerable views, but data={dm.name} with "
                          f"data.augment={augment} draws its views per sample (e.g. random-resized crops): "
                          f"use distill.cache=off")
    return space


def enumerable_views(dm: Any):
    """The training augmentation's finite views, or None (no augmentation, or views drawn per sample)."""
    return dm.view_space() if getattr(dm, "augment", "none") != "none" else None


def view_topk(ctx: RunContext) -> int | None:
    """``distill.view_topk``: None (every logit, fp16) or k in [1, num_classes - 1] (the top k and the rest)."""
    k = (ctx.cfg.get("distill") or {}).get("view_topk")
    if k is None:
        return None
    classes = int(ctx.dm.num_classes)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < classes:
        raise ConfigError(f"distill.view_topk must be null (every logit, fp16) or an integer in [1, {classes - 1}] "
                          f"(fewer than the {classes} classes), got {k!r}")
    return k


def view_codec(ctx: RunContext):
    return logit_codec(int(ctx.dm.num_classes), view_topk(ctx))


def view_data_key(ctx: RunContext, taps: list[str]) -> str:
    """What a view cache depends on besides its source: the data (its fingerprint covers augment and pad),
    the view space, the taps, how the logits are stored (fp16 or top-k: a different k is another cache) and
    the autocast dtype."""
    space = require_view_space(ctx.dm)
    dtype = autocast_dtype(ctx, compute_device(ctx))
    ident = {"data": ctx.dm.fingerprint(), "taps": sorted(taps), "views": [space.pad, space.crop, space.count],
             "logits": view_codec(ctx).identity(), **({"autocast": str(dtype)} if dtype else {})}
    return hashlib.sha256(canonical_json(ident).encode()).hexdigest()[:16]


def feature_layout(ctx: RunContext, model: nn.Module, taps: list[str]) -> dict[str, tuple[tuple[int, ...], str]]:
    """The fp16 feature arrays of a view cache (the logits' arrays come from the codec)."""
    from kdlab.models import feature_shapes

    if not taps:
        return {}
    dm = ctx.dm
    got = feature_shapes(model, taps, (dm.in_channels, dm.image_size, dm.image_size))
    return {f"features/{t}": (tuple(got[t]), "float16") for t in taps}


def view_layout(ctx: RunContext, model: nn.Module, taps: list[str]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every array of a source's view cache: the codec's logits and the fp16 features."""
    return {**view_codec(ctx).layout(), **feature_layout(ctx, model, taps)}


def source_view_cache(ctx: RunContext, record: StageRecord, model: nn.Module, taps: list[str]) -> ViewCache:
    """The outputs of a frozen source for every (training image, view), from the store or computed once."""
    data_key = view_data_key(ctx, taps)
    cached = ctx.store.load_view_cache(record.key, data_key)
    if cached is not None:
        log.info("view cache of source %s: read from the store", record.key)
        return cached
    # one process computes it: a sweep's jobs that need the same source's views at once (two TAs taught by one
    # teacher) wait here for the first, then read what it stored
    with ctx.store.lock(f"{record.key}-views-{data_key}", label=f"{record.key}'s view cache"):
        cached = ctx.store.load_view_cache(record.key, data_key)
        if cached is not None:
            log.info("view cache of source %s: read from the store (computed by another process)", record.key)
            return cached
        return compute_view_cache(ctx, record, model, taps, data_key)


def compute_view_cache(ctx: RunContext, record: StageRecord, model: nn.Module, taps: list[str],
                       data_key: str) -> ViewCache:
    """Compute a source's view cache and store it (the caller holds its lock)."""
    space = require_view_space(ctx.dm)
    n = int(ctx.dm.train_size)
    codec, features = view_codec(ctx), feature_layout(ctx, model, taps)
    log.info("view cache of source %s: %d images x %d views, %s logits (%.1f MB), computed once", record.key, n,
             space.count, codec.name, view_cache_bytes(n, space.count, {**codec.layout(), **features}) / 1e6)
    return ctx.store.write_view_cache(record.key, data_key, n, space.count, codec, features,
                                      lambda arrays: compute_views(ctx, model, taps, space, arrays))


def stage_view_caches(ctx: RunContext, sources: dict[str, tuple[StageRecord, nn.Module]], taps: list[str]
                      ) -> dict[str, ViewCache]:
    """The view caches of a stage's view-cached sources. In a DDP run every rank reads rank 0's: rank 0 looks
    them up or computes and stores them, then the ranks meet at a barrier and the others read them from the
    store (before the first trained stage there is no process group yet; then rank 0 has stored them before
    Lightning starts the other ranks)."""
    import torch.distributed as dist

    grouped = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    tables: dict[str, ViewCache] = {}
    if ctx.store.writer:
        tables = {name: source_view_cache(ctx, rec, model, taps) for name, (rec, model) in sources.items()}
    if grouped:
        dist.barrier()
    if not ctx.store.writer:
        tables = {name: source_view_cache(ctx, rec, model, taps) for name, (rec, model) in sources.items()}
    return tables


def compute_views(ctx: RunContext, model: nn.Module, taps: list[str], space: Any,
                  arrays: dict[str, Any]) -> None:
    """Fill ``arrays`` ((N * V, ...), row i * V + v: image i under view v) in eval mode, inference mode, under the
    stage's autocast, in batches of data.batch_size_eval (image-major, so rows are written in order); the logits
    as the codec stores them (fp16, or top-k), the features fp16."""
    from kdlab.data.augment import crop_flip
    from kdlab.models import FeatureTaps

    dm = ctx.dm
    device = compute_device(ctx)
    dtype = autocast_dtype(ctx, device)
    codec = view_codec(ctx)
    images = dm.train_images
    n, v_count = len(images), space.count
    total, bs = n * v_count, int(dm.batch_size_eval)
    model = model.to(device).eval()
    hooks = FeatureTaps(model, taps) if taps else None
    try:
        with inference_format(model, sources_channels_last(ctx.cfg, device)) as fmt, torch.inference_mode(), \
                torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            for start in range(0, total, bs):
                rows = torch.arange(start, min(start + bs, total))
                i, v = rows // v_count, rows % v_count
                offsets, flip = space.decode(v)
                x = images[i.to(images.device)].to(device)
                if offsets is not None:
                    offsets = (offsets[0].to(device), offsets[1].to(device))
                x = fmt(dm.normalizer(crop_flip(x, space.pad, offsets, flip.to(device))))
                end = start + len(rows)
                for name, values in codec.encode(model(x)).items():
                    arrays[name][start:end] = values
                for t in taps:
                    arrays[f"features/{t}"][start:end] = hooks.features[t].half().cpu().contiguous().numpy()
    finally:
        if hooks is not None:
            hooks.remove()
