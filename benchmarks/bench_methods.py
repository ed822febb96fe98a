"""(g) What a method costs: each strategy that learns from sources (every one registered in kdlab.distill)
trains the same student (plain2) from the same teacher (plain10, the fixture's), its outputs and features
cached (``distill.cache=on``), and its steady-state training samples/s is reported as a step-time ratio to
plain KD on that pair (``kd samples/s / method samples/s``: 1.3 means a step takes 30 % longer than KD's).

KD runs first and again last (the machine's drift shows in the two); the ratio uses the faster KD.
Feature methods add their taps to the cache and, where they have them, trainable parts (FitNet's regressor,
CRD's embeddings and memories, ReviewKD's fusion) to the step.

    python benchmarks/bench_methods.py [--epochs N]        # or: make bench ARGS="--only methods"
"""
from __future__ import annotations

from typing import Any

import common
from common import Options, figure

#: the settings the Fashion-MNIST study uses for some methods (studies/fashion_mnist.yaml); the others run
#: with their YAML's defaults
SETTINGS: dict[str, list[str]] = {
    "dkd": ["distill.dkd.warmup=1"], "crd": ["distill.crd.nce_k=4096"], "reviewkd": ["distill.reviewkd.warmup=1"],
}
#: variants of a strategy measured besides it: {name: overrides, the strategy first}
VARIANTS: dict[str, list[str]] = {"kd_logit_stand": ["distill=kd", "distill.logit_stand=true"]}


def methods() -> dict[str, list[str]]:
    """{name: overrides}: every registered strategy that teaches a student from sources (kdlab.distill.STRATEGIES:
    all but labels only, data-free and self-distilling ones), then the variants."""
    from kdlab.distill import STRATEGIES

    out = {}
    for name in STRATEGIES.names():
        cls = STRATEGIES.get(name)
        if cls.uses_sources and not cls.data_free and not getattr(cls, "self_distill", False):
            out[name] = [f"distill={name}", *SETTINGS.get(name, [])]
    return {**out, **VARIANTS}


def run(o: Options, only: list[str] | None = None) -> dict[str, Any]:
    common.fixture(o)
    every = methods()
    names = [m for m in every if m != "kd" and (not only or m in only)]
    if o.quick:
        names = names[:2]

    def stage(method: str) -> dict[str, Any]:
        return common.student_stage(o, 1, True, o.epochs, extra=every[method], name=f"method-{method}")

    runs = {"kd": stage("kd")}
    for m in names:
        runs[m] = stage(m)
    runs["kd (again)"] = stage("kd")
    kd_rate = max(runs["kd"]["samples_per_second"] or 0, runs["kd (again)"]["samples_per_second"] or 0)
    figs = []
    for m in names:
        rate = runs[m]["samples_per_second"]
        cost = common.ratio(kd_rate, rate)
        figs.append(figure(f"g_{m}", f"g. method cost: {m} step time / KD's (plain10 -> plain2, cached)", cost,
                           "x", None, None, f"{m} {rate} vs KD {kd_rate} samples/s over {o.epochs} epochs "
                           f"(stage {runs[m]['stage_seconds']} s)"))
    return {"name": "methods", "figures": figs,
            "details": {"runs": runs, "kd_samples_per_second": kd_rate, "pair": [o.chain[0], o.chain[-1]]}}


if __name__ == "__main__":
    common.cli(run, __doc__.splitlines()[0])
