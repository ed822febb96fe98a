"""kdlab/store/stage_store.py, the content-addressed stage store, tested directly (in-process, a few seconds).

The key of a stage (stable, order-free, sensitive to every nested value), atomic JSON writes, commit and
lookup, quarantine of a damaged stage, the read-only store of DDP's other ranks, the source-output cache and
its checksum, load_weights' refusals, and the per-stage lock between threads and processes.

Faults injected for real through the CLI and in subprocesses (SIGKILL during a commit, a killed lock holder,
a full disk, each kind of damage to a stored stage, pickles that would run code via os.system or open) are
in tests/store/test_reliability.py; this file does not repeat them.
"""
from __future__ import annotations

import copy
import hashlib
import json
import multiprocessing
import os
import re
import threading
import time
from pathlib import Path

import pytest
import torch

import kdlab.store.stage_store as st
from kdlab.errors import ConfigError, StoreError
from kdlab.store import StageStore, canonical_json, stage_key
from kdlab.store.fileio import atomic_write_json, load_weights, sha256_file

SPEC = {"name": "student", "model": {"arch": "plain2", "kwargs": {}}, "sources": ["abc"],
        "distill": {"strategy": "kd", "temperature": 4.0}}


def reordered(obj):
    """The same mapping with every dict's keys inserted in reverse order (lists keep their order)."""
    if isinstance(obj, dict):
        return {k: reordered(obj[k]) for k in reversed(list(obj))}
    if isinstance(obj, list):
        return [reordered(v) for v in obj]
    return obj


def state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"conv.weight": torch.randn(4, 3, 3, 3), "bn.num_batches_tracked": torch.tensor(7),
            "fc.weight": torch.randn(5, 4).t(),  # not contiguous
            "fc.bias": torch.randn(5, requires_grad=True), "half": torch.randn(6).bfloat16()}


# -- keys and canonical JSON ---------------------------------------------------------------------------------
def test_canonical_json_is_sorted_compact_and_stringifies():
    assert canonical_json({"b": 1, "a": {"d": [2, 1], "c": None}}) == '{"a":{"c":null,"d":[2,1]},"b":1}'
    assert canonical_json({"root": Path("/x/y")}) == '{"root":"/x/y"}'  # default=str
    assert canonical_json(SPEC) == canonical_json(reordered(SPEC))


def test_stage_key_is_stable_order_free_and_sensitive_to_nested_values(monkeypatch):
    key = stage_key(SPEC)
    assert re.fullmatch(r"[0-9a-f]{20}", key)
    # pinned: a change of the key derivation orphans every stored stage (bump STORE_SCHEMA on purpose)
    assert key == "26e95b71c4042f9a4bc2"
    assert key == hashlib.sha256(canonical_json({"store_schema": st.STORE_SCHEMA, **SPEC}).encode()).hexdigest()[:20]
    assert stage_key(reordered(SPEC)) == key and stage_key(copy.deepcopy(SPEC)) == key
    for path, value in [(("model", "kwargs", "width"), 2), (("distill", "temperature"), 4.5),
                        (("model", "arch"), "plain4"), (("sources",), ["abd"]), (("extra",), None)]:
        changed = copy.deepcopy(SPEC)
        node = changed
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value
        assert stage_key(changed) != key, path
    assert stage_key({**SPEC, "sources": ["b", "a"]}) != stage_key({**SPEC, "sources": ["a", "b"]})
    monkeypatch.setattr(st, "STORE_SCHEMA", st.STORE_SCHEMA + 1)
    assert stage_key(SPEC) != key  # a new schema makes new keys


# -- atomic JSON -----------------------------------------------------------------------------------------------
def test_atomic_write_json_replaces_whole_files_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "deep" / "er" / "results.json"  # parents are created
    atomic_write_json(path, {"b": [1, 2], "root": tmp_path})
    assert path.read_text().endswith("}\n")
    assert json.loads(path.read_text()) == {"b": [1, 2], "root": str(tmp_path)}
    atomic_write_json(path, {"b": 3})
    assert json.loads(path.read_text()) == {"b": 3}

    def fail(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(st.os, "replace", fail)
    with pytest.raises(OSError, match="No space"):
        atomic_write_json(path, {"b": 4})
    assert json.loads(path.read_text()) == {"b": 3}  # the old file is whole
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.json"]  # no temporary left behind


# -- commit, lookup, read --------------------------------------------------------------------------------------
def test_commit_then_lookup_returns_the_same_weights_and_meta(tmp_path):
    sd, meta = state(), {"name": "teacher", "test_acc": 0.875, "val_curve": [0.5, 0.75], "cfg": {"lr": 0.1}}
    key = stage_key(SPEC)
    record = StageStore(tmp_path).commit(key, sd, meta)
    assert record.dir == tmp_path / key and record.meta == meta
    assert sorted(p.name for p in (tmp_path / key).iterdir()) == ["DONE", "meta.json", "model.pt"]
    sums = json.loads((tmp_path / key / "DONE").read_text())["sha256"]
    assert sums == {name: sha256_file(tmp_path / key / name) for name in ("model.pt", "meta.json")}

    found = StageStore(tmp_path, on_corrupt="fail").lookup(key)  # a fresh instance, as another run sees it
    assert found is not None and found.key == key and found.meta == meta
    loaded = found.state_dict()
    assert list(loaded) == list(sd)
    for name, tensor in sd.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor.detach()), name
        assert not loaded[name].requires_grad
    assert StageStore(tmp_path).read(key).meta == meta


def test_missing_and_unfinished_stages(tmp_path):
    store = StageStore(tmp_path)
    assert store.lookup("0" * 20) is None
    with pytest.raises(StoreError, match="stage teacher is not in the store"):
        store.read("0" * 20, "teacher")
    # a stage being trained (checkpoints in work/, no DONE yet) is not done, and its checkpoints stay for
    # the resume: lookup neither quarantines nor cleans it
    (store.work_dir("k") / "last.ckpt").parent.mkdir(parents=True)
    (store.work_dir("k") / "last.ckpt").write_bytes(b"ckpt")
    assert store.lookup("k") is None
    assert (store.work_dir("k") / "last.ckpt").read_bytes() == b"ckpt" and not list(tmp_path.glob("*.corrupt-*"))
    store.commit("k", {"w": torch.ones(2)}, {"name": "teacher"})  # finishing the stage drops work/
    assert not store.work_dir("k").exists() and store.lookup("k") is not None


def test_recommit_replaces_the_stage(tmp_path):
    store = StageStore(tmp_path)
    store.commit("k", {"w": torch.ones(3)}, {"name": "teacher", "run": 1})
    store.commit("k", {"w": torch.full((3,), 2.0)}, {"name": "teacher", "run": 2})
    record = store.lookup("k")
    assert record.meta["run"] == 2 and torch.equal(record.state_dict()["w"], torch.full((3,), 2.0))


def test_truncated_weights_are_quarantined_for_inspection_then_retrained(tmp_path, capsys):
    store = StageStore(tmp_path)
    store.commit("k", {"w": torch.arange(1000.0)}, {"name": "teacher"})
    model = tmp_path / "k" / "model.pt"
    truncated = model.read_bytes()[: model.stat().st_size // 2]
    model.write_bytes(truncated)
    with pytest.raises(StoreError, match=r"stored stage teacher \(.*\) is corrupted: model.pt fails its checksum"):
        StageStore(tmp_path, on_corrupt="fail").lookup("k", "teacher")
    assert (tmp_path / "k" / "DONE").exists()  # on_corrupt=fail moves nothing

    assert store.lookup("k", "teacher") is None
    assert "moved aside and retraining it" in capsys.readouterr().err
    (moved,) = tmp_path.glob("k.corrupt-*")
    assert re.fullmatch(rf"k\.corrupt-\d{{8}}-\d{{6}}-{os.getpid()}", moved.name)
    assert sorted(p.name for p in moved.iterdir()) == ["DONE", "meta.json", "model.pt"]  # kept, as it was
    assert (moved / "model.pt").read_bytes() == truncated
    assert not (tmp_path / "k").exists()
    store.commit("k", {"w": torch.zeros(2)}, {"name": "teacher"})  # retrained: the key is free again
    assert torch.equal(store.lookup("k").state_dict()["w"], torch.zeros(2))


def test_read_only_store_writes_nothing(tmp_path):
    """The store of DDP's non-zero ranks: it reads, and leaves every decision and every write to rank 0."""
    absent = tmp_path / "absent"
    reader = StageStore(absent, writer=False)
    assert not absent.exists()  # not even created
    assert reader.commit("k", {"w": torch.ones(1)}, {"name": "x"}).meta == {"name": "x"}
    reader.save_cache("k", "d", {"logits": torch.ones(1)})
    with reader.lock("k"):
        pass
    assert not absent.exists()

    StageStore(tmp_path / "s").commit("k", {"w": torch.ones(1)}, {"name": "x"})
    (tmp_path / "s" / "k" / "work").mkdir()
    reader = StageStore(tmp_path / "s", writer=False)
    assert reader.lookup("k") is not None and (tmp_path / "s" / "k" / "work").exists()  # rank 0 cleans up
    (tmp_path / "s" / "k" / "meta.json").write_text("{}")
    assert reader.lookup("k") is None  # damaged: not used ...
    assert (tmp_path / "s" / "k" / "DONE").exists() and not list((tmp_path / "s").glob("*.corrupt-*"))  # ... kept


def test_bad_store_settings():
    with pytest.raises(ConfigError, match="unknown store.on_corrupt 'ignore'; known: retrain, fail"):
        StageStore("/nonexistent", on_corrupt="ignore")


def test_store_root_that_cannot_be_created(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="cannot create store directory .*set paths.store_dir"):
        StageStore(tmp_path / "file" / "store")


# -- source-output caches --------------------------------------------------------------------------------------
class GetCwd:
    """A pickle that would call os.getcwd() when loaded (harmless, but code all the same)."""

    def __reduce__(self):
        return os.getcwd, ()


def test_cache_round_trips_and_wrong_checksums_are_recomputed(tmp_path, capsys):
    store = StageStore(tmp_path)
    torch.manual_seed(0)
    payload = {"logits": torch.randn(16, 10).half(), "features": {"layer1": torch.randn(16, 4, 2, 2)},
               "index": torch.arange(16)}
    assert store.load_cache("k", "data0") is None  # absent: no warning
    assert capsys.readouterr().err == ""
    store.save_cache("k", "data0", payload)
    path = store.cache_path("k", "data0")
    assert path == tmp_path / "k" / "cache" / "data0.pt"
    assert path.with_suffix(".sha256").read_text() == hashlib.sha256(path.read_bytes()).hexdigest()
    loaded = store.load_cache("k", "data0")
    assert set(loaded) == set(payload) and set(loaded["features"]) == {"layer1"}
    assert torch.equal(loaded["logits"], payload["logits"]) and loaded["logits"].dtype == torch.float16
    assert torch.equal(loaded["features"]["layer1"], payload["features"]["layer1"])
    assert torch.equal(loaded["index"], payload["index"])
    assert store.load_cache("k", "data1") is None  # another data set's cache is another file

    digest = bytearray(path.with_suffix(".sha256").read_bytes())  # a flipped byte in the checksum file
    digest[0] = ord("0") if digest[0] != ord("0") else ord("1")
    path.with_suffix(".sha256").write_bytes(bytes(digest))
    assert store.load_cache("k", "data0") is None
    assert "recomputing it" in capsys.readouterr().err
    assert not path.exists() and not path.with_suffix(".sha256").exists()  # dropped, to be rebuilt


def test_cache_replaced_by_a_pickle_with_code_is_not_loaded(tmp_path, capsys, monkeypatch):
    """A cache swapped for a pickle that calls a function, its checksum updated: refused, then recomputed."""
    store = StageStore(tmp_path)
    store.save_cache("k", "d", {"logits": torch.ones(2, 2)})
    path = store.cache_path("k", "d")
    torch.save({"logits": torch.ones(2, 2), "x": GetCwd()}, path)
    path.with_suffix(".sha256").write_text(hashlib.sha256(path.read_bytes()).hexdigest())
    calls = []
    monkeypatch.setattr(os, "getcwd", lambda: calls.append(1) or "/")
    assert store.load_cache("k", "d") is None and calls == []
    assert "source-output cache" in capsys.readouterr().err and not path.exists()


def test_read_only_store_leaves_a_damaged_cache_to_rank_zero(tmp_path):
    StageStore(tmp_path).save_cache("k", "d", {"logits": torch.ones(2)})
    path = StageStore(tmp_path).cache_path("k", "d")
    path.write_bytes(path.read_bytes()[:-1])
    assert StageStore(tmp_path, writer=False).load_cache("k", "d") is None
    assert path.exists() and path.with_suffix(".sha256").exists()


# -- load_weights ----------------------------------------------------------------------------------------------
def test_load_weights_accepts_plain_weights_and_says_why_it_refuses(tmp_path):
    nested = {"state_dict": {"w": torch.ones(2)}, "epoch": 3, "names": ["a", "b"]}
    torch.save(nested, tmp_path / "ok.pt")
    loaded = load_weights(tmp_path / "ok.pt")
    assert loaded["epoch"] == 3 and loaded["names"] == ["a", "b"] and torch.equal(loaded["state_dict"]["w"],
                                                                               torch.ones(2))
    with pytest.raises(ConfigError, match="teacher checkpoint '.*missing.pt' does not exist"):
        load_weights(tmp_path / "missing.pt", "teacher checkpoint")
    with pytest.raises(StoreError, match="stored weights '.*' is a directory"):
        load_weights(tmp_path, "stored weights", error=StoreError)
    (tmp_path / "text.pt").write_text("not weights at all")
    with pytest.raises(ConfigError, match="cannot load x '.*text.pt': it is not a PyTorch weights file"):
        load_weights(tmp_path / "text.pt", "x")
    whole = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(StoreError, match="cannot load x .*truncated"):
        load_weights(tmp_path / "cut.pt", "x", error=StoreError)


# -- the per-stage lock ------------------------------------------------------------------------------------------
def _hold_lock(root: str, log: str, rounds: int, hold: float) -> None:
    """In a child process: take the stage lock ``rounds`` times, logging enter/exit, holding it ``hold`` s."""
    store = StageStore(root)
    for _ in range(rounds):
        with store.lock("k", "teacher"):
            with open(log, "a") as f:
                f.write(f"enter {os.getpid()}\n")
            time.sleep(hold)
            with open(log, "a") as f:
                f.write(f"exit {os.getpid()}\n")


def test_lock_serializes_processes(tmp_path):
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    log = tmp_path / "log"
    procs = [ctx.Process(target=_hold_lock, args=(str(tmp_path), str(log), 2, 0.2)) for _ in range(3)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 60
    for p in procs:
        p.join(timeout=max(0.1, deadline - time.monotonic()))
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
        p.join()
    assert not alive, "lock holders did not finish within 60 s"
    assert [p.exitcode for p in procs] == [0, 0, 0]
    events = log.read_text().split()
    pairs = list(zip(events[0::2], events[1::2]))  # ("enter", pid), ("exit", pid), ...
    assert len(pairs) == 12
    # strictly one holder at a time: every enter is followed by the same process's exit
    for (kind_in, pid_in), (kind_out, pid_out) in zip(pairs[0::2], pairs[1::2]):
        assert (kind_in, kind_out) == ("enter", "exit") and pid_in == pid_out, pairs
    assert len({pid for _, pid in pairs}) == 3


def test_lock_waits_for_a_holder_then_is_free_after_an_exception(tmp_path, caplog):
    holding, release = threading.Event(), threading.Event()

    def holder():
        with StageStore(tmp_path).lock("k", "teacher"):
            holding.set()
            release.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert holding.wait(10)
        with pytest.raises(StoreError, match=r"timed out waiting for the lock of stage teacher \(k\)"), \
                StageStore(tmp_path, lock_timeout=0.1).lock("k", "teacher"):
            pass
        threading.Timer(0.3, release.set).start()
        t0 = time.monotonic()
        with caplog.at_level("INFO", logger="kdlab.store"), \
                StageStore(tmp_path, lock_timeout=20).lock("k", "teacher") as recorded:
            waited = time.monotonic() - t0
        assert waited >= 0.2, waited  # it waited for the holder instead of running alongside
        assert waited - 0.05 <= recorded.seconds <= waited  # what the runner records as lock_wait_seconds
        assert "waiting for stage teacher (k): another process is training it" in caplog.text
        assert f"waited {recorded.seconds:.1f} s for stage teacher (k)" in caplog.text
    finally:
        release.set()
        thread.join(10)
    with pytest.raises(RuntimeError), StageStore(tmp_path).lock("k"):
        raise RuntimeError("training failed")
    with StageStore(tmp_path, lock_timeout=0).lock("k") as free:  # released by the failure: free at once
        assert free.seconds == 0.0  # no wait recorded for a free lock


# -- view caches on disk (kdlab/store/view_cache.py: the format; the store: where, who writes, the errors) ----------
def _fill_rows(arrays):
    """Row r of every array holds r (the logits: r + class index / 10)."""
    import numpy as np

    for name, a in arrays.items():
        rows = np.arange(a.shape[0], dtype=np.float32).reshape(-1, *([1] * (a.ndim - 1)))
        a[:] = rows + (np.arange(a.shape[-1], dtype=np.float32) / 10 if name == "logits" else 0)


def test_view_cache_round_trip_and_a_damaged_array_is_recomputed(tmp_path, capsys):
    from kdlab.store.view_cache import FullLogits, ViewCache

    store = StageStore(tmp_path)
    written = store.write_view_cache("k", "dk", 3, 2, FullLogits(4), {"features/f": ((2,), "float16")}, _fill_rows)
    assert isinstance(written, ViewCache) and not list((tmp_path / "k" / "cache").glob(".dk.views.tmp-*"))
    read = store.load_view_cache("k", "dk")
    logits, feats = read.lookup(torch.tensor([2, 0]), torch.tensor([1, 0]))  # row i * V + v
    torch.testing.assert_close(logits.float(), torch.tensor([[5.0, 5.1, 5.2, 5.3], [0.0, 0.1, 0.2, 0.3]]), atol=5e-3, rtol=0)
    assert feats["f"].tolist() == [[5.0, 5.0], [0.0, 0.0]] and read.taps == ["f"]
    manifest = json.loads(store.view_manifest("k", "dk").read_text())
    assert manifest["n"] == 3 and manifest["views"] == 2 and manifest["logits"] == {"codec": "fp16"}
    first = tmp_path / "k" / "cache" / manifest["arrays"]["logits"]["file"]
    first.write_bytes(first.read_bytes()[:-2] + b"\x00\x00")  # same size, other bytes
    assert store.load_view_cache("k", "dk") is None
    assert f"{first.name} fails its checksum; recomputing it" in capsys.readouterr().err
    assert not store.has_view_cache("k", "dk") and not first.exists()  # the writer dropped the damaged cache


def test_a_failed_view_cache_write_leaves_no_manifest_and_no_work_files(tmp_path):
    import errno

    from kdlab.store.view_cache import TopKLogits

    def full_disk(arrays):
        raise OSError(errno.ENOSPC, "No space left on device")

    store = StageStore(tmp_path)
    with pytest.raises(StoreError, match=r"cannot write the view cache of stage k to '.*cache': No space left"):
        store.write_view_cache("k", "dk", 4, 3, TopKLogits(10, 2), {}, full_disk)
    assert not store.has_view_cache("k", "dk") and list((tmp_path / "k" / "cache").iterdir()) == []

    def interrupted(arrays):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # not an OSError: raised as it is, and still nothing left
        store.write_view_cache("k", "dk", 4, 3, TopKLogits(10, 2), {}, interrupted)
    assert list((tmp_path / "k" / "cache").iterdir()) == []


def test_a_read_only_store_writes_its_view_cache_to_a_private_temporary_copy(tmp_path):
    from kdlab.store.view_cache import FullLogits

    reader = StageStore(tmp_path / "store", writer=False)
    cache = reader.write_view_cache("k", "dk", 2, 2, FullLogits(3), {}, _fill_rows)
    private = Path(cache.arrays["logits"].filename).parent
    assert not (tmp_path / "store").exists() and private.is_dir()  # the shared store is untouched
    assert reader.load_view_cache("k", "dk") is None  # no manifest anywhere
    cache.close()
    assert not private.exists()


def test_test_outputs_added_after_the_marker_leave_the_stage_done(tmp_path):
    """A stage's test-split outputs (cache/test.pt) beside a done stage: DONE, and so lookup, do not depend on
    them, whether written before the marker (a stage trained now) or after it (one an older kdlab stored)."""
    store = StageStore(tmp_path)
    store.commit("k", {"w": torch.ones(2)}, {"name": "teacher"})
    done = (tmp_path / "k" / "DONE").read_bytes()
    outputs = {"logits": torch.randn(5, 3).half(), "labels": torch.tensor([0, 1, 2, 0, 1])}
    assert store.load_test_outputs("k") is None
    store.save_test_outputs("k", outputs)
    assert (tmp_path / "k" / "DONE").read_bytes() == done and store.lookup("k") is not None
    assert sorted(p.name for p in (tmp_path / "k" / "cache").iterdir()) == ["test.pt", "test.sha256"]
    loaded = store.load_test_outputs("k")
    assert torch.equal(loaded["logits"], outputs["logits"]) and torch.equal(loaded["labels"], outputs["labels"])
    StageStore(tmp_path, writer=False).save_test_outputs("k2", outputs)  # a read-only store (DDP rank > 0)
    assert not (tmp_path / "k2").exists()
    path = tmp_path / "k" / "cache" / "test.pt"
    path.write_bytes(path.read_bytes()[:-1])  # damaged: not trusted, dropped; the stage itself stays done
    assert store.load_test_outputs("k") is None and not path.exists() and store.lookup("k") is not None
