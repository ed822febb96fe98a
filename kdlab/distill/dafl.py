"""DAFL: data-free learning of student networks (Chen et al., ICCV 2019, arXiv 1904.01186).

A generator G(z), z ~ N(0, I), is trained with the frozen teacher as a fixed discriminator; the student
learns by KD on G's images only, never on the training split. For a batch with teacher logits z_T and
the teacher's features f_T (``dafl.teacher_tap``; DAFL's ``features_T``, the input of the classifier):

    L_oh = CE(z_T, argmax z_T)                       one-hot: confident teacher outputs
    L_a  = -mean |f_T|                               activation: large features
    p    = mean over the batch of softmax(z_T)
    L_ie = sum_c p_c log10 p_c                       information entropy: minimising it balances the classes
    L_G  = oh * L_oh + a * L_a + ie * L_ie
    L_kd = KL(softmax(z_T) || softmax(z_S)) at T = 1, summed over classes, batch mean, on G(z).detach()

and one step back-propagates ``L_G + L_kd`` and steps the generator's and the student's optimizers (as
``DAFL/DAFL-train.py`` does). The training loop is :class:`kdlab.modules.datafree.DataFreeModule`; this
strategy owns the config (``distill.dafl``), its checks, the teacher's feature tap and the loss terms.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from kdlab.distill.base import STRATEGIES, Strategy, check_block_keys, check_number
from kdlab.distill.losses import kd_loss
from kdlab.errors import ConfigError
from kdlab.models.generator import GENERATORS, build_generator

DAFL_DEFAULTS: dict[str, Any] = {
    "generator": "dafl",        # dafl | noise (kdlab/models/generator.py)
    "latent_dim": 100,
    "batch_size": 512,          # generated images per step
    "iters_per_epoch": 120,     # steps per epoch (there is no data set to define one)
    "oh": 1.0,                  # weight of L_oh
    "a": 0.1,                   # weight of L_a
    "ie": 5.0,                  # weight of L_ie
    "teacher_tap": "embedding",  # the teacher's features for L_a (a feature point or a dotted module name)
    "generator_optimizer": {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 0.2},
}
"""The official MNIST settings (``DAFL-train.py``'s argument defaults); the CIFAR recipes override them."""


def one_hot_loss(t_logits: torch.Tensor) -> torch.Tensor:
    """``CE(z_T, argmax z_T)``: small when the teacher is confident on every generated image."""
    return F.cross_entropy(t_logits, t_logits.detach().argmax(1))


def activation_loss(t_features: torch.Tensor) -> torch.Tensor:
    """``-mean |f_T|`` over the batch and every feature element."""
    return -t_features.float().abs().mean()


def information_entropy_loss(t_logits: torch.Tensor) -> torch.Tensor:
    """``sum_c p_c log10 p_c`` of the batch-mean teacher distribution ``p``: the negative entropy (in
    decimal digits, as the code's ``torch.log10``), smallest when the batch covers all classes equally."""
    p = F.softmax(t_logits.float(), dim=1).mean(0)
    return (p * torch.log10(p)).sum()


@STRATEGIES.register("dafl")
class DAFL(Strategy):
    name = "dafl"
    #: the stage learns from generated images: kdlab.pipeline.assemble builds a DataFreeModule for it
    data_free = True
    options: ClassVar[dict[str, Any]] = {"dafl": DAFL_DEFAULTS}

    def __init__(self, cfg: dict[str, Any], ctx: Any):
        super().__init__(cfg, ctx)
        self.opts = self.block(cfg)
        if len(ctx.source_names) != 1:
            raise ConfigError(f"DAFL (stage {ctx.stage!r}) learns from exactly one teacher, got sources "
                              f"{ctx.source_names}")
        self.teacher_tap = str(self.opts["teacher_tap"])
        self.weights = {"oh": float(self.opts["oh"]), "a": float(self.opts["a"]), "ie": float(self.opts["ie"])}
        self.batch_size = int(self.opts["batch_size"])
        self.iters_per_epoch = int(self.opts["iters_per_epoch"])
        node = dict(self.opts["generator_optimizer"])
        try:  # a partial: the module gives it the generator's parameters
            self.generator_optimizer = instantiate(node)
            if not callable(self.generator_optimizer):
                raise TypeError(f"{node.get('_target_')!r} with _partial_: true must give a callable")
        except Exception as e:
            cause = e.__cause__ or e
            reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
            raise ConfigError(f"stage {ctx.stage!r}: bad distill.dafl.generator_optimizer: {reason}") from e

    @classmethod
    def block(cls, cfg: Mapping[str, Any]) -> dict[str, Any]:
        return {**DAFL_DEFAULTS, **dict(cfg.get("dafl") or {})}

    @classmethod
    def check(cls, cfg: dict[str, Any], where: str = "distill") -> None:
        super().check(cfg, where)
        w = f"{where}.dafl"
        check_block_keys(w, cfg.get("dafl") or {}, DAFL_DEFAULTS)
        opts = cls.block(cfg)
        GENERATORS.get(str(opts["generator"]))  # unknown -> ConfigError listing the known
        for key in ("latent_dim", "batch_size", "iters_per_epoch"):
            check_number(f"{w}.{key}", opts[key], low=1, integer=True)
        for key in ("oh", "a", "ie"):
            check_number(f"{w}.{key}", opts[key], low=0)
        if not isinstance(opts["teacher_tap"], str) or not opts["teacher_tap"]:
            raise ConfigError(f"{w}.teacher_tap must be a feature point name, got {opts['teacher_tap']!r}")
        opt = opts["generator_optimizer"]
        if not isinstance(opt, Mapping) or "_target_" not in opt:
            raise ConfigError(f"{w}.generator_optimizer must be an optimizer config with a _target_ (e.g. "
                              f"torch.optim.Adam) and _partial_: true, got {opt!r}")

    @classmethod
    def taps(cls, cfg: dict[str, Any]) -> tuple[list[str], list[str]]:
        return [], [str(cls.block(cfg)["teacher_tap"])]

    def source_taps(self) -> list[str]:
        return [self.teacher_tap]

    def make_generator(self, shape: tuple[int, int, int]) -> torch.nn.Module:
        return build_generator(str(self.opts["generator"]), shape, latent_dim=int(self.opts["latent_dim"]))

    def generator_terms(self, t_logits: torch.Tensor, t_features: torch.Tensor
                        ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """The generator's terms ``oh``, ``a``, ``ie`` and their weights (L_G is their weighted sum)."""
        terms = {"oh": one_hot_loss(t_logits.float()), "a": activation_loss(t_features),
                 "ie": information_entropy_loss(t_logits)}
        return terms, dict(self.weights)

    def kd_term(self, s_logits: torch.Tensor, t_logits: torch.Tensor) -> torch.Tensor:
        """The student's loss: KL(p_T || p_S) at T = 1, batch mean (the code's ``kdloss``)."""
        return kd_loss(s_logits, t_logits.detach(), 1.0, "batchmean")
