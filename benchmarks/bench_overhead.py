"""(a) alone: kdlab's DGKD student step with its four sources live against the hand-written loop, in
``--repeats`` interleaved pairs (hand, kdlab, hand, kdlab, ...), the figure the restructuring must keep
(target >= 0.95). The same measurement as bench_stages' (a), without the cache and scaling parts:

    python benchmarks/bench_overhead.py --repeats 3 [--profile FILE]

``--profile FILE`` also writes cProfile's top functions (by cumulative time) of one more kdlab stage.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from pathlib import Path
from typing import Any

import common
from bench_stages import hand_loop
from common import Options, figure, ratio


def run(o: Options, profile: Path | None = None) -> dict[str, Any]:
    fx = common.fixture(o)
    K = len([n for n in fx["stages"] if n != "student"])
    hand, info = hand_loop(o, fx)
    pairs = []
    for _ in range(o.repeats):
        h = hand()
        k = common.student_stage(o, K, False, o.live_epochs)
        pairs.append({"hand": h["samples_per_second"], "kdlab": k["samples_per_second"],
                      "ratio": ratio(k["samples_per_second"], h["samples_per_second"])})
    best = ratio(max(p["kdlab"] for p in pairs), max(p["hand"] for p in pairs))
    out: dict[str, Any] = {"name": "overhead", "pairs": pairs, "figures": [
        figure("a_overhead", f"a. overhead: kdlab / hand-written loop, training samples/s ({K} live sources)",
               best, "x", ">= 0.95", best is not None and best >= 0.95,
               f"best of each side over interleaved repeats, at {info['precision']}; per pair: "
               + ", ".join(f"{p['ratio']}" for p in pairs))]}
    if profile is not None:
        prof = cProfile.Profile()
        prof.enable()
        common.student_stage(o, K, False, o.live_epochs)
        prof.disable()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(60)
        profile.write_text(s.getvalue())
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_options(ap)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--profile", type=Path, default=None)
    a = ap.parse_args()
    common.quiet()
    opts = common.options_from(a)
    common.set_threads(opts.threads)
    opts.workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    res = run(opts, a.profile)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    res["machine"] = common.machine()
    text = json.dumps(res, indent=2, default=str)
    if a.out:
        a.out.write_text(text)
    print(text, file=sys.stdout)
