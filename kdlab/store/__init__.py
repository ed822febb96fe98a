"""The content-addressed stage store (:mod:`~kdlab.store.stage_store`), the view cache's format
(:mod:`~kdlab.store.view_cache`), atomic file I/O and safe weight loading (:mod:`~kdlab.store.fileio`), and the
DDP rank sync that lets rank 0 decide for the store (:mod:`~kdlab.store.ranks`)."""
from kdlab.store.stage_store import StageRecord, StageStore, canonical_json, stage_key

__all__ = ["StageRecord", "StageStore", "canonical_json", "stage_key"]
