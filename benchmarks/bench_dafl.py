"""(i) What data-free costs: a DAFL step against a KD step on real data of the same batch size, same pair
(the DAFL CPU recipe's LeNet-5 -> LeNet-5-half on Fashion-MNIST, 1x28x28), as milliseconds per step.

Every side runs kdlab's real pipeline (``common.run_pipeline``) from one LeNet-5 teacher, the recipes'
(``dafl_*_fashion_mnist``: Adam 1e-3), trained here for 1 epoch on the bench's images and kept in the bench
store, so every side reuses it (one store key):

* ``dafl``: ``+experiment=dafl_fashion_mnist``. A step draws ``batch`` latent vectors, runs the generator
  forward, the frozen teacher forward *and backward* (``L_G`` reaches the generator through it), the student
  forward and backward on the detached images, and steps both optimizers (kdlab/modules/datafree.py).
* ``kd (live)``: ``+experiment=dafl_kd_fashion_mnist distill.cache=off``: the same student and KD loss (KL at
  T = 1) on ``batch`` real training images; the teacher runs forward (inference) on every batch. The fair
  reference: DAFL cannot cache its teacher, whose inputs change every step.
* ``kd (cached)``: the same with ``distill.cache=on``, kdlab's default for unaugmented data: the teacher's
  outputs come from the source-output cache (built once, before the fit, outside the timed span).

The DAFL stage runs as many steps per epoch as the KD stage has batches, for one epoch (KD for
``--live-epochs``: its steps are ~10x shorter). Steady-state time per step: the ``BatchTimer`` (the first
batch of each epoch untimed), ``1000 * batch / samples-per-second``; each side's best of ``--repeats``
interleaved runs. Precision is the stage's (``trainer.precision=auto``: bf16-mixed on
CPUs with bf16 in hardware), the same for every side.

    python benchmarks/bench_dafl.py [--live-epochs N] [--repeats N]      # or: make bench ARGS="--only dafl"
"""
from __future__ import annotations

from typing import Any

import common
from common import Options, figure

BATCH = 64  # the CPU recipe's distill.dafl.batch_size (conf/experiment/dafl_fashion_mnist.yaml)
QUICK_BATCH = 32


def overrides(o: Options, experiment: str, batch: int, epochs: int, extra: list[str] = ()) -> list[str]:
    """The recipe at the bench's size: its teacher 1 epoch, its student ``epochs``, data batch ``batch`` (the
    teacher's too, so that every side shares one teacher), a private store, CSV logs, no progress bar."""
    subset = [] if o.subset is None else [f"data.subset={o.subset}"]
    return [f"+experiment={experiment}", *subset, f"data.test_subset={o.test_subset}", f"data.batch_size={batch}",
            "logger=csv", "callbacks.progress=none", f"paths.output_dir={o.workdir / 'runs'}",
            f"paths.store_dir={o.store}", "trainer.max_epochs=1", f"pipeline.per_stage.student.max_epochs={epochs}",
            *extra]


def stage(o: Options, name: str, experiment: str, batch: int, epochs: int, extra: list[str] = ()
          ) -> dict[str, Any]:
    """Train the recipe's student (never reused from the store: dropped afterwards) and time its steps."""
    results, timed, rec = common.timed_fresh_stage(o, overrides(o, experiment, batch, epochs, extra), name, batch)
    teacher, student = results["stages"][0], results["stages"][-1]
    timer = rec.train_timer()
    return {**timed, "steps_per_epoch": timer.batches // epochs + timer.skip, "epochs": epochs,
            "data_free": bool(student.get("data_free")), "extra_params": student.get("extra_params"),
            "teacher_key": teacher["store_key"], "teacher_trained_here": not teacher["cached"]}


def run(o: Options) -> dict[str, Any]:
    import torch

    from kdlab.pipeline.runtime import resolve_precision

    batch = QUICK_BATCH if o.quick else BATCH
    epochs = o.live_epochs  # KD's: its steps are short, so it is timed over more of them
    dafl_epochs = 1  # an epoch of DAFL has as many steps as KD's and takes ~10x longer: steady enough
    runs: dict[str, list[dict[str, Any]]] = {"kd (live)": [], "dafl": [], "kd (cached)": []}
    steps = None
    for i in range(max(1, o.repeats)):
        # KD first: it trains the shared teacher on the first repeat and says how many batches an epoch has
        runs["kd (live)"].append(stage(o, f"dafl-kd-live-{i}", "dafl_kd_fashion_mnist", batch, epochs,
                                       ["distill.cache=off"]))
        steps = steps or runs["kd (live)"][0]["steps_per_epoch"]
        runs["dafl"].append(stage(o, f"dafl-{i}", "dafl_fashion_mnist", batch, dafl_epochs,
                                  [f"distill.dafl.batch_size={batch}", f"distill.dafl.iters_per_epoch={steps}"]))
        runs["kd (cached)"].append(stage(o, f"dafl-kd-cached-{i}", "dafl_kd_fashion_mnist", batch, epochs,
                                         ["distill.cache=on"]))
    best = {side: min(rs, key=lambda r: r["ms_per_step"]) for side, rs in runs.items()}
    dafl, live, cached = best["dafl"]["ms_per_step"], best["kd (live)"]["ms_per_step"], best["kd (cached)"]["ms_per_step"]
    pair = f"lenet5 -> lenet5_half, batch {batch}"
    figs = [
        figure("i_dafl_ms", f"i. DAFL step: generator, teacher fwd/bwd, student ({pair})", dafl, "ms", None, None,
               f"{steps} steps x {dafl_epochs} epoch, the first untimed; best of {len(runs['dafl'])}"),
        figure("i_kd_ms", f"i. KD step on real images, teacher live ({pair})", live, "ms", None, None,
               f"distill.cache=off, {steps} steps x {epochs} epoch(s); best of {len(runs['kd (live)'])}"),
        figure("i_dafl_cost", "i. DAFL step time / KD's on real images (teacher live)", common.ratio(dafl, live), "x",
               None, None, f"DAFL {dafl} ms vs KD {live} ms per step of {batch} images"),
        figure("i_dafl_cost_cached", "i. DAFL step time / KD's with cached teacher outputs (kdlab's default)",
               common.ratio(dafl, cached), "x", None, None, f"DAFL {dafl} ms vs KD {cached} ms (distill.cache=on)"),
    ]
    return {"name": "dafl", "figures": figs,
            "details": {"runs": runs, "best": best, "batch": batch, "steps_per_epoch": steps,
                        "epochs": {"dafl": dafl_epochs, "kd": epochs},
                        "precision": str(resolve_precision("auto", torch.device("cpu"))),
                        "pair": ["lenet5", "lenet5_half"]}}


if __name__ == "__main__":
    common.cli(run, __doc__.splitlines()[0])
