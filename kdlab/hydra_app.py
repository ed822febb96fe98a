"""The Hydra side of ``python -m kdlab``: config registration, the task function, the sweep summary."""
from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
STATE: dict[str, Any] = {"exit": 0, "multirun": False}
log = logging.getLogger("kdlab")


def report(message: str, code: int) -> None:
    """The one line a user sees for a failure."""
    print(f"kdlab: error: {message}", file=sys.stderr, flush=True)
    STATE["exit"] = max(STATE["exit"], code)


def register_configs() -> None:
    """``model=<zoo name>`` for every registered architecture, without a YAML file per model."""
    from kdlab.models import MODELS

    cs = ConfigStore.instance()
    for name in MODELS.names():
        cs.store(group="model", name=name, node={"arch": name, "on_the_fly": False, "on_the_fly_n": None,
                                                   "on_the_fly_mode": "row", "kwargs": {}})


class SweepStatus(Callback):
    """After a multirun: one summary line, and a non-zero exit status if any job failed."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        import json

        sweep_dir = Path(str(config.hydra.sweep.dir))
        statuses: dict[str, str] = {}
        for path in sorted(sweep_dir.glob("**/results.json")):
            try:
                statuses[str(path.parent)] = json.loads(path.read_text()).get("status", "unknown")
            except (OSError, ValueError):
                statuses[str(path.parent)] = "unreadable"
        failed = [d for d, s in statuses.items() if s != "completed"]
        msg = f"sweep {sweep_dir}: {len(statuses)} job(s), {len(statuses) - len(failed)} completed, " \
              f"{len(failed)} failed"
        print(f"kdlab: {msg}" + (f" ({', '.join(Path(d).name for d in failed)})" if failed else ""),
              file=sys.stderr, flush=True)
        if failed:
            STATE["exit"] = max(STATE["exit"], 1)


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def hydra_entry(cfg: DictConfig) -> float | None:
    from kdlab.errors import KdlabError
    from kdlab.pipeline.runner import run_pipeline

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    run_dir = Path(hc.runtime.output_dir)
    debug = bool(cfg.get("debug")) or os.environ.get("HYDRA_FULL_ERROR") == "1"
    job = f"job {hc.job.num}: " if multirun else ""
    try:
        results = run_pipeline(cfg, run_dir, list(hc.overrides.task))
    except KdlabError as e:
        if debug:
            traceback.print_exc()
        report(f"{job}{e}", e.exit_code)
        if not multirun:
            sys.exit(e.exit_code)
        return None  # a failed job: sweepers record it as failed (Optuna's would crash on NaN)
    except Exception as e:  # noqa: BLE001 - runtime failure: one line, traceback only in debug mode
        if debug:
            traceback.print_exc()
        report(f"{job}{type(e).__name__}: {e}".splitlines()[0] + (" (rerun with debug=true for the traceback)"
                                                                    if not debug else ""), 1)
        if not multirun:
            sys.exit(1)
        return None
    final = results["final"]
    log.info("done: %s test_acc %.4f (last epoch %.4f); results in %s", final["stage"], final["test_acc"],
             final["test_acc_last"], run_dir / "results.json")
    return None if final.get("val_acc") is None else float(final["val_acc"])  # what sweepers optimize
