"""Speed knobs (issue item 3): ``trainer.precision`` (32-true / bf16-mixed / 16-mixed),
``speed.channels_last``, ``speed.compile`` and ``speed.sources_channels_last``, measured on this machine's
accelerator (the CPU here).

Each variant trains the DGKD student stage twice: with its 4 sources live (where a pipeline's time goes when
the cache is off: source forwards; ``--live-epochs``) and alone from labels (student forward + backward
only; ``--epochs``).
channels_last and compile are measured on top of the default precision (``auto``); 32-true is measured
first and again last, to show how much the machine drifted in between. The figure is steady-state training
samples/s (BatchTimer); stage wall time (which also contains torch.compile's compilation) is beside it. The
default of each knob should be the fastest variant measured; GPU defaults cannot be measured without a GPU.

``speed.sources_channels_last`` (frozen models' inference in channels_last; default auto = on a CPU) is
measured twice: the live-source stage with it off (``sources NCHW``; every other variant has it at its
default), and the inference rate of zoo CNNs alone (eval mode, inference mode, batch 256) in each memory
format at fp32 and bf16, with the largest relative difference of their logits.
"""
from __future__ import annotations

from typing import Any

import common
from common import Options, figure

VARIANTS = {
    "32-true": ["trainer.precision=32-true"],
    "bf16-mixed": ["trainer.precision=bf16-mixed"],
    "16-mixed": ["trainer.precision=16-mixed"],
    # the layout and compile knobs on top of the default precision (auto)
    "channels_last": ["speed.channels_last=true"],
    "compile": ["speed.compile=true"],
    "sources NCHW": ["speed.sources_channels_last=false"],  # live sources in the default memory format
    "32-true (again)": ["trainer.precision=32-true"],  # measured last: how much the machine drifted meanwhile
}


def run(o: Options) -> dict[str, Any]:
    import torch

    fx = common.fixture(o)
    K = len(o.chain) - 1
    out: dict[str, dict[str, Any]] = {}
    for name, ov in VARIANTS.items():
        out[name] = {}
        for kind, k in (("live", K), ("alone", 0)):
            if name == "16-mixed" and not torch.cuda.is_available():
                out[name][kind] = {"error": "on a CPU Lightning runs 16-mixed as bf16-mixed (no fp16 AMP on CPU)"}
                continue
            if name == "sources NCHW" and kind == "alone":
                out[name][kind] = {"error": "no sources: the same stage as the default"}
                continue
            if name == "compile" and (o.quick or kind == "live"):
                # speed.compile compiles the student only, so the stage alone shows all of its effect;
                # inductor's first compilation takes minutes on 2 cores (skipped with --quick)
                out[name][kind] = {"error": "skipped with --quick" if o.quick else "measured alone only"}
                continue
            try:
                r = common.student_stage(o, k, False if k else None, o.live_epochs if k else o.epochs, extra=ov,
                                         name="knob-" + name.split()[0])
                out[name][kind] = {key: r[key] for key in ("samples_per_second", "stage_seconds", "fit_seconds",
                                                           "test_acc")}
            except Exception as e:  # noqa: BLE001 - a knob this machine does not support: record why
                out[name][kind] = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
    figs = []
    base = {kind: out["32-true"][kind].get("samples_per_second") for kind in ("live", "alone")}
    for name, res in out.items():
        live, alone = res["live"].get("samples_per_second"), res["alone"].get("samples_per_second")
        parts = []
        for kind, rate, what in (("live", live, f"{K} live sources"), ("alone", alone, "alone")):
            if rate is None:
                parts.append(f"{what}: {res[kind].get('error')}")
            else:
                parts.append(f"{what} {rate} samples/s ({common.ratio(rate, base[kind])}x of 32-true, stage "
                             f"{res[kind]['stage_seconds']} s)")
        key = "k_" + name.replace(" (again)", "_again")
        figs.append(figure(key, f"3. knob {name}: student samples/s, {K} live sources / alone",
                           live if live is not None else alone, "samples/s", None, None, "; ".join(parts)))
    live_rates = {n: r["live"].get("samples_per_second") or 0 for n, r in out.items()}
    fastest = max(live_rates, key=live_rates.get)
    from kdlab.pipeline.runtime import resolve_precision

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    auto = str(resolve_precision("auto", device))
    figs.append(figure("k_auto", "3. default trainer.precision=auto resolves to", None, "", None, None,
                       f"{auto} on this {device.type} (fastest measured here: {fastest} with live sources)"))
    formats = inference_formats(o, device)
    for arch, r in formats.items():
        figs.append(figure(f"k_format_{arch}", f"3. sources_channels_last: {arch} inference, channels_last / NCHW",
                           r["fp32"]["speedup"], "x", None, None,
                           "; ".join(f"{p} {r[p]['nchw']} -> {r[p]['channels_last']} images/s "
                                     f"(x{r[p]['speedup']}, logits rel. diff {r[p]['rel_diff']:.1e})"
                                     for p in ("fp32", "bf16"))))
    return {"name": "knobs", "figures": figs,
            "details": {"variants": out, "fastest_live": fastest, "auto": auto, "inference_formats": formats,
                        "fastest_alone": max(out, key=lambda n: out[n]["alone"].get("samples_per_second") or 0),
                        "accelerator": "cuda" if torch.cuda.is_available() else "cpu",
                        "sources": [n for n in fx["stages"] if n != "student"]}}


def inference_formats(o: Options, device) -> dict[str, dict[str, Any]]:
    """Images/s of a frozen model's forward (eval, inference mode) in NCHW and in channels_last, fp32 and bf16
    autocast, best of a few timed batches each (the formats interleaved, so drift hits both alike)."""
    import time

    import torch

    from kdlab.models import build_model

    archs = ["plain10", "resnet8"] if o.quick else ["plain10", "plain4", "resnet8", "resnet32", "mobilenetv2"]
    batch, reps = (32, 2) if o.quick else (256, 5)
    out: dict[str, dict[str, Any]] = {}
    for arch in archs:
        torch.manual_seed(0)
        model = build_model(arch, num_classes=100, in_channels=3, input_size=32).eval().to(device)
        x = torch.randn(batch, 3, 32, 32, device=device)
        out[arch] = {}
        for label, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            best = {"nchw": float("inf"), "channels_last": float("inf")}
            logits = {}
            with torch.inference_mode(), torch.autocast(device.type, dtype=dtype or torch.bfloat16,
                                                        enabled=dtype is not None):
                for _ in range(reps + 1):  # the first round warms both up (oneDNN primitive caches)
                    for fmt, mf in (("nchw", torch.contiguous_format), ("channels_last", torch.channels_last)):
                        model.to(memory_format=mf)
                        xin = x.contiguous(memory_format=mf)
                        t0 = time.perf_counter()
                        logits[fmt] = model(xin).float()
                        if device.type == "cuda":
                            torch.cuda.synchronize()
                        best[fmt] = min(best[fmt], time.perf_counter() - t0)
            rel = float((logits["nchw"] - logits["channels_last"]).abs().max() / logits["nchw"].abs().max())
            out[arch][label] = {"nchw": round(batch / best["nchw"]), "channels_last": round(batch / best["channels_last"]),
                                "speedup": round(best["nchw"] / best["channels_last"], 2), "rel_diff": rel}
        model.to(memory_format=torch.contiguous_format)
    return out


if __name__ == "__main__":
    common.cli(run, __doc__.splitlines()[0])
