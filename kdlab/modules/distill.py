"""DistillModule: a student taught by frozen sources through a strategy.

The sources are not submodules: they stay out of the student's checkpoints, Lightning never switches
them to train mode, and they run under ``torch.inference_mode``. With a source-output cache their
outputs for the (deterministic) training set come from memory instead of a forward pass; with a view cache
(``distill.cache=views``) the outputs of the exact augmented view of each sample come from disk.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kdlab.distill.base import SourceOutput, Strategy, StudentOutput
from kdlab.distill.stochastic import SourceSelector
from kdlab.models import FeatureTaps
from kdlab.modules.supervised import SupervisedModule


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class SourceBank:
    """The frozen sources of one stage, their feature taps, and (optionally) their cached outputs.

    ``cache[name]`` holds ``{"logits": (N, K) fp16, "features": {tap: (N, ...) fp16}}`` for the training
    split in data-set order, looked up by the batch's sample indices. ``views[name]`` (a
    :class:`kdlab.store.view_cache.ViewCache`) holds the outputs for every (sample, view) of the augmented training split,
    looked up by the batch's sample indices and view ids; it stays memory-mapped on the CPU.
    """

    def __init__(self, sources: dict[str, nn.Module], taps: list[str] | None = None,
                 cache: dict[str, dict[str, Any]] | None = None, channels_last: bool = False,
                 views: dict[str, Any] | None = None):
        self.models = {name: freeze(m) for name, m in sources.items()}
        self.taps = list(taps or [])
        self.cache = cache or {}
        self.views = views or {}
        self.channels_last = channels_last
        self._hooks = {name: FeatureTaps(m, self.taps) for name, m in self.models.items()} if self.taps else {}
        self.forward_calls = {name: 0 for name in self.models}  # for tests and benchmarks

    @property
    def names(self) -> list[str]:
        return list(self.models)

    def to(self, device: torch.device) -> SourceBank:
        for m in self.models.values():
            m.to(device)
            if self.channels_last:
                m.to(memory_format=torch.channels_last)
            m.eval()
        for entry in self.cache.values():
            entry["logits"] = entry["logits"].to(device)
            entry["features"] = {k: v.to(device) for k, v in entry.get("features", {}).items()}
        return self

    def outputs(self, names: list[str], x: torch.Tensor, idx: torch.Tensor | None,
                train: bool = True, views: torch.Tensor | None = None) -> dict[str, SourceOutput]:
        out: dict[str, SourceOutput] = {}
        x_src = None
        for name in names:
            table = self.views.get(name) if train else None
            if table is not None and idx is not None and views is not None:
                logits, feats = table.lookup(idx, views)
                out[name] = SourceOutput(logits.to(x.device).float(),
                                         {k: v.to(x.device).float() for k, v in feats.items()})
                continue
            cached = self.cache.get(name) if train else None
            if cached is not None and idx is not None:
                ix = idx.to(cached["logits"].device)
                out[name] = SourceOutput(cached["logits"][ix].float(),
                                         {k: v[ix].float() for k, v in cached.get("features", {}).items()})
                continue
            model = self.models[name]
            self.forward_calls[name] += 1
            if x_src is None:  # the batch in the sources' memory format, converted once for all of them
                x_src = x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x
            with torch.inference_mode():
                logits = model(x_src)
                feats = dict(self._hooks[name].features) if name in self._hooks else {}
            # clone() outside inference mode turns inference tensors into ordinary ones autograd accepts (and
            # hands the strategies features in the default memory format, whatever the sources ran in)
            out[name] = SourceOutput(logits.clone(),
                                     {k: v.clone(memory_format=torch.contiguous_format) for k, v in feats.items()})
        return out

    def close(self) -> None:
        for hooks in self._hooks.values():
            hooks.remove()
        for table in self.views.values():
            table.close()


class DistillModule(SupervisedModule):
    """A student, its frozen sources (a :class:`SourceBank`) and a strategy that returns loss terms."""

    def __init__(self, model: nn.Module, num_classes: int, optimizer, scheduler, sources: SourceBank,
                 strategy: Strategy, selector: SourceSelector | None = None, **kwargs: Any):
        super().__init__(model, num_classes, optimizer, scheduler, **kwargs)
        self.strategy = strategy  # a submodule: FEED's translators train with the student
        self.selector = selector
        self.__dict__["bank"] = sources  # not a submodule: never checkpointed, never set to train mode
        taps = strategy.student_taps()
        self._student_taps = FeatureTaps(self.model, taps) if taps else None

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.bank.to(self.device)

    def compute_terms(self, x, y, idx, views=None):
        logits = self.model(x)
        feats = dict(self._student_taps.features) if self._student_taps is not None else {}
        names = self.selector.kept(self.global_step) if self.selector is not None else self.bank.names
        outs = self.bank.outputs(names, x, idx, views=views)
        self.accumulate("train/sources_kept", float(len(names)), y.shape[0])
        terms, weights = self.strategy.loss_terms(StudentOutput(logits, feats, idx), outs, y,
                                                      self.progress())
        return logits, terms, weights

    def extra_parameters(self) -> int:
        return self.strategy.extra_parameters()
