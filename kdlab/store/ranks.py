"""Distributed (DDP) runs: which process is rank 0, and how the other ranks follow its decisions."""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from kdlab.errors import StoreError

if TYPE_CHECKING:
    from kdlab.store.stage_store import StageStore


def is_rank_zero() -> bool:
    """False in the non-zero ranks of a distributed run (known from the environment before Lightning sets
    up the process group: torchrun's RANK, Lightning's LOCAL_RANK/NODE_RANK, SLURM's SLURM_PROCID)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    env = os.environ
    if any(env.get(var, "0").strip() not in ("", "0") for var in ("RANK", "LOCAL_RANK", "NODE_RANK")):
        return False
    try:
        slurm_tasks = int(env.get("SLURM_NTASKS", "1") or 1)
    except ValueError:
        slurm_tasks = 1
    return not (slurm_tasks > 1 and env.get("SLURM_PROCID", "0") not in ("", "0"))



class RankSync:
    """Makes every rank of a DDP run take rank 0's decision for each stage: reuse it, or train it (and
    whether to resume). All ranks walk the same stages and must train the same ones together.

    Rank 0 decides under the store lock and shares the decision through torch.distributed once a process
    group exists (after the first trained stage). Lightning's launcher starts the other ranks at rank 0's
    first trained stage; they inherit that decision through the environment and know that every stage
    before it was reused. A rank with neither (started externally, e.g. by torchrun or srun, before the
    first trained stage) looks the store up read-only. Ranks started by rank 0 stop when rank 0 exits.
    """

    ENV = "KDLAB_DDP_PLAN"
    LEADER = "KDLAB_DDP_LEADER_PID"

    def __init__(self) -> None:
        self.leader = is_rank_zero()
        if not self.leader and os.environ.get(self.LEADER):
            start_leader_watchdog(int(os.environ[self.LEADER]))

    @staticmethod
    def _group() -> bool:
        import torch.distributed as dist

        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def share(self, plan: dict[str, Any]) -> dict[str, Any]:
        """Rank 0: publish this stage's plan ({key, train, resume})."""
        if self._group():
            import torch.distributed as dist

            dist.broadcast_object_list([plan], src=0)
        if plan["train"]:  # inherited by the ranks Lightning launches at this stage
            os.environ[self.ENV] = json.dumps(plan)
            os.environ[self.LEADER] = str(os.getpid())
        return plan

    def receive(self, key: str, store: StageStore) -> dict[str, Any]:
        """Other ranks: rank 0's plan for the stage with store key ``key``."""
        if self._group():
            import torch.distributed as dist

            box: list[Any] = [None]
            dist.broadcast_object_list(box, src=0)
            plan = box[0]
        elif os.environ.get(self.ENV):
            plan = json.loads(os.environ[self.ENV])
            if plan["key"] != key:  # rank 0 reused every stage before the one it launched us at
                plan = {"key": key, "train": False, "resume": None}
        else:  # started externally, before any process group: the store (read-only) is all we have
            return {"key": key, "train": store.lookup(key) is None, "resume": "auto"}
        if plan["key"] != key:
            raise StoreError(f"distributed ranks disagree on the stage to run: rank 0 has {plan['key']}, "
                             f"this rank {key} (do all ranks run the same command and data?)")
        return plan



def start_leader_watchdog(pid: int, period: float = 1.0) -> None:
    """A rank launched by rank 0 would wait forever in a collective if rank 0 died: exit with it."""

    def watch() -> None:
        while True:
            time.sleep(period)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                print(f"kdlab: error: rank 0 (pid {pid}) exited; stopping this rank", file=sys.stderr, flush=True)
                os._exit(1)
            except PermissionError:
                pass

    threading.Thread(target=watch, name="kdlab-rank0-watchdog", daemon=True).start()

