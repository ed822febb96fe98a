"""Topologies: for a chain of n models (largest first), which earlier stages teach each stage.

Each function returns, for every stage index, the list of indices of its sources.
"""
from __future__ import annotations

from kdlab.registry import Registry

TOPOLOGIES = Registry("topology")


@TOPOLOGIES.register("single")
def single(n: int) -> list[list[int]]:
    """One model trained from labels (the "trained alone" baseline)."""
    return [[] for _ in range(n)]


@TOPOLOGIES.register("direct")
def direct(n: int) -> list[list[int]]:
    """Hinton KD: every later stage is taught by the teacher alone."""
    return [[]] + [[0] for _ in range(1, n)]


@TOPOLOGIES.register("sequential")
def sequential(n: int) -> list[list[int]]:
    """TAKD (and sequential FEED / pacemaker-only): each stage is taught by its predecessor."""
    return [[]] + [[i - 1] for i in range(1, n)]


@TOPOLOGIES.register("dense")
def dense(n: int) -> list[list[int]]:
    """DGKD: each stage is taught by every earlier stage."""
    return [list(range(i)) for i in range(n)]


@TOPOLOGIES.register("ensemble")
def ensemble(n: int) -> list[list[int]]:
    """Parallel FEED: n - 1 independent teachers, all teaching the last stage."""
    return [[] for _ in range(n - 1)] + [list(range(n - 1))]


@TOPOLOGIES.register("custom")
def custom(n: int) -> list[list[int]]:  # sources come from pipeline.stages
    return [[] for _ in range(n)]
