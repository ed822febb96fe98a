"""Reliability: crashes, concurrency, corruption, unsafe checkpoints and training faults lose nothing.

Every fault is injected for real: processes are killed with SIGKILL at chosen moments, files of a store
written by the CLI are truncated or flipped, a pickle that would run code is handed over as a teacher,
the learning rate is made to blow up, the disk fills (a tiny tmpfs). The CLI runs use tiny synthetic
data so each takes seconds; the longer scenarios are marked ``slow`` (``make test-slow``).
"""
from __future__ import annotations

import csv
import errno
import functools
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kdlab.errors import StoreError, TrainingError
from kdlab.store import StageStore
from kdlab.store.fileio import load_weights
from tests.helpers.cli import ROOT, kdlab_env, read_results, run_kdlab, trained

TINY = ["preset=none", "data=synthetic", "data.n_train=256", "data.n_test=64", "data.batch_size=64",
        "logger=csv", "callbacks.progress=plain", "trainer.max_epochs=1", "optimizer.lr=0.05"]
THREE = ["pipeline=dense", "pipeline.chain=[plain4,plain2,plain2]"]


def kd(args: list[str], out: Path, run_dir: Path, **kw) -> subprocess.CompletedProcess:
    return run_kdlab(TINY + list(args), out, run_dir, synth=False, **kw)


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("kdlab: error:")]


def done_stages(store: Path) -> dict[str, int]:
    """{key: mtime_ns of DONE} of every stage marked done (not those quarantined as <key>.corrupt-*)."""
    return {p.parent.name: p.stat().st_mtime_ns for p in store.glob("*/DONE") if "." not in p.parent.name}


def assert_store_consistent(store: Path) -> None:
    """Every stage marked done verifies (files present, checksums right); nothing else claims to be done."""
    s = StageStore(store, on_corrupt="fail")
    for key in done_stages(store):
        assert s.lookup(key) is not None


def csv_epochs(run_dir: Path, stage: str) -> list[int]:
    """The epochs a run's CSV log holds validation results for (what that run trained)."""
    with open(run_dir / "csv" / stage / "metrics.csv") as f:
        return sorted({int(row["epoch"]) for row in csv.DictReader(f) if row.get("val/acc")})


class Evil:
    """A pickle payload: unpickling it would create ``marker`` (via os.system)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class EvilOpen:
    """The same through open(): unpickling it would create ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


# -- 1. crash and resume: write ordering ---------------------------------------------------------------
def test_commit_writes_tmp_fsync_rename_and_marker_last(tmp_path, monkeypatch):
    import kdlab.store.stage_store as st

    events: list[tuple[str, str]] = []
    real_replace, real_fsync = os.replace, os.fsync

    def replace(src, dst):
        assert Path(src).name.startswith(f".{Path(dst).name}.tmp-"), (src, dst)  # written under a temporary name
        events.append(("rename", Path(dst).name))
        real_replace(src, dst)

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}").rsplit("/", 1)[-1]))
        real_fsync(fd)

    monkeypatch.setattr(st.os, "replace", replace)
    monkeypatch.setattr(st.os, "fsync", fsync)
    StageStore(tmp_path).commit("k", {"w": torch.ones(3)}, {"name": "teacher"})
    renames = [name for kind, name in events if kind == "rename"]
    assert renames == ["model.pt", "meta.json", "DONE"]  # the marker comes last
    for name in renames:  # each file is fsynced under its temporary name before the rename
        i = events.index(("rename", name))
        assert any(kind == "fsync" and n.startswith(f".{name}.tmp-") for kind, n in events[:i])
    marker = json.loads((tmp_path / "k" / "DONE").read_text())
    assert set(marker["sha256"]) == {"model.pt", "meta.json"}
    assert marker["sha256"]["model.pt"] == hashlib.sha256((tmp_path / "k" / "model.pt").read_bytes()).hexdigest()


DIE_AT = r"""
import os, signal, sys, torch
import kdlab.store.stage_store as st
victim, real = sys.argv[2], os.replace
def replace(src, dst):
    if os.path.basename(dst) == victim:  # the file is written and fsynced, not yet renamed
        os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst)
st.os.replace = replace
st.StageStore(sys.argv[1]).commit("k", {"w": torch.ones(3)}, {"name": "teacher"})
"""


@pytest.mark.parametrize("victim", ["model.pt", "meta.json", "DONE"])
def test_kill_during_commit_leaves_the_stage_not_done(tmp_path, victim):
    """SIGKILL at any point of a commit (before the weights, before the metadata, before the marker): the
    stage is simply not done; the next commit completes it."""
    r = subprocess.run([sys.executable, "-c", DIE_AT, str(tmp_path), victim], check=False, cwd=ROOT,
                       capture_output=True, text=True, env=kdlab_env())
    assert r.returncode == -signal.SIGKILL, r.stderr
    d = tmp_path / "k"
    assert not (d / "DONE").exists()
    assert list(d.glob(f".{victim}.tmp-*"))  # the killed write never reached its final name
    store = StageStore(tmp_path, on_corrupt="fail")
    assert store.lookup("k") is None
    store.commit("k", {"w": torch.full((3,), 2.0)}, {"name": "teacher"})
    assert torch.equal(store.lookup("k").state_dict()["w"], torch.full((3,), 2.0))


def test_checkpoints_left_by_a_kill_after_the_marker_are_cleaned_up(tmp_path):
    """Killed between DONE and removing work/: the stage is done; its next lookup drops the checkpoints."""
    store = StageStore(tmp_path)
    store.commit("k", {"w": torch.ones(3)}, {"name": "teacher"})
    (tmp_path / "k" / "work").mkdir()
    (tmp_path / "k" / "work" / "last.ckpt").write_bytes(b"x" * 100)
    assert store.lookup("k") is not None and not (tmp_path / "k" / "work").exists()


@pytest.mark.parametrize("failing", ["model.pt", "meta.json", "DONE"])
def test_write_error_during_commit_is_clear_and_leaves_no_done(tmp_path, monkeypatch, failing):
    """A full disk (ENOSPC, mocked) at any file of a commit: a StoreError naming the stage, no marker."""
    import kdlab.store.fileio as st  # the store writes every file through kdlab.store.fileio

    real = st.atomic_write_bytes

    def full(path, data):
        if path.name == failing:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, data)

    monkeypatch.setattr(st, "atomic_write_bytes", full)
    store = StageStore(tmp_path)
    with pytest.raises(StoreError, match="cannot write stage teacher .*No space left on device"):
        store.commit("k", {"w": torch.ones(3)}, {"name": "teacher"})
    assert not (tmp_path / "k" / "DONE").exists() and store.lookup("k") is None


# -- 2. concurrency: the lock ----------------------------------------------------------------------------
HOLD_LOCK = r"""
import sys, time
from kdlab.store import StageStore
with StageStore(sys.argv[1]).lock("k", "teacher"):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_lock_is_released_when_its_holder_is_killed(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], cwd=ROOT, env=kdlab_env(),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StoreError, match="timed out waiting for the lock of stage teacher"), \
                StageStore(tmp_path, lock_timeout=0.5).lock("k", "teacher"):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    t0 = time.monotonic()
    with StageStore(tmp_path, lock_timeout=10).lock("k", "teacher"):
        assert time.monotonic() - t0 < 5


# -- 3. integrity: source-output caches and tampered stores (in-process) ---------------------------------
def test_source_output_cache_is_checksummed(tmp_path, capsys):
    store = StageStore(tmp_path)
    payload = {"logits": torch.randn(8, 10).half(), "features": {}}
    store.save_cache("k", "d", payload)
    assert torch.equal(store.load_cache("k", "d")["logits"], payload["logits"])
    path = store.cache_path("k", "d")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert store.load_cache("k", "d") is None  # detected, dropped, recomputed by the caller
    assert "source-output cache" in capsys.readouterr().err and not path.exists()
    store.save_cache("k", "d", payload)
    path.with_suffix(".sha256").unlink()  # a cache without its checksum is not trusted either
    assert store.load_cache("k", "d") is None


@pytest.mark.parametrize("damage", ["truncate_model", "flip_model", "flip_meta", "empty_done", "done_without_sums",
                                    "missing_meta"])
def test_damaged_stage_is_never_used(tmp_path, damage, capsys):
    store = StageStore(tmp_path)
    store.commit("k", {"w": torch.arange(100.0)}, {"name": "teacher", "test_acc": 0.5})
    d = tmp_path / "k"
    if damage == "truncate_model":
        (d / "model.pt").write_bytes((d / "model.pt").read_bytes()[:100])
    elif damage in ("flip_model", "flip_meta"):
        p = d / ("model.pt" if damage == "flip_model" else "meta.json")
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 0x01
        p.write_bytes(bytes(data))
    elif damage == "empty_done":
        (d / "DONE").write_text("")
    elif damage == "done_without_sums":
        (d / "DONE").write_text('{"sha256": {}}')
    else:
        (d / "meta.json").unlink()
    with pytest.raises(StoreError, match="stored stage teacher .* is corrupted: .*set store.on_corrupt=retrain"):
        StageStore(tmp_path, on_corrupt="fail").lookup("k", "teacher")
    assert store.lookup("k", "teacher") is None  # retrain: quarantined, with a warning
    assert "kdlab: warning: stored stage teacher" in capsys.readouterr().err
    assert not d.exists() and len(list(tmp_path.glob("k.corrupt-*"))) == 1


def test_stored_weights_replaced_by_a_payload_are_refused(tmp_path):
    """Even with its checksum updated (a tampered store), a pickle that would run code is never loaded."""
    marker = tmp_path / "pwned"
    store = StageStore(tmp_path / "store")
    store.commit("k", {"w": torch.ones(3)}, {"name": "teacher"})
    d = tmp_path / "store" / "k"
    torch.save({"w": torch.ones(3), "x": Evil(marker)}, d / "model.pt")
    done = json.loads((d / "DONE").read_text())
    done["sha256"]["model.pt"] = hashlib.sha256((d / "model.pt").read_bytes()).hexdigest()
    (d / "DONE").write_text(json.dumps(done))
    record = store.lookup("k", "teacher")
    assert record is not None  # the checksum matches ...
    with pytest.raises(StoreError, match="refusing to load stored weights .*posix.system, which could run code"):
        record.state_dict()  # ... but the payload is refused
    assert not marker.exists()


@pytest.mark.parametrize("payload", [Evil, EvilOpen])
def test_load_weights_never_runs_a_payload(tmp_path, payload):
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {"w": torch.ones(2)}, "x": payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="refusing to load teacher checkpoint .*which could run code"):
        load_weights(tmp_path / "evil.pt", "teacher checkpoint")
    assert not marker.exists()


# -- 4./5. the CLI under faults: one batch of runs (forked from a warm helper, see test_bad_inputs) ----------
DIRECT = ["pipeline=direct", "pipeline.chain=[plain4,plain2]"]


def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=False,
                       capture_output=True)
    return r.returncode == 0


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    """The CLI runs of the fault tests below, started together; yields {name: (code, stdout, stderr, dir)}."""
    from tests.helpers.cli import run_cli_batch

    base = tmp_path_factory.mktemp("faults")
    marker = base / "pwned"
    torch.save({"state_dict": {"model.w": torch.ones(2)}, "callbacks": Evil(marker)}, base / "teacher.pt")
    full = _tmpfs(base / "full", "160k")  # the store on a 160 KiB disk: the first checkpoint does not fit
    scenarios = {
        "malicious_teacher": [*DIRECT, f"pipeline.teacher_checkpoint={base / 'teacher.pt'}"],
        "nan_stop": [*DIRECT, "optimizer.lr=1e30"],
        "nan_rollback": [*DIRECT, "optimizer.lr=1e30", "on_nan=rollback", "data.batch_size=16"],
    }
    if full:
        scenarios["full_disk"] = [*DIRECT, f"paths.store_dir={base / 'full'}"]
    jobs = []
    for name, args in scenarios.items():
        d = base / name
        d.mkdir()
        argv = [t for t in TINY if not any(t.startswith(a.split("=")[0] + "=") for a in args)] + args
        jobs.append({"id": name, "module": "kdlab", "argv": [*argv, f"paths.output_dir={d / 'out'}",
                                                             f"hydra.run.dir={d / 'run'}"],
                     "stdout": str(d / "stdout"), "stderr": str(d / "stderr")})
    try:
        codes = run_cli_batch(jobs)
        yield {name: (codes[name], (base / name / "stdout").read_text(), (base / name / "stderr").read_text(),
                      base / name) for name in scenarios} | {"marker": marker, "full": full, "store": base / "full"}
    finally:
        if full:
            subprocess.run(["umount", str(base / "full")], check=False)


def test_malicious_teacher_checkpoint_is_refused_and_never_runs(faults):
    code, _, stderr, d = faults["malicious_teacher"]
    assert code == 2, stderr[-3000:]
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("kdlab: error: refusing to load teacher checkpoint"), stderr
    assert "teacher.pt" in lines[0] and "posix.system, which could run code" in lines[0]
    assert "Traceback" not in stderr
    assert not faults["marker"].exists()  # the payload never ran
    assert not list((d / "out").rglob("DONE"))
    assert read_results(d / "run")["status"] == "failed"


def test_nan_loss_stops_naming_stage_epoch_and_step(faults):
    code, _, stderr, d = faults["nan_stop"]
    assert code == 1, stderr[-3000:]
    lines = error_lines(stderr)
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert re.search(r"stage 'teacher': loss is (nan|inf) at epoch 0, step \d+ \(batch \d+\)", lines[0]), lines[0]
    assert "on_nan=rollback" in lines[0]
    assert not list((d / "out").rglob("DONE"))
    res = read_results(d / "run")
    assert res["status"] == "failed" and "loss is" in res["error"]


def test_nan_rollback_gives_up_after_its_budget(faults):
    """on_nan=rollback: each NaN rolls back with lr x0.1 (a warning each), and after 3 it stops."""
    code, _, stderr, d = faults["nan_rollback"]
    assert code == 1, stderr[-3000:]
    rollbacks = [ln for ln in stderr.splitlines() if "rolled back" in ln]
    assert len(rollbacks) == 3 and all(ln.startswith("kdlab: warning: stage 'teacher': loss is") for ln in rollbacks)
    assert "(1e+29)" in rollbacks[0] and "(1e+27)" in rollbacks[2]  # the learning rate, x0.1 each time
    lines = error_lines(stderr)
    assert len(lines) == 1 and "still not finite after 3 rollbacks" in lines[0] and "stage 'teacher'" in lines[0]
    assert not list((d / "out").rglob("DONE"))


def test_full_disk_is_a_clear_error_and_leaves_the_store_consistent(faults):
    if not faults["full"]:
        pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN)")
    code, _, stderr, d = faults["full_disk"]
    assert code == 1, stderr[-3000:]
    lines = error_lines(stderr)
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert "stage 'teacher'" in lines[0] and "No space left on device" in lines[0], lines[0]
    assert not list(faults["store"].rglob("DONE"))
    assert read_results(d / "run")["status"] == "failed"


# -- 5. training faults ----------------------------------------------------------------------------------
def _poisoned_loader(n_batches: int, poison: set[int]):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_batches * 8, 4, generator=g)
    y = (x[:, 0] > 0).long()
    for b in poison:
        x[b * 8:(b + 1) * 8] = float("inf")
    ds = torch.utils.data.TensorDataset(x, y, torch.arange(len(y)))
    return torch.utils.data.DataLoader(ds, batch_size=8, shuffle=False)


def _module(on_nan: str):
    from kdlab.modules import SupervisedModule

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    return SupervisedModule(net, num_classes=2, optimizer=functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9),
                            stage="student", on_nan=on_nan)


def _fit(module, loader, epochs=1):
    import pytorch_lightning as pl

    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=loader)
    return trainer


def test_nan_rollback_restores_the_last_good_weights_and_lowers_the_lr(capsys):
    module = _module("rollback")
    start = {k: v.clone() for k, v in module.model.state_dict().items()}
    seen = []
    real = module._rollback

    def spy(where):
        real(where)
        seen.append({k: v.clone() for k, v in module.model.state_dict().items()})

    module._rollback = spy
    trainer = _fit(module, _poisoned_loader(6, {3}))
    assert module.rollbacks == 1
    assert all(torch.equal(seen[0][k], start[k]) for k in start)  # back to the epoch's starting weights
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.01)
    assert all(torch.isfinite(v).all() for v in module.model.state_dict().values())
    assert any(not torch.equal(module.model.state_dict()[k], start[k]) for k in start)  # and trained on
    assert "stage 'student': loss is nan at epoch 0, step 3 (batch 3); rolled back" in capsys.readouterr().err


def test_nan_stop_and_exhausted_rollback_raise_training_errors():
    with pytest.raises(TrainingError, match="stage 'student': loss is nan at epoch 0, step 2 .*on_nan=rollback"):
        _fit(_module("stop"), _poisoned_loader(4, {2}))
    with pytest.raises(TrainingError, match="still not finite after 3 rollbacks"):
        _fit(_module("rollback"), _poisoned_loader(6, {1, 2, 3, 4}))


# -- slow scenarios: real processes killed, four at once, a store damaged on disk ----------------------
def _start(args: list[str], out: Path, run_dir: Path) -> subprocess.Popen:
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "kdlab", *TINY, *args, f"paths.output_dir={out}", f"hydra.run.dir={run_dir}"]
    with open(run_dir.parent / f"{run_dir.name}.out", "w") as o, open(run_dir.parent / f"{run_dir.name}.err", "w") as e:
        return subprocess.Popen(cmd, cwd=ROOT, env=kdlab_env(), stdout=o, stderr=e)


def _kill_when(proc: subprocess.Popen, condition, what: str, timeout: float = 300) -> None:
    t0 = time.monotonic()
    while not condition():
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before {what}"
        assert time.monotonic() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_kill_9_at_any_point_then_rerun_resumes_and_retrains_nothing_finished(tmp_path):
    """Kill -9 during the teacher, between stages and during the student; every rerun reuses the finished
    stages (never retrained) and resumes the interrupted one from its last checkpoint."""
    out = tmp_path / "out"
    store = out / "store"
    args = [*THREE, "data.n_train=512", "trainer.max_epochs=4"]

    def ckpts(n_done: int):
        return lambda: len(done_stages(store)) == n_done and any(
            p.parent.parent.name not in done_stages(store) for p in store.glob("*/work/last.ckpt"))

    # 1) during the teacher, after its first epoch's checkpoint
    _kill_when(_start(args, out, tmp_path / "run1"), ckpts(0), "the teacher's first checkpoint")
    assert_store_consistent(store)
    assert done_stages(store) == {}

    # 2) rerun: the teacher resumes; killed as soon as the teacher is done (between stages)
    _kill_when(_start(args, out, tmp_path / "run2"), lambda: len(done_stages(store)) >= 1, "the teacher's DONE")
    assert "stage teacher: resuming from" in (tmp_path / "run2.out").read_text()
    assert csv_epochs(tmp_path / "run2", "teacher")[0] >= 1  # epoch 0 was not trained again
    assert_store_consistent(store)
    finished = done_stages(store)

    # 3) rerun: the teacher is reused; killed during the student (teacher and ta1 done)
    _kill_when(_start(args, out, tmp_path / "run3"), ckpts(2), "the student's first checkpoint")
    assert_store_consistent(store)
    assert {k: v for k, v in done_stages(store).items() if k in finished} == finished  # never rewritten
    finished = done_stages(store)
    assert len(finished) == 2

    # 4) rerun to the end: teacher and ta1 reused, the student resumed
    r = subprocess.run([sys.executable, "-m", "kdlab", *TINY, *args, f"paths.output_dir={out}",
                        f"hydra.run.dir={tmp_path / 'run4'}"], check=False, cwd=ROOT, env=kdlab_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = read_results(tmp_path / "run4")
    assert res["status"] == "completed"
    assert [s["cached"] for s in res["stages"]] == [True, True, False]
    assert "stage student: resuming from" in r.stdout
    assert csv_epochs(tmp_path / "run4", "student")[0] >= 1
    assert len(res["stages"][2]["val_curve"]) == 4  # the resumed stage's curve covers every epoch
    teacher = json.loads((store / res["stages"][0]["store_key"] / "meta.json").read_text())
    assert len(teacher["val_curve"]) == 4
    assert {k: v for k, v in done_stages(store).items() if k in finished} == finished
    assert_store_consistent(store)
    assert not list(store.glob("*/work"))  # finished stages drop their checkpoints


@pytest.mark.slow
def test_four_processes_train_the_shared_teacher_once(tmp_path):
    """Four runs started together need the same teacher (different students): one trains it, three wait
    for the lock and reuse it."""
    out = tmp_path / "out"
    procs = [_start(["pipeline=direct", "pipeline.chain=[plain4,plain2]", "trainer.max_epochs=2",
                     f"distill.temperature={t}"], out, tmp_path / f"run{t}") for t in (1, 2, 3, 4)]
    codes = [p.wait(timeout=900) for p in procs]
    assert codes == [0, 0, 0, 0], [(tmp_path / f"run{t}.err").read_text()[-2000:] for t in (1, 2, 3, 4)]
    results = [read_results(tmp_path / f"run{t}") for t in (1, 2, 3, 4)]
    teachers = [r["stages"][0] for r in results]
    assert len({t["store_key"] for t in teachers}) == 1
    assert sum(not t["cached"] for t in teachers) == 1  # trained exactly once
    assert len({t["test_acc"] for t in teachers}) == 1
    assert all(trained(r)[-1:] == ["student"] for r in results)  # each run's own student
    assert len({r["stages"][1]["store_key"] for r in results}) == 4
    waited = sum("waiting for stage teacher" in (tmp_path / f"run{t}.out").read_text() for t in (1, 2, 3, 4))
    assert waited + sum(t["cached"] for t in teachers) >= 3
    assert_store_consistent(out / "store")
    assert len(done_stages(out / "store")) == 5


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_corrupted_store_files_are_retrained_with_a_warning_or_fail(tmp_path):
    out = tmp_path / "out"
    store = out / "store"
    r = kd(THREE, out, tmp_path / "run1")
    assert r.returncode == 0, r.stderr[-3000:]
    keys = {s["name"]: s["store_key"] for s in read_results(tmp_path / "run1")["stages"]}

    # a truncated model.pt, a flipped byte in meta.json, a garbage DONE: each stage retrained, with a warning
    model = store / keys["teacher"] / "model.pt"
    model.write_bytes(model.read_bytes()[:1000])
    _flip(store / keys["ta1"] / "meta.json")
    (store / keys["student"] / "DONE").write_text("{not json")
    r = kd(THREE, out, tmp_path / "run2")
    assert r.returncode == 0, r.stderr[-3000:]
    warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("kdlab: warning: stored stage")]
    assert len(warnings) == 3, r.stderr
    assert f"stored stage teacher ({store / keys['teacher']}) is corrupted: model.pt fails its checksum" \
        in warnings[0]
    assert "stored stage ta1" in warnings[1] and "meta.json fails its checksum" in warnings[1]
    assert "stored stage student" in warnings[2] and "unreadable completion marker" in warnings[2]
    assert trained(read_results(tmp_path / "run2")) == ["teacher", "ta1", "student"]
    assert len(list(store.glob("*.corrupt-*"))) == 3  # kept aside for inspection, never used
    assert_store_consistent(store)

    # with store.on_corrupt=fail: one clear line, exit 1, nothing used or rewritten
    _flip(store / keys["teacher"] / "model.pt")
    before = done_stages(store)
    r = kd([*THREE, "store.on_corrupt=fail"], out, tmp_path / "run3")
    assert r.returncode == 1
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("kdlab: error: stored stage teacher") and "model.pt fails its checksum" in lines[0]
    assert "store.on_corrupt=retrain" in lines[0]
    assert done_stages(store) == before

    # a stored model.pt replaced by a payload, its checksum updated: refused when a later stage needs it
    marker = tmp_path / "pwned"
    torch.save({"w": torch.ones(2), "x": Evil(marker)}, store / keys["teacher"] / "model.pt")
    done = json.loads((store / keys["teacher"] / "DONE").read_text())
    done["sha256"]["model.pt"] = hashlib.sha256((store / keys["teacher"] / "model.pt").read_bytes()).hexdigest()
    (store / keys["teacher"] / "DONE").write_text(json.dumps(done))
    r = kd([*THREE, "distill.temperature=2"], out, tmp_path / "run4")  # ta1 and student retrain from the teacher
    assert r.returncode == 1, r.stderr[-3000:]
    lines = error_lines(r.stderr)
    assert len(lines) == 1 and "refusing to load stored weights" in lines[0] and "could run code" in lines[0]
    assert not marker.exists()
    assert len(done_stages(store)) == 3  # nothing new marked done
