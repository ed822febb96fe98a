"""Distillation strategies: plain PyTorch objects that turn student and source outputs into named loss terms.

One file per method; every strategy is registered in :data:`STRATEGIES` under the name used in
``distill.strategy``.
"""
from kdlab.distill import at as _at  # noqa: F401
from kdlab.distill import ce as _ce  # noqa: F401  (registers)
from kdlab.distill import crd as _crd  # noqa: F401
from kdlab.distill import dafl as _dafl  # noqa: F401
from kdlab.distill import dgkd as _dgkd  # noqa: F401
from kdlab.distill import dist as _dist  # noqa: F401
from kdlab.distill import dkd as _dkd  # noqa: F401
from kdlab.distill import feed as _feed  # noqa: F401
from kdlab.distill import fitnet as _fitnet  # noqa: F401
from kdlab.distill import kd as _kd  # noqa: F401
from kdlab.distill import pkt as _pkt  # noqa: F401
from kdlab.distill import reviewkd as _reviewkd  # noqa: F401
from kdlab.distill import rkd as _rkd  # noqa: F401
from kdlab.distill import sp as _sp  # noqa: F401
from kdlab.distill import speq as _speq  # noqa: F401
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
