"""``distill.cache=views`` / ``auto``: before anything trains, which stored sources teach which stages from view
caches (every crop and flip of every training image, computed once; :mod:`kdlab.pipeline.source_cache`), and
whether the store's disk can hold the ones still to compute. The plan (``RunContext.view_plan``) is part of the
stage keys of students taught from top-k views, so it is made for the whole pipeline in stage order, as the runner
trains it."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from kdlab.errors import ConfigError, warn
from kdlab.pipeline.assemble import build_stage_model, reads_training_views, source_taps, stage_description
from kdlab.pipeline.context import RunContext
from kdlab.pipeline.source_cache import (
    cache_mode,
    enumerable_views,
    require_view_space,
    view_data_key,
    view_layout,
    view_topk,
)
from kdlab.store import stage_key
from kdlab.store.view_cache import view_cache_bytes


def views_pay(views: int, taught_epochs: int, stored: bool) -> bool:
    """``distill.cache=auto``'s rule for one source (and one set of taps): building its view cache costs
    n_images x ``views`` forward passes, teaching live costs n_images x ``taught_epochs`` (the epochs of every
    stage it teaches in this pipeline). Views when they are in the store already (a lookup is free) or when
    they cost fewer forward passes than teaching live; docs/store.md."""
    return stored or views < taught_epochs


def _every_source(views: int, taught_epochs: int, stored: bool) -> bool:
    return True


def _no_source(views: int, taught_epochs: int, stored: bool) -> bool:
    return False


def _stored_views(views: int, taught_epochs: int, stored: bool) -> bool:
    return stored


#: distill.cache -> f(views per image, epochs the source teaches, views already stored): use its view cache
VIEW_RULES = {"views": _every_source, "auto": views_pay, "on": _no_source, "off": _no_source}


def plan_views(specs: list[Any], ctx: RunContext) -> frozenset[tuple[str, str]]:
    """Before anything trains: the (source key, view data key) pairs that teach from a view cache.

    ``views``: every source (the training data must have enumerable views); ``auto``: each source where
    :func:`views_pay`, none where the views are not enumerable (or ``data.augment=none``: the per-image cache),
    none still to compute (a warning) where the disk cannot hold them; ``on`` / ``off``: none. With ``views``
    a disk that cannot hold the caches still to compute is one line naming the size and the free space."""
    mode = cache_mode(ctx)
    view_topk(ctx)  # a bad distill.view_topk is refused whatever the mode
    rule = VIEW_RULES[mode]
    space = require_view_space(ctx.dm) if mode == "views" else enumerable_views(ctx.dm)
    if space is None or rule is _no_source:
        return frozenset()
    plan, needed = _view_plan(specs, ctx, space, rule)
    total = sum(needed.values())
    if not total:
        return plan
    where = Path(ctx.store.root)
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    if total <= free:
        return plan
    size = (f"{total / 1e9:.2f} GB for {len(needed)} source view cache(s) ({ctx.dm.train_size} images x "
            f"{space.count} views) but {str(ctx.store.root)!r} has {free / 1e9:.2f} GB free")
    if mode == "views":
        raise ConfigError(f"distill.cache=views needs {size}: free space, move paths.store_dir, set "
                          f"distill.view_topk, or use distill.cache=off")
    warn(f"distill.cache=auto: the view caches would need {size}; those sources run live")
    return _view_plan(specs, ctx, space, _stored_views)[0]


def _view_plan(specs: list[Any], ctx: RunContext, space: Any, rule: Any
               ) -> tuple[frozenset[tuple[str, str]], dict[tuple[str, str], int]]:
    """(the pairs ``rule`` picks, bytes of those still to compute for a stage still to train). Walks the stages in
    order, as the runner does: a stage's key depends on whether its sources teach from top-k views."""
    by_name = {s.name: s for s in specs}
    taught: dict[tuple[str, str], int] = {}  # (source name, data key) -> epochs it teaches in this pipeline
    for spec in specs:
        if reads_training_views(spec):
            data_key = view_data_key(ctx, source_taps(spec))
            for src in spec.sources:
                taught[(src, data_key)] = taught.get((src, data_key), 0) + int(spec.max_epochs)
    n = int(ctx.dm.train_size)
    keys: dict[str, str] = {}
    plan: set[tuple[str, str]] = set()
    needed: dict[tuple[str, str], int] = {}
    for spec in specs:
        taps = source_taps(spec)
        viewed = reads_training_views(spec)
        data_key = view_data_key(ctx, taps) if viewed else ""
        for src in spec.sources if viewed else []:
            if rule(space.count, taught[(src, data_key)], ctx.store.has_view_cache(keys[src], data_key)):
                plan.add((keys[src], data_key))
        ctx.view_plan = frozenset(plan)  # the decisions so far: this stage's key reads them
        keys[spec.name] = stage_key(stage_description(spec, ctx, [keys[s] for s in spec.sources]))
        if not viewed or (ctx.store.stage_dir(keys[spec.name]) / "DONE").exists():
            continue  # a stored stage is not trained: its sources' views are not needed for it
        for src in spec.sources:
            item = (keys[src], data_key)
            if item in plan and item not in needed and not ctx.store.has_view_cache(*item):
                layout = view_layout(ctx, build_stage_model(by_name[src], ctx.dm), taps)
                needed[item] = view_cache_bytes(n, space.count, layout)
    return frozenset(plan), needed
