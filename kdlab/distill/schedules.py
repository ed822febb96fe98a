"""Schedules for the distillation weight lambda over training progress (the GSLR coefficient decay).

A schedule maps training progress ``t`` in [0, 1] (epoch / max_epochs) to a value between ``start``
and ``end``. The exact GSLR schedule is unverified, so all four shapes are offered.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from kdlab.registry import Registry

SCHEDULES = Registry("lambda schedule")


@SCHEDULES.register("constant")
def constant(t: float, start: float, end: float | None = None, **_: object) -> float:
    return start


@SCHEDULES.register("linear")
def linear(t: float, start: float, end: float, **_: object) -> float:
    return start + (end - start) * min(max(t, 0.0), 1.0)


@SCHEDULES.register("cosine")
def cosine(t: float, start: float, end: float, **_: object) -> float:
    t = min(max(t, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t))


@SCHEDULES.register("step")
def step(t: float, start: float, end: float, milestones: Sequence[float] = (0.5,), **_: object) -> float:
    """Piecewise constant: moves from start to end in len(milestones) equal jumps at the milestones."""
    passed = sum(1 for m in milestones if t >= m)
    return start + (end - start) * passed / max(len(milestones), 1)


def build_schedule(kind: str, start: float, end: float | None = None,
                   milestones: Sequence[float] = (0.5,)) -> Callable[[float], float]:
    fn = SCHEDULES.get(kind)
    stop = start if end is None else end
    return lambda t: fn(t, start=start, end=stop, milestones=tuple(milestones))
