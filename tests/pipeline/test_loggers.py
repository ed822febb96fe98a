"""Loggers from config (kdlab/pipeline/loggers.py): each Lightning logger gets only the arguments its class
takes, and a bad entry (an argument its class does not take, a library that is not installed) is a config
error before any data loads, in ``python -m kdlab``'s preflight."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from pytorch_lightning.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger

from kdlab.errors import ConfigError
from kdlab.pipeline.loggers import StageWandbLogger, build_loggers, check_loggers, stage_kwargs

STAGE = {"name": "student", "role": "student", "method": "kd", "dataset": "synthetic", "arch": "plain2"}
HAS_MLFLOW = importlib.util.find_spec("mlflow") is not None


@pytest.mark.parametrize(("cls", "expected"), [
    (CSVLogger, {"save_dir": "/run/csv", "name": "student"}),
    (TensorBoardLogger, {"save_dir": "/run/csv", "name": "student"}),
    (MLFlowLogger, {"save_dir": "/run/csv", "run_name": "g/student"}),  # MLflow has no `name`: its run's name
    (StageWandbLogger, {"save_dir": "/run/csv", "name": "student", "stage": STAGE, "group": "g", "run_config": {}}),
])
def test_each_logger_gets_the_arguments_its_class_takes(cls, expected):
    assert stage_kwargs(cls, "csv", {"_target_": "x"}, Path("/run"), STAGE, "g", {}) == expected


def test_save_dir_is_the_entrys_relative_to_the_run_dir_or_absolute():
    assert stage_kwargs(CSVLogger, "csv", {"save_dir": "logs"}, Path("/run"), STAGE, "g", {})["save_dir"] == "/run/logs"
    assert stage_kwargs(CSVLogger, "csv", {"save_dir": "/abs"}, Path("/run"), STAGE, "g", {})["save_dir"] == "/abs"


def test_an_argument_the_class_does_not_take_is_one_line():
    with pytest.raises(ConfigError, match=r"logger.csv: CSVLogger got an unexpected keyword argument 'bogus'; "
                                          r"it takes: save_dir, name, version"):
        check_loggers({"csv": {"_target_": "pytorch_lightning.loggers.CSVLogger", "bogus": 1}})
    check_loggers({"csv": {"_target_": "pytorch_lightning.loggers.CSVLogger", "version": ""}, "off": None})


@pytest.mark.skipif(HAS_MLFLOW, reason="mlflow is installed here")
def test_a_logger_whose_library_is_missing_says_what_to_install():
    with pytest.raises(ConfigError, match=r"logger.mlflow: MLFlowLogger needs the mlflow package, which is not "
                                          r"installed \(pip install mlflow\)"):
        check_loggers({"mlflow": {"_target_": "pytorch_lightning.loggers.MLFlowLogger"}})


def test_mlflow_takes_kdlabs_arguments(monkeypatch):
    """The docs' MLflow example: kdlab passes run_name (not name), which MLFlowLogger takes; with mlflow
    installed as the page says (stood in for here when it is not), the entry passes the check."""
    from kdlab.pipeline import loggers

    if not HAS_MLFLOW:
        monkeypatch.setattr(loggers, "find_spec", lambda name: object() if name == "mlflow" else None)
    entry = {"_target_": "pytorch_lightning.loggers.MLFlowLogger", "tracking_uri": "file:./mlruns"}
    check_loggers({"mlflow": entry})
    with pytest.raises(ConfigError, match="MLFlowLogger got an unexpected keyword argument 'name'"):
        check_loggers({"mlflow": {**entry, "name": "x"}})


@pytest.mark.skipif(not HAS_MLFLOW, reason="mlflow is not installed (pip install mlflow)")
def test_mlflow_logs_a_stage(tmp_path):
    entry = {"_target_": "pytorch_lightning.loggers.MLFlowLogger", "tracking_uri": f"file:{tmp_path / 'mlruns'}"}
    (logger,) = build_loggers({"mlflow": entry}, tmp_path, STAGE, "g", {})
    logger.log_metrics({"val/acc": 0.5}, step=0)
    run = logger.experiment.get_run(logger.run_id)
    logger.finalize("success")
    assert run.info.run_name == "g/student" and run.data.metrics["val/acc"] == 0.5


def test_preflight_refuses_a_bad_logger_before_anything_runs(tmp_path):
    from kdlab.cli.hydra_app import register_configs
    from kdlab.cli.main import check_command

    register_configs()
    with pytest.raises(ConfigError, match="logger.csv: CSVLogger got an unexpected keyword argument 'bogus'"):
        check_command(["data=synthetic", "+logger.csv.bogus=1", f"paths.output_dir={tmp_path}"])
    assert not any(tmp_path.iterdir())
