"""Distillation strategies: plain PyTorch objects that turn student and source outputs into named loss terms.

One file per method; every strategy is registered in :data:`STRATEGIES` under the name used in
``distill.strategy``. Every module of this package is imported here, so a new method's file registers itself
(``@STRATEGIES.register("<name>")``): nothing lists the methods by hand.
"""
import importlib
import pkgutil

from kdlab.distill.base import STRATEGIES, SourceOutput, Strategy, StudentOutput, build_strategy
from kdlab.distill.losses import kd_loss
from kdlab.distill.schedules import SCHEDULES, build_schedule
from kdlab.distill.stochastic import SourceSelector

__all__ = [
    "SCHEDULES",
    "STRATEGIES",
    "SourceOutput",
    "SourceSelector",
    "Strategy",
    "StudentOutput",
    "build_schedule",
    "build_strategy",
    "kd_loss",
]

for _module in pkgutil.iter_modules(__path__):  # the strategies register themselves on import
    importlib.import_module(f"{__name__}.{_module.name}")
