"""Quieting the libraries' start-up chatter: shared by ``python -m kdlab`` and the Hydra jobs it runs."""
from __future__ import annotations

import logging


def quiet_libraries() -> None:
    """Drop the warnings and log lines of Lightning and friends that say nothing about a kdlab run."""
    import warnings

    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    warnings.filterwarnings("ignore", ".*is deprecated.*")
    warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")
    warnings.filterwarnings("ignore", ".*`training_step` returned `None`.*")  # on_nan=rollback skips a batch
    warnings.filterwarnings("ignore", ".*when logging on epoch level in distributed setting.*")  # DDP: metrics sync
    for name in ("pytorch_lightning.utilities.rank_zero", "pytorch_lightning.accelerators.cuda",
                 "lightning.pytorch.utilities.rank_zero", "lightning_fabric",
                 "pytorch_lightning.trainer.connectors.signal_connector"):  # kdlab names the SIGTERM itself
        logging.getLogger(name).setLevel(logging.WARNING)
