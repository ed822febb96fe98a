"""W&B: one offline run per trained stage, grouped by pipeline run, read back from wandb's own run files
(the ``run-<id>.wandb`` record log, decoded with wandb's protobuf schema)."""
from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from wandb.proto import wandb_internal_pb2

from tests.helpers.cli import ROOT, SYNTH, kdlab_env, read_results

# -- reading an offline run ------------------------------------------------------------------------------
# A .wandb file is a LevelDB-style log (wandb's "datastore"): a 7-byte header (":W&B", magic 0xBEE1, version 0),
# then 32 KiB blocks of chunks, each with a CRC32 (seeded with the chunk type), a length and a type (full,
# first, middle, last); a chunk never straddles a block and a block's tail shorter than a chunk header is zero.
# wandb >= 0.18 writes it from Go and no longer ships the Python reader, so this is that reader, in short.
BLOCK, HEADER = 32 * 1024, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(path: Path) -> list[wandb_internal_pb2.Record]:
    data = path.read_bytes()
    assert data[:HEADER] == struct.pack("<4sHB", b":W&B", 0xBEE1, 0), f"{path} is not a W&B run log"
    records, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # block trailer
            pos += BLOCK - pos % BLOCK
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if (crc, length, kind) == (0, 0, 0):  # zero padding: the rest of this block
            pos += BLOCK - pos % BLOCK
            continue
        chunk = data[pos + HEADER:pos + HEADER + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"{path}: bad checksum at {pos}"
        pos += HEADER + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def read_offline_run(run_dir: Path) -> dict:
    """The run's identity, config, history rows, summary and exit code from its .wandb file."""
    (log,) = run_dir.glob("run-*.wandb")
    out: dict = {"history": [], "summary": {}, "exit_code": None, "config": {}}
    for rec in wandb_records(log):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            out.update(run_id=r.run_id, project=r.project, group=r.run_group, job_type=r.job_type,
                       name=r.display_name, tags=list(r.tags), start_time=r.start_time.ToSeconds(),
                       start_ns=r.start_time.ToNanoseconds())
            out["config"].update({u.key: json.loads(u.value_json) for u in r.config.update})
        elif kind == "config":
            out["config"].update({u.key: json.loads(u.value_json) for u in rec.config.update})
        elif kind == "history":
            out["history"].append({"/".join(i.nested_key) or i.key: json.loads(i.value_json)
                                   for i in rec.history.item})
        elif kind == "summary":
            out["summary"].update({"/".join(u.nested_key) or u.key: json.loads(u.value_json)
                                   for u in rec.summary.update})
        elif kind == "exit":
            out["exit_code"] = rec.exit.exit_code
    return out


def offline_runs(run_dir: Path) -> list[dict]:
    """The runs in the order they started. Not by directory name: that is ``offline-run-<second>-<random id>``,
    so two stages that start within the same second would sort by their random ids."""
    runs = [read_offline_run(d) for d in (run_dir / "wandb").glob("offline-run-*")]
    return sorted(runs, key=lambda run: run["start_ns"])


# -- the CLI ---------------------------------------------------------------------------------------------
TWO_STAGES = ["+experiment=dgkd_synthetic_test", "data.n_train=320", "data.n_test=100", "trainer.max_epochs=1",
              "pipeline=direct", "pipeline.chain=[plain4,plain2]", "distill.stochastic.mode=none", "logger=wandb"]


def run_with_wandb(args: list[str], out: Path, run_dir: Path, home: Path) -> subprocess.CompletedProcess:
    """The CLI with W&B in its default mode: no WANDB_MODE, no API key, wandb's own dirs kept in ``home``."""
    ours = {a.split("=", 1)[0].lstrip("+~") for a in args}
    cmd = [sys.executable, "-m", "kdlab", *[a for a in SYNTH if a.split("=", 1)[0] not in ours], *args,
           f"paths.output_dir={out}", f"hydra.run.dir={run_dir}"]
    env = kdlab_env({"WANDB_CONFIG_DIR": str(home / "config"), "WANDB_CACHE_DIR": str(home / "cache"),
                     "WANDB_DATA_DIR": str(home / "data")})
    env.pop("WANDB_MODE")
    env.pop("WANDB_SILENT")
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.slow  # a long CLI run: in make test-slow (CI runs both)
def test_one_offline_wandb_run_per_trained_stage(tmp_path):
    out = tmp_path / "out"
    r = run_with_wandb(TWO_STAGES, out, tmp_path / "run1", tmp_path / "home")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "anonymous" not in r.stderr  # Lightning's no-op argument is not passed on
    res = read_results(tmp_path / "run1")
    runs = offline_runs(tmp_path / "run1")
    assert [run["job_type"] for run in runs] == ["teacher", "student"]  # offline: no API key, no WANDB_MODE
    group = runs[0]["group"]
    assert group.startswith("dgkd_synthetic_test-") and group.endswith("run1")  # the pipeline run
    for run, st in zip(runs, res["stages"]):
        assert run["group"] == group and run["project"] == "kdlab"
        assert run["name"] == f"{group}/{st['name']}"
        assert {"dgkd", "synthetic", st["arch"]} <= set(run["tags"])
        # config = the stage's resolved config + the pipeline's
        stage_cfg, pipeline_cfg = run["config"]["stage"], run["config"]["pipeline"]
        assert (stage_cfg["name"], stage_cfg["role"], stage_cfg["arch"]) == (st["name"], st["role"], st["arch"])
        assert stage_cfg["store_key"] == st["store_key"] and stage_cfg["sources"] == st["sources"]
        assert stage_cfg["max_epochs"] == 1 and stage_cfg["seed"] == 0
        assert pipeline_cfg["pipeline"]["chain"] == ["plain4", "plain2"]
        assert pipeline_cfg["distill"]["temperature"] == 4.0 and pipeline_cfg["data"]["n_train"] == 320
        # the logged metrics, as the training logged them
        logged = set().union(*run["history"])
        for metric in ("train/loss", "train/acc", "val/loss", "val/acc", "val/acc_best", "test/acc"):
            assert metric in logged, (st["name"], metric)
        assert run["summary"]["val/acc_best"] == pytest.approx(st["val_acc"])
        assert run["summary"]["test/acc"] == pytest.approx(st["test_acc"])  # the best-on-val checkpoint, last
        assert run["exit_code"] == 0  # finished
    assert "train/loss_kd" in set().union(*runs[1]["history"]) and runs[1]["config"]["stage"]["source_keys"] == \
        [res["stages"][0]["store_key"]]
    # each stage's run ended before the next one started
    teacher_end = max(row["_timestamp"] for row in runs[0]["history"])
    assert runs[1]["start_time"] >= int(teacher_end)
    assert runs[0]["run_id"] != runs[1]["run_id"]

    # the same pipeline again: both stages come from the store, no new W&B run, metrics still in results
    r = run_with_wandb(TWO_STAGES, out, tmp_path / "run2", tmp_path / "home")
    assert r.returncode == 0, r.stderr[-3000:]
    res2 = read_results(tmp_path / "run2")
    assert all(s["cached"] for s in res2["stages"])
    assert [s["test_acc"] for s in res2["stages"]] == [s["test_acc"] for s in res["stages"]]
    assert offline_runs(tmp_path / "run2") == []


@pytest.mark.slow  # 15-30 s of CLI runs: in make test-slow (CI runs both)
def test_a_failed_stage_ends_its_wandb_run_as_failed(tmp_path):
    r = run_with_wandb([*TWO_STAGES, "optimizer.lr=1e30"], tmp_path / "out", tmp_path / "run", tmp_path / "home")
    assert r.returncode == 1 and "loss is nan" in r.stderr, r.stderr[-3000:]
    (run,) = offline_runs(tmp_path / "run")  # the teacher failed; the student never started
    assert run["job_type"] == "teacher" and run["exit_code"] == 1


@pytest.mark.parametrize(("requested", "env", "expected"), [
    ("auto", {}, "offline"),
    ("auto", {"WANDB_API_KEY": "x" * 40}, "online"),
    ("auto", {"WANDB_MODE": "disabled", "WANDB_API_KEY": "x" * 40}, "disabled"),
    ("offline", {"WANDB_API_KEY": "x" * 40}, "offline"),
    ("online", {}, "online"),
])
def test_wandb_mode(monkeypatch, requested, env, expected):
    from kdlab.pipeline.loggers import wandb_mode

    for key in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert wandb_mode(requested) == expected


def test_wandb_logger_config_is_the_default(compose):
    """``logger=wandb`` is the root config's default; its keys are those the docs name."""
    logger = compose()["logger"]
    assert logger["wandb"]["mode"] == "auto" and logger["wandb"]["project"] == "kdlab" and logger["csv"]
    assert set(logger["wandb"]) >= {"project", "entity", "mode", "tags"}
