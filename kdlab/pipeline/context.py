"""What every stage of a run shares: its config, run directory, store and data."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdlab.store import StageStore


@dataclass
class RunContext:
    cfg: dict[str, Any]
    run_dir: Path
    store: StageStore
    dm: Any
    method: str
    dataset: str
    group: str
    #: (source key, view data key) pairs that teach from a view cache (distill.cache=views / auto), set before
    #: the first stage by kdlab.pipeline.view_plan.plan_views
    view_plan: frozenset[tuple[str, str]] = frozenset()

