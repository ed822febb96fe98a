"""Speed knobs (issue item 3): ``trainer.precision`` (32-true / bf16-mixed / 16-mixed),
``speed.channels_last`` and ``speed.compile``, measured on this machine's accelerator (the CPU here).

Each variant trains the DGKD student stage twice: with its 4 sources live (where a pipeline's time goes when
the cache is off: source forwards; ``--live-epochs``) and alone from labels (student forward + backward
only; ``--epochs``).
channels_last and compile are measured on top of the default precision (``auto``); 32-true is measured
first and again last, to show how much the machine drifted in between. The figure is steady-state training
samples/s (BatchTimer); stage wall time (which also contains torch.compile's compilation) is beside it. The
default of each knob should be the fastest variant measured; GPU defaults cannot be measured without a GPU.
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
    return {"name": "knobs", "figures": figs,
            "details": {"variants": out, "fastest_live": fastest, "auto": auto,
                        "fastest_alone": max(out, key=lambda n: out[n]["alone"].get("samples_per_second") or 0),
                        "accelerator": "cuda" if torch.cuda.is_available() else "cpu",
                        "sources": [n for n in fx["stages"] if n != "student"]}}


if __name__ == "__main__":
    common.cli(run, __doc__.splitlines()[0])
