"""The Trainer, the loggers and the callbacks come from config (conf/trainer, conf/logger, conf/callbacks)
through Hydra's instantiate: an entry added on the command line reaches every stage's Trainer."""
from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
from hydra.utils import get_class, instantiate
from pytorch_lightning.callbacks import Callback, RichProgressBar

from kdlab.pipeline.callbacks import EpochLines, build_callbacks, progress_display
from kdlab.pipeline.loggers import StageWandbLogger, build_loggers, logger_entries
from tests.helpers.config import compose_config, compose_dictconfig

CONF = Path(__file__).resolve().parents[2] / "conf"
TINY = ["preset=none", "data=synthetic", "data.n_train=256", "data.n_test=64", "data.batch_size=64",
        "pipeline=direct", "pipeline.chain=[plain4,plain2]", "distill=kd", "trainer.max_epochs=1"]

FITS: list[tuple[int, str]] = []  # (id of the callback, stage) per fit
TRAINERS: list[int] = []  # max_epochs of every Trainer built by RecordingTrainer


class Recorder(Callback):
    def setup(self, trainer, pl_module, stage):
        if stage == "fit":
            FITS.append((id(self), pl_module.stage_name))


class RecordingTrainer(pl.Trainer):
    def __init__(self, *args, **kwargs):
        TRAINERS.append(kwargs.get("max_epochs"))
        super().__init__(*args, **kwargs)


def test_added_trainer_callback_and_logger_reach_every_stage(tmp_path, capsys):
    from kdlab.pipeline.runner import run_pipeline

    FITS.clear()
    TRAINERS.clear()
    cfg = compose_dictconfig(*TINY, f"paths.store_dir={tmp_path / 'store'}", "logger=csv", "callbacks.progress=plain",
                             f"trainer._target_={__name__}.RecordingTrainer",
                             "+pipeline.per_stage.teacher.max_epochs=2",
                             f"+callbacks.recorder._target_={__name__}.Recorder",
                             "+logger.extra._target_=pytorch_lightning.loggers.CSVLogger",
                             "+logger.extra.save_dir=extra_csv", "+logger.extra.version=''")
    results = run_pipeline(cfg, tmp_path / "run")
    assert results["status"] == "completed"
    # one fresh callback per stage, fitted once each, in order
    assert [stage for _, stage in FITS] == ["teacher", "student"] and len({i for i, _ in FITS}) == 2
    # the configured Trainer class built every Trainer (the config check's, then one per stage), with the
    # stage's own epochs
    assert TRAINERS[-2:] == [2, 1]
    for stage in ("teacher", "student"):  # both loggers wrote, each under its own save_dir
        assert (tmp_path / "run" / "csv" / stage / "metrics.csv").is_file()
        assert (tmp_path / "run" / "extra_csv" / stage / "metrics.csv").is_file()
    err = capsys.readouterr().err  # the progress display (callbacks.progress=plain) names each stage
    assert "[teacher] epoch 2/2" in err and "[student] epoch 1/1" in err
    # stage_seconds: the whole stage, at least its fit
    for s in results["stages"]:
        assert s["stage_seconds"] >= s["train_seconds"] > 0


def test_none_groups_build_nothing(tmp_path):
    cfg = compose_config("logger=none", "callbacks=none")
    assert logger_entries(cfg["logger"]) == {}
    assert build_callbacks(cfg["callbacks"]) == []
    assert build_loggers(cfg["logger"], tmp_path, {"name": "s", "role": "student"}, "g", {}) == []


@pytest.mark.parametrize("mode,kind", [("plain", EpochLines), ("rich", RichProgressBar), ("none", type(None))])
def test_progress_setting_picks_the_display(mode, kind):
    cbs = build_callbacks(compose_config(f"callbacks.progress={mode}")["callbacks"])
    assert [type(c) for c in cbs] == ([] if kind is type(None) else [kind])
    assert isinstance(progress_display(mode), kind)


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF / "logger").glob("*.yaml")))
def test_every_logger_config_names_lightning_loggers(name):
    entries = logger_entries(compose_config(f"logger={name}")["logger"])
    assert ("csv" in entries) == (name != "none")
    for node in entries.values():
        assert issubclass(get_class(node["_target_"]), pl.loggers.Logger)


def test_wandb_entry_is_one_offline_run_per_stage(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    stage = {"name": "student", "role": "student", "method": "kd", "dataset": "synthetic", "arch": "plain2"}
    loggers = build_loggers(compose_config("logger=wandb", "logger.wandb.tags=[x]")["logger"], tmp_path, stage,
                            "grp", {"stage": stage})
    wb = [lg for lg in loggers if isinstance(lg, StageWandbLogger)]
    assert len(wb) == 1
    init = wb[0]._wandb_init
    assert init["group"] == "grp" and init["job_type"] == "student" and init["name"] == "grp/student"
    assert init["mode"] == "offline" and init["tags"] == ["kd", "synthetic", "plain2", "x"]
    assert init["config"] == {"stage": stage} and "anonymous" not in init
    assert Path(init["dir"]) == tmp_path


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF / "trainer").glob("*.yaml")))
def test_every_trainer_config_instantiates(name):
    node = compose_config(f"trainer={name}", "trainer.accelerator=cpu", "trainer.precision=32-true",
                          "trainer.devices=1")["trainer"]
    node.pop("strategy", None)  # ddp needs several processes; its arguments are checked in test_ddp
    node.pop("sync_batchnorm", None)
    trainer = instantiate(node, _partial_=True)(logger=False, enable_checkpointing=False,
                                                enable_progress_bar=False)
    assert isinstance(trainer, pl.Trainer) and trainer.max_epochs == node["max_epochs"]
