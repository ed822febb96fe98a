"""Pipelines: which stages a run trains, in which order, and who teaches whom."""
from kdlab.pipeline.spec import StageSpec, build_stages
from kdlab.pipeline.topology import TOPOLOGIES

__all__ = ["TOPOLOGIES", "StageSpec", "build_stages"]
