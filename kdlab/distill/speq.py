"""SPEQ: stochastic precision ensemble, self-distillation for quantized networks (Boo, Shin, Choi, Sung,
AAAI 2021, arXiv 2009.14502).

No separate teacher: the teacher is the student's own network (the same weights, at the same weight
bit-width) run with the activation bit-width of every quantized layer drawn at random for that forward pass
-- a stochastic ensemble with no extra parameters. Per training step (:class:`kdlab.modules.selfdistill.
SelfDistillModule`):

    bits_l ~ uniform(speq.bits) for every switchable layer l      (seeded by the stage seed and the step)
    p_T = softmax(z(x; bits) / tau)   under no_grad, BN running statistics untouched
    p_S = softmax(z(x; target bits) / tau)
    L   = ce * CE(z_S, y) + weight * (1 - cos(p_T, p_S))          (batch mean of the per-sample cosine)

The abstract fixes the teacher (stochastic activation precision), the cosine-similarity loss and "no extra
parameters"; it is silent on the bit-widths drawn, tau and whether CE is added, so they are options:
``speq.bits`` (default null = {the model's act_bits, 8}), ``speq.tau`` (1), ``speq.ce`` (1: the recipes
train from scratch, where a self-teacher alone teaches nothing), ``speq.weight`` (1). The first and last
layers keep their bits (``model.quant.first_last``).
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from kdlab.distill.base import STRATEGIES, BlockStrategy, LossTerms, check_number
from kdlab.errors import ConfigError

SPEQ_DEFAULTS: dict[str, Any] = {"bits": None, "tau": 1.0, "ce": 1.0, "weight": 1.0}


def cosine_loss(t_logits: torch.Tensor, s_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """``1 - cos(softmax(z_T / tau), softmax(z_S / tau))``, averaged over the batch."""
    p_t = F.softmax(t_logits.float() / tau, dim=1)
    p_s = F.softmax(s_logits.float() / tau, dim=1)
    return (1.0 - F.cosine_similarity(p_t, p_s, dim=1)).mean()


@STRATEGIES.register("speq")
class SPEQ(BlockStrategy):
    name = "speq"
    uses_sources = False
    #: one stage teaches itself: a stage without sources (kdlab.modules.selfdistill)
    self_distill = True
    options: ClassVar[dict[str, Any]] = {"label_smoothing": 0.0, "speq": SPEQ_DEFAULTS}
    hints: ClassVar[dict[str, str]] = {"temperature": "speq.tau", "lam": "speq.weight"}

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.tau = float(self.opts["tau"])

    @classmethod
    def block(cls, cfg: dict[str, Any]) -> dict[str, Any]:
        return {**SPEQ_DEFAULTS, **dict(cfg.get("speq") or {}), "combine": "mean"}

    @classmethod
    def check_options(cls, block: dict[str, Any], where: str) -> None:
        check_number(f"{where}.tau", block["tau"], low=0.0, low_open=True)
        check_number(f"{where}.ce", block["ce"], low=0.0)
        check_number(f"{where}.weight", block["weight"], low=0.0)
        bits = block["bits"]
        if bits is not None:
            if not isinstance(bits, (list, tuple)) or not bits:
                raise ConfigError(f"{where}.bits must be a non-empty list of activation bit-widths, got {bits!r}")
            for b in bits:
                if isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= 16:
                    raise ConfigError(f"{where}.bits entries must be integers in 2..16, got {b!r}")

    def bit_choices(self, target: int) -> list[int]:
        """The activation bit-widths the teacher pass draws from (null: the target and 8)."""
        bits = self.opts["bits"]
        return sorted({int(target), 8}) if bits is None else [int(b) for b in bits]

    def draw(self, n_layers: int, target: int, seed: int) -> list[int]:
        """One bit-width per switchable layer, uniform over :meth:`bit_choices`, from ``seed``."""
        choices = torch.tensor(self.bit_choices(target))
        g = torch.Generator().manual_seed(seed)
        return choices[torch.randint(len(choices), (n_layers,), generator=g)].tolist()

    def loss_terms(self, student, sources, y, progress) -> LossTerms:
        teacher = sources["self"].logits
        terms = {"ce": self.ce_loss(student.logits, y), "speq": cosine_loss(teacher, student.logits, self.tau)}
        return terms, {"ce": float(self.opts["ce"]), "speq": float(self.opts["weight"])}
