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

