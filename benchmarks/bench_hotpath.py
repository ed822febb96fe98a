"""No wasted work on the hot path (issue item 2), checked on a real DGKD student stage (its 4 sources live,
stochastic teaching drop_k with k=1), trained by kdlab's pipeline runner, with hooks and torch.profiler:

* a source dropped by stochastic teaching is not run: forward calls per source == the batches in which
  the selector kept it (SourceSelector.keep_mask, the same draw the module uses);
* sources run in inference mode: a forward pre-hook on every source records
  ``torch.is_inference_mode_enabled()`` and ``torch.is_grad_enabled()``;
* frozen sources are not validated (or tested) with the student: their forward calls during the
  validation and test loops are counted (expected 0; each source was evaluated once, as its own stage);
* metrics do not force a device sync every step: torch.profiler counts, over training steps 1..4, the
  ops that copy a device value to the host (``aten::_local_scalar_dense``, behind ``.item()``,
  ``bool(t)``, ``float(t)``) and ``aten::unique`` (torchmetrics' argument validation). On CPU these are
  not syncs; the check is that the per-step code path does not contain them where a GPU would stall.
"""
from __future__ import annotations

from collections import Counter
from typing import Any

import common
from common import Options, figure

SYNC_OPS = ("aten::_local_scalar_dense", "aten::unique", "aten::_unique2", "aten::nonzero",
            "cudaStreamSynchronize", "cudaDeviceSynchronize")


def run(o: Options) -> dict[str, Any]:
    import torch
    from pytorch_lightning.callbacks import Callback

    common.fixture(o)
    seen: dict[str, Counter] = {"train": Counter(), "validate": Counter(), "test": Counter()}
    modes: Counter = Counter()
    prof_counts: Counter = Counter()
    profiled_steps = [0]
    kept_names: list[list[str]] = []

    class ProfileSteps(Callback):
        """torch.profiler over training batches 1..4 of the first epoch (fewer if the epoch is shorter;
        the epoch-end work after the last batch is never inside)."""

        def __init__(self) -> None:
            self.prof = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if trainer.current_epoch == 0 and batch_idx == 1:
                self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                self.prof.__enter__()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if self.prof is not None:
                profiled_steps[0] += 1
                if batch_idx == 4 or batch_idx >= trainer.num_training_batches - 1:
                    self.stop()

        def stop(self) -> None:
            if self.prof is None:
                return
            self.prof.__exit__(None, None, None)
            for ev in self.prof.key_averages():
                if ev.key in SYNC_OPS:
                    prof_counts[ev.key] += ev.count
            self.prof = None

    def hooks(trainer, module) -> None:
        bank = getattr(module, "bank", None)
        if bank is None:
            return
        selector = module.selector
        for name, m in bank.models.items():
            def pre(_mod, _inp, name=name):
                phase = "train" if trainer.training else "validate" if (trainer.validating or trainer.sanity_checking) \
                    else "test"
                seen[phase][name] += 1
                modes[(torch.is_inference_mode_enabled(), torch.is_grad_enabled())] += 1
            m.register_forward_pre_hook(pre)

        class Kept(Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
                kept_names.append(selector.kept(trainer.global_step) if selector else list(bank.names))
        trainer.callbacks.extend([Kept(), ProfileSteps()])

    K = len(o.chain) - 1  # sources of the student (4 with the default chain; drop_k needs >= 2)
    stage = common.student_stage(o, K, False, 1, name="hotpath", before_fit=[hooks],
                                 extra=["distill.stochastic.mode=drop_k", "distill.stochastic.k=1"])
    expected = Counter(n for names in kept_names for n in names)
    train_calls = dict(seen["train"])
    dropped_not_run = train_calls == dict(expected) and sum(train_calls.values()) == (K - 1) * len(kept_names)
    inference_only = set(modes) == {(True, False)}
    eval_calls = sum(seen["validate"].values()) + sum(seen["test"].values())
    steps = max(profiled_steps[0], 1)
    per_step = {k: round(v / steps, 2) for k, v in prof_counts.items()}
    syncs = per_step.get("aten::_local_scalar_dense", 0.0) + per_step.get("aten::unique", 0.0) + \
        per_step.get("aten::_unique2", 0.0)
    figs = [
        figure("h_dropped", f"2. dropped sources not run (drop_k=1 of {K}): forward calls == kept batches",
               1.0 if dropped_not_run else 0.0, "", "== 1 (yes)", dropped_not_run,
               f"calls {train_calls} over {len(kept_names)} batches ({K - 1} of {K} kept per batch)", any_size=True),
        figure("h_inference", "2. sources run under torch.inference_mode (share of source forwards)",
               round(modes[(True, False)] / max(sum(modes.values()), 1), 3), "", "== 1", inference_only,
               f"(inference_mode, grad_enabled) counts: { {str(k): v for k, v in modes.items()} }", any_size=True),
        figure("h_eval", "2. source forwards during validation/test of the student", eval_calls, "calls", "== 0",
               eval_calls == 0, "each source is evaluated once, when it is trained as its own stage", any_size=True),
        figure("h_syncs", "2. host-reading ops per training step (.item()/bool()/unique)", round(syncs, 2),
               "per step", "<= 1", syncs <= 1.0,
               f"{per_step} over {steps} profiled steps: the NaN check, every step on CPU (no sync there), "
               "every 25th step on a GPU; metrics are accumulated on the device", any_size=True),
    ]
    return {"name": "hotpath", "figures": figs,
            "details": {"train_calls": train_calls, "expected": dict(expected), "modes": {str(k): v for k, v in
                                                                                       modes.items()},
                        "eval_calls": {k: dict(v) for k, v in seen.items() if k != "train"},
                        "profiled_per_step": per_step, "stage": stage}}


if __name__ == "__main__":
    common.cli(run, __doc__.splitlines()[0])
