"""The run's protocol: which split chooses a stage's epoch, which checkpoint the stage keeps, what it reports.

    protocol=heldout    (the default) a validation split held out of training (``data.val_split``) chooses each
                        stage's epoch; ``test_acc`` is measured there, never chosen on the test split.
    protocol=reference  a paper recipe as its reference code ran it (``cards/<recipe>.yaml``): the whole training
                        split (``data.val_split=0``), fp32; the per-epoch evaluation runs on the test split and is
                        reported as ``test_acc_last`` (the last epoch, also ``test_acc``) and
                        ``test_acc_best_on_test`` (the best test epoch), which chooses nothing else.

Each stage keeps (stores, passes on to the stages it teaches, exports) one checkpoint: ``protocol.keep``, or
``pipeline.per_stage.<stage>.keep`` for one stage: ``last``, ``best`` (the protocol's best epoch: heldout
``best_on_val``, except a data-free stage, which keeps its last epoch; reference ``best_on_test``),
``best_on_val`` or ``best_on_test``. The heldout protocol never chooses on the test split.

With no validation split (``data.val_split=0``) Lightning's per-epoch evaluation runs on the test split
(:class:`EvalOnTest`) and is logged as ``test/acc_epoch`` (``test/loss_epoch``, ``test/acc_best_on_test``), never
as ``val/...``: a callback, scheduler or sweeper that reads ``val/acc`` finds nothing; the checkpoint is chosen
on it only for ``keep=best_on_test``, and Optuna's objective (the final ``val_acc``) is refused
(:func:`check_sweeper`).
"""
from __future__ import annotations

from typing import Any

import pytorch_lightning as pl

from kdlab.distill.base import strategy_class
from kdlab.errors import ConfigError, unknown_name

PROTOCOLS = ("heldout", "reference")
KEEPS = ("best", "last", "best_on_val", "best_on_test")
#: what a stage reports under each protocol (results.json stage fields), besides test_acc
REPORTED = {"heldout": ("test_acc", "test_acc_last"),
            "reference": ("test_acc", "test_acc_last", "test_acc_best_on_test")}
#: the per-epoch evaluation's metric names (SupervisedModule.eval_names) on a validation split / the test split
VAL_NAMES = {"loss": "val/loss", "acc": "val/acc", "acc_best": "val/acc_best"}
TEST_NAMES = {"loss": "test/loss_epoch", "acc": "test/acc_epoch", "acc_best": "test/acc_best_on_test"}


def protocol_name(cfg: dict[str, Any]) -> str:
    """``protocol.name`` of a resolved run config (``heldout`` where the config has no protocol node)."""
    name = str(((cfg.get("protocol") or {}).get("name")) or "heldout")
    if name not in PROTOCOLS:
        raise unknown_name("protocol", name, PROTOCOLS)
    return name


def has_val_split(cfg: dict[str, Any]) -> bool:
    """Whether the run holds out a validation split (``data.val_split`` > 0)."""
    vs = (cfg.get("data") or {}).get("val_split", 0.1)
    return not isinstance(vs, (int, float)) or isinstance(vs, bool) or vs > 0  # bad values: data's own check


def _keep_setting(cfg: dict[str, Any], stage: str) -> tuple[str, str]:
    """(the keep setting of ``stage``, where it is set)."""
    p = cfg.get("pipeline") or {}
    per = ((p.get("per_stage") or {}).get(stage) or {})
    inline = next((e for e in (p.get("stages") or []) if isinstance(e, dict) and e.get("name") == stage), {})
    for where, node in ((f"pipeline.per_stage.{stage}.keep", per), (f"pipeline.stages[{stage}].keep", inline)):
        if node.get("keep") is not None:
            return str(node["keep"]), where
    return str((cfg.get("protocol") or {}).get("keep") or "best"), "protocol.keep"


def is_data_free(spec: Any) -> bool:
    return bool(spec.sources) and bool(getattr(strategy_class(spec.distill), "data_free", False))


def is_imported(spec: Any) -> bool:
    """A stage evaluated as it is (pipeline.teacher_checkpoint, model.pretrained): it keeps nothing."""
    return bool(spec.checkpoint) or spec.pretrained is not None


def stage_keep(cfg: dict[str, Any], spec: Any) -> str:
    """The checkpoint the stage keeps: ``last``, ``best_on_val`` or ``best_on_test`` (``best`` resolved)."""
    keep, where = _keep_setting(cfg, spec.name)
    if keep not in KEEPS:
        raise ConfigError(f"unknown {where} {keep!r} (stage {spec.name}); known: {', '.join(KEEPS)}")
    if keep == "best":
        if protocol_name(cfg) == "reference":
            return "best_on_test"
        return "last" if is_data_free(spec) else "best_on_val"
    return keep


def legacy_keep(spec: Any) -> str:
    """What a stage kept before protocols existed: its store key says nothing more for this choice."""
    return "last" if is_data_free(spec) else "best_on_val"


def key_fields(cfg: dict[str, Any], spec: Any) -> dict[str, Any]:
    """The protocol's part of a stage's store key: the checkpoint it keeps, where that is not what every stage
    kept before (so the held-out protocol's keys stay as they were). The data split and the precision, which the
    protocols also set, are in the key already."""
    if is_imported(spec):
        return {}
    keep = stage_keep(cfg, spec)
    return {} if keep == legacy_keep(spec) else {"keep": keep}


def check(cfg: dict[str, Any], specs: list[Any]) -> None:
    """The protocol and every stage's keep, before anything loads: one ConfigError line naming the value."""
    name = protocol_name(cfg)
    val = has_val_split(cfg)
    for spec in specs:
        keep, where = _keep_setting(cfg, spec.name)
        resolved = stage_keep(cfg, spec)
        if is_imported(spec):
            continue
        if resolved == "best_on_val" and not val:
            raise ConfigError(f"stage {spec.name!r} keeps its best epoch on the validation split ({where}={keep}, "
                              f"protocol={name}), but data.val_split=0 holds none out; keep=last, a validation split "
                              f"(data.val_split=0.1), or protocol=reference")
        if resolved == "best_on_val" and is_data_free(spec):
            raise ConfigError(f"stage {spec.name!r} is data-free: choosing its epoch on real validation data would use "
                              f"data ({where}={keep}); known for it: last, best (its last epoch under heldout)")
        if resolved == "best_on_test" and name == "heldout":
            raise ConfigError(f"protocol=heldout never chooses on the test split ({where}={keep}, stage "
                              f"{spec.name}); keep=best chooses on the validation split, protocol=reference "
                              f"keeps the best test epoch as the reference code did")
        if resolved == "best_on_test" and val:
            raise ConfigError(f"stage {spec.name!r} keeps its best test epoch ({where}={keep}), but the per-epoch "
                              f"evaluation runs on the test split only without a validation split: "
                              f"data.val_split=0 (protocol=reference sets it), or keep=last")


def check_sweeper(cfg: dict[str, Any], sweeper_choice: str | None) -> None:
    """Optuna's objective is the final stage's best ``val_acc``: without a validation split there is none,
    and the test split must not stand in for it."""
    if sweeper_choice and sweeper_choice != "null" and not has_val_split(cfg):
        raise ConfigError(f"hparams_search={sweeper_choice} maximizes the final stage's best val_acc, but "
                          f"data.val_split=0 (protocol={protocol_name(cfg)}) holds out no validation split and the "
                          f"test split never chooses; tune under protocol=heldout")


# ------------------------------------------------------------------------------------------ training a stage

class EvalOnTest(pl.LightningDataModule):
    """The run's data as Lightning fits a stage without a validation split: the per-epoch evaluation loop
    (Lightning's ``val_dataloader``) reads the test split, whose curve the stage reports as test accuracy."""

    def __init__(self, dm: Any):
        super().__init__()
        self.dm = dm

    def _inner(self) -> Any:
        self.dm.trainer = self.trainer  # the inner datamodule shards by the Trainer's ranks
        return self.dm

    def setup(self, stage: str | None = None) -> None:
        self.dm.setup(stage)

    def train_dataloader(self) -> Any:
        return self._inner().train_dataloader()

    def val_dataloader(self) -> Any:
        return self._inner().test_dataloader()

    def test_dataloader(self) -> Any:
        return self._inner().test_dataloader()

    def to_device(self, device: Any) -> EvalOnTest:
        if hasattr(self.dm, "to_device"):
            self.dm.to_device(device)
        return self


def evaluates_on_test(dm: Any) -> bool:
    """Whether the stage's per-epoch evaluation runs on the test split (the data holds no validation split)."""
    return int(dm.val_size) == 0


def fit_data(dm: Any) -> Any:
    """The datamodule a stage is fitted on: ``dm`` itself, or :class:`EvalOnTest` without a validation split."""
    return EvalOnTest(dm) if evaluates_on_test(dm) else dm


def eval_names(dm: Any) -> dict[str, str]:
    """The per-epoch evaluation's metric names: ``val/...`` on a validation split, ``test/..._epoch`` on test."""
    return dict(TEST_NAMES if evaluates_on_test(dm) else VAL_NAMES)


def _argbest(curve: list[float]) -> int | None:
    """The first epoch with the highest value (ties go to the earlier one, as ModelCheckpoint keeps it)."""
    return int(max(range(len(curve)), key=lambda i: (curve[i], -i))) if curve else None


def accuracy_fields(curve: list[float], on_test: bool, keep: str, data_free: bool, best_score: float | None,
                    test_best: float | None, test_last: float) -> dict[str, Any]:
    """A trained stage's accuracies and what it kept (results.json / meta.json fields).

    ``curve``: the per-epoch evaluation (the validation split's, or the test split's when ``on_test``);
    ``best_score``: its best value; ``test_best``: the test accuracy of the best-on-validation weights."""
    best = _argbest(curve)
    last = len(curve) - 1 if curve else None
    kept_epoch = last if keep == "last" else best
    if on_test:  # no validation split: the curve is the test split's; nothing is chosen on it but keep
        return {"best_epoch": None, "val_acc": None, "test_acc": test_last, "test_acc_last": test_last,
                "val_curve": None, "test_curve": curve, "best_epoch_on_test": best,
                "test_acc_best_on_test": curve[best] if curve else None, "kept": keep, "kept_epoch": kept_epoch,
                **({"data_free": True} if data_free else {})}
    out = {"best_epoch": best, "val_acc": best_score, "test_acc": test_best, "test_acc_last": test_last,
           "val_curve": curve, "kept": keep, "kept_epoch": kept_epoch}
    if data_free:  # choosing an epoch on real validation data uses data: the last epoch is the result
        out.update(data_free=True, test_acc=test_last, test_acc_best_val=test_best, val_acc_best=best_score,
                   val_acc=curve[-1] if curve else None)
    return out


def kept_of(meta: dict[str, Any]) -> str | None:
    """The checkpoint a stored stage kept (``last`` / ``best_on_val`` / ``best_on_test``; None: imported as it
    is); stages stored before protocols existed kept their best-on-validation epoch (data-free: their last)."""
    if "kept" in meta:
        return meta["kept"]
    if meta.get("imported_from") or meta.get("pretrained"):
        return None
    return "last" if meta.get("data_free") else "best_on_val"
