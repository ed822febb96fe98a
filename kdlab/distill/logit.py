"""Shared pieces of the logit-based methods with an option block (DKD, DIST).

:class:`LogitBlockStrategy` is the part they have in common: the method's options live in one block named
after it (``distill.<name>``, with ``temperature`` and ``combine``); ``check`` rejects the first unknown key
of that block (in sorted order); the loss is

    L = CE + sum_terms weight_term * combine_k loss_term(student logits, source k's logits, labels)

over the sources that teach the batch (a zero term when none does), with CE on the raw student logits. A
method supplies its terms (``terms``), :meth:`LogitBlockStrategy.source_terms`, the weights
(:meth:`LogitBlockStrategy.weights_at`) and optionally :meth:`LogitBlockStrategy.prepare`, applied to every
logit vector (student and sources) before the terms.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch

from kdlab.distill.base import BlockStrategy, LossTerms, combined_terms
from kdlab.errors import ConfigError


class LogitBlockStrategy(BlockStrategy):
    """A logit-based method: its block ``distill.<name>`` and one loss per term and source."""

    name = "logit"
    #: the method's loss terms (logged as ``train/loss_<term>``), in the order :meth:`source_terms` returns them
    terms: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        #: the block's ``temperature`` (the terms' softening, not ``distill.temperature``)
        self.block_temperature = float(self.opts["temperature"])

    @classmethod
    def check_keys(cls, given: Any, where: str) -> None:
        unknown = sorted(set(dict(given)) - set(cls.defaults()))
        if unknown:
            raise ConfigError(f"unknown {where} key {unknown[0]!r}; known: {', '.join(cls.defaults())}")

    def prepare(self, logits: torch.Tensor) -> torch.Tensor:
        """The (float32) logits as the terms take them."""
        return logits

    def source_terms(self, z_s: torch.Tensor, z_t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each term's loss of the (prepared) student logits against one source's."""
        raise NotImplementedError

    def weights_at(self, progress: float) -> dict[str, float]:
        """The weights ``{"ce": ..., term: ...}`` at ``progress`` (the fraction of the stage done)."""
        raise NotImplementedError

    def loss_terms(self, student, sources, y, progress) -> LossTerms:
        z_s = student.logits.float()
        ce = self.ce_loss(z_s, y)
        z_s = self.prepare(z_s)
        per_source = (dict(zip(self.terms, self.source_terms(z_s, self.prepare(out.logits.float()), y)))
                      for out in sources.values())
        return combined_terms(ce, per_source, self.terms, self.combine), self.weights_at(progress)
