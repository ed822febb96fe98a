"""Student stages: (a) overhead against a hand-written loop, (c) the source-output cache, (f) scaling with
the number of sources.

All stages are the student (plain2) of the default DGKD pipeline, trained by kdlab's real pipeline runner
with the fixture's frozen sources (plain10, plain8, plain6, plain4; trained once by kdlab, kept in the
bench store). The student's own store entry is removed after each run, so each run trains it. Stages whose
sources run live last ``--live-epochs`` (3), the ~7x faster cached / alone stages ``--epochs`` (20), so
that each timed segment lasts ~10 s on a quiet 2-core CPU; every comparison is between equally long stages.

(a) kdlab's uncached 4-source stage against ``handloop.train_dgkd_student`` on the same in-memory images,
    same sources, batch size, epochs, optimizer, loss and precision, interleaved (hand, kdlab, hand,
    kdlab). The figure is steady-state training samples/s (BatchTimer / the hand loop's identical timer),
    best of the repeats; the whole fit (validation and a checkpoint per epoch on both sides) is beside it.
(c) stage wall time (sources and caches loaded, fit, tests, store commit) of the cached 4-source stage
    against the same student trained alone (labels only), and the uncached stage against the cached one.
    The caches are warm (built by the cold run, which goes first): the steady state of a pipeline after a
    source's first stage, and of every rerun or sweep. The cold stage, which builds all four caches, is
    reported too.
(f) the same stage with 1, 2, 3, 4 sources (the first k chain models), cached (in rounds with the student
    alone, best of each) and uncached.
"""
from __future__ import annotations

import shutil
import statistics
from typing import Any

import common
from common import Options, check, figure, ratio


def _best(runs: list[dict[str, Any]], key: str, high: bool = False) -> float | None:
    vals = [r[key] for r in runs if r.get(key) is not None]
    if not vals:
        return None
    return max(vals) if high else min(vals)


def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def drop_caches(o: Options, keys: list[str]) -> None:
    for key in keys:
        shutil.rmtree(o.store / key / "cache", ignore_errors=True)


def hand_loop(o: Options, fx: dict[str, Any]):
    """``(hand, info)``: ``hand()`` runs the hand-written loop (handloop.train_dgkd_student) on the fixture's sources, the same
    images, batch size, epochs (``live_epochs``), optimizer, loss and precision as kdlab's stage."""
    import torch
    from handloop import load_frozen, train_dgkd_student

    from kdlab.models import build_model
    from kdlab.pipeline.runtime import resolve_precision

    dm, plain = common.kdlab_datamodule(common.base_overrides(o))
    src_names = [n for n in fx["stages"] if n != "student"]
    shape = {"num_classes": dm.num_classes, "in_channels": dm.in_channels, "size": dm.image_size}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where kdlab's accelerator=auto trains
    sources = [load_frozen(fx["stages"][n]["arch"], fx["stages"][n]["checkpoint"], **shape).to(device)
               for n in src_names]
    images = {k: getattr(dm, k).to(device) for k in ("train_images", "train_labels", "val_images", "val_labels")}
    opt, dist = plain["optimizer"], plain["distill"]
    ckpt = o.workdir / f"handloop-{id(o)}.ckpt"
    precision = str(resolve_precision(plain["trainer"].get("precision", "auto"), device))
    autocast = {"bf16-mixed": torch.bfloat16, "bf16": torch.bfloat16,
                "16-mixed": torch.bfloat16 if device.type == "cpu" else torch.float16}.get(precision)

    def hand() -> dict[str, Any]:
        torch.manual_seed(0)
        student = build_model(o.chain[-1], num_classes=dm.num_classes, in_channels=dm.in_channels,
                              input_size=dm.image_size).to(device)
        out = train_dgkd_student(
            student, sources, images["train_images"], images["train_labels"], images["val_images"],
            images["val_labels"], dm.mean, dm.std,
            epochs=o.live_epochs, batch_size=int(plain["data"]["batch_size"]), lr=float(opt["lr"]),
            momentum=float(opt["momentum"]), weight_decay=float(opt["weight_decay"]),
            temperature=float(dist["temperature"]), lam=float(dist["lam"]), seed=int(plain["seed"]), ckpt=ckpt,
            autocast=autocast)
        ckpt.unlink(missing_ok=True)
        return out

    return hand, {"precision": precision, "train_images": dm.train_size}


def run(o: Options) -> dict[str, Any]:
    fx = common.fixture(o)
    src_names = [n for n in fx["stages"] if n != "student"]
    K = len(src_names)  # 4 with the default chain
    hand, info = hand_loop(o, fx)
    precision = info["precision"]
    runs: dict[str, list[dict[str, Any]]] = {}

    def add(name: str, result: dict[str, Any]) -> None:
        runs.setdefault(name, []).append(result)

    # Two lengths, so that every timed segment lasts ~10 s on a quiet 2-core CPU and the whole bench fits in
    # ~15 min: stages with live sources run `live_epochs` (a few), cached / alone stages `epochs` (many,
    # since they run ~7x faster). Each comparison is between stages of the same length.
    E, EL = o.epochs, o.live_epochs
    # cold first: it (re)builds every source's cache, so all later cached stages find them warm
    drop_caches(o, [fx["stages"][n]["store_key"] for n in src_names])
    add(f"cached{K}_cold", common.student_stage(o, K, True, E))
    for _ in range(o.repeats):  # (a): interleaved, so load changes hit both sides alike
        add("hand", hand())
        add(f"uncached{K}", common.student_stage(o, K, False, EL))
    cheap = 1 if o.quick else max(3, o.repeats)  # cached / alone stages: more repeats against load noise
    # alone and the cached stages with 1..K sources in rounds (alone, 1, 2, ..., K, alone, 1, ...): the
    # machine's drift (a quiet 2-core VM varies by +-15 % over minutes) hits every k alike
    for _ in range(cheap):
        add("alone", common.student_stage(o, 0, None, E))
        for k in range(1, K + 1):
            add(f"cached{k}", common.student_stage(o, k, True, E))
    for _ in range(max(1, cheap - 1)):
        add(f"cached{K}_short", common.student_stage(o, K, True, EL))  # as long as the uncached one
    for k in range(1, K):
        add(f"uncached{k}", common.student_stage(o, k, False, EL))

    # -- figures -------------------------------------------------------------------------------------
    figs = []
    hand_rate, kd_rate = _best(runs["hand"], "samples_per_second", True), \
        _best(runs[f"uncached{K}"], "samples_per_second", True)
    over = ratio(kd_rate, hand_rate)
    figs.append(figure("a_overhead", f"a. overhead: kdlab / hand-written loop, training samples/s ({K} live sources)",
                       over, "x", ">= 0.95", check(over, ">=", 0.95),
                       f"kdlab {kd_rate} vs hand {hand_rate} samples/s (steady state, best of {o.repeats}; "
                       f"both at kdlab's default precision, {precision} here)"))
    fit_ratio = ratio(_best(runs["hand"], "fit_seconds"), _best(runs[f"uncached{K}"], "fit_seconds"))
    figs.append(figure("a_overhead_fit", "a. overhead, whole fit incl. validation + checkpoints (speed ratio)",
                       fit_ratio, "x", None, None,
                       f"hand {_best(runs['hand'], 'fit_seconds')} s vs kdlab trainer.fit "
                       f"{_best(runs[f'uncached{K}'], 'fit_seconds')} s for {EL} epochs"))
    alone, cached = _best(runs["alone"], "stage_seconds"), _best(runs[f"cached{K}"], "stage_seconds")
    c1 = ratio(cached, alone)
    figs.append(figure("c_cached_vs_alone", f"c. cache: cached {K}-source stage / student alone (time)", c1, "x",
                       "<= 1.2", check(c1, "<=", 1.2), f"{cached} s vs {alone} s, {E} epochs each"))
    uncached, cached_short = _best(runs[f"uncached{K}"], "stage_seconds"), _best(runs[f"cached{K}_short"],
                                                                                 "stage_seconds")
    c2 = ratio(uncached, cached_short)
    figs.append(figure("c_speedup", f"c. cache: uncached / cached {K}-source stage (speed-up)", c2, "x", ">= 3",
                       check(c2, ">=", 3.0), f"{uncached} s vs {cached_short} s, {EL} epochs each"))
    cold = _best(runs[f"cached{K}_cold"], "stage_seconds")
    figs.append(figure("c_cold", f"c. cache, cold: stage that first builds all {K} caches / student alone",
                       ratio(cold, alone),
                       "x", None, None, f"{cold} s (a pipeline builds each cache once, when the source first teaches)"))
    cached_k = [_best(runs[f"cached{k}"], "stage_seconds") for k in range(1, K + 1)]
    uncached_k = [_best(runs[f"uncached{k}"], "stage_seconds") for k in range(1, K + 1)]
    flat = ratio(cached_k[-1], cached_k[0])
    figs.append(figure("f_scaling_cached", f"f. scaling: cached stage time, {K} sources / 1 source", flat, "x",
                       "<= 1.15 (flat)", check(flat, "<=", 1.15),
                       f"cached s for k=1..{K}: " + ", ".join(str(v) for v in cached_k) + f" ({E} epochs)"))
    figs.append(figure("f_scaling_uncached", f"f. scaling: uncached stage time, {K} sources / 1 source",
                       ratio(uncached_k[-1], uncached_k[0]), "x", None, None,
                       f"uncached s for k=1..{K}: " + ", ".join(str(v) for v in uncached_k) + f" ({EL} epochs)"))
    return {
        "name": "stages", "figures": figs,
        "details": {"runs": runs, "sources": src_names, "epochs": E, "live_epochs": EL,
                    "train_images": info["train_images"],
                    "precision": precision,
                    "fixture": {k: fx[k] for k in ("trained", "seconds")},
                    "median_samples_per_second": {k: _median(v, "samples_per_second") for k, v in runs.items()}},
    }


if __name__ == "__main__":
    common.cli(run, __doc__.splitlines()[0])
