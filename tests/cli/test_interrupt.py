"""SIGTERM (SLURM preemption, Kubernetes, ``timeout``) and SIGINT (Ctrl-C) during a run: one line naming
the signal and the stage, exit status 128 + the signal number, results.json ``"status": "interrupted"``,
and a store the rerun of the same command resumes from (finished stages reused, the interrupted one
resumed from its last epoch checkpoint).

The end-to-end tests run the real CLI and send the signal once the run is inside the stage to interrupt
(seen in its log); the others run the pipeline in this process with the signal sent from inside a stage.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from filelock import FileLock

from kdlab.errors import Interrupted, install_interrupt_handlers, restore_interrupt_handlers
from tests.helpers.cli import ROOT, SYNTH, kdlab_env, read_results

THREE = [*SYNTH, "pipeline=dense", "pipeline.chain=[plain4,plain2,plain2]", "trainer.max_epochs=1"]
RESUME = "rerun the same command to resume"


def line_re(signame: str, where: str) -> str:
    return rf"kdlab: interrupted by {signame} {re.escape(where)}; {RESUME}"


# -- helpers: the CLI in the background, its output in files (polled; no pipe to fill) ----------------
def start(args: list[str], out: Path, run_dir: Path, multirun: bool = False) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "kdlab", *(["-m"] if multirun else []), *args, f"paths.output_dir={out}",
           f"hydra.{'sweep' if multirun else 'run'}.dir={run_dir}"]
    log = run_dir.parent / run_dir.name
    with open(f"{log}.out", "w") as o, open(f"{log}.err", "w") as e:
        return subprocess.Popen(cmd, cwd=ROOT, env=kdlab_env(), stdout=o, stderr=e)


def output(run_dir: Path) -> tuple[str, str]:
    log = run_dir.parent / run_dir.name
    return Path(f"{log}.out").read_text(), Path(f"{log}.err").read_text()


def signal_when(proc: subprocess.Popen, condition, what: str, signum: int, timeout: float = 240) -> int:
    """Send ``signum`` once ``condition()`` holds; the exit status."""
    t0 = time.monotonic()
    while not condition():
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before {what}"
        assert time.monotonic() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.02)
    proc.send_signal(signum)
    try:
        return proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()


def training(run_dir: Path, stage: str):
    """Whether the run's log says it started training ``stage``."""
    return lambda: re.search(rf"stage {stage} \(\w+\): training", output(run_dir)[0]) is not None


def last_line(stderr: str) -> str:
    return [ln for ln in stderr.splitlines() if ln.strip()][-1]


def done_keys(store: Path) -> set[str]:
    return {p.parent.name for p in store.glob("*/DONE")}


# -- end to end ---------------------------------------------------------------------------------------
@pytest.mark.slow  # a long CLI run: in make test-slow (CI runs both)
def test_sigterm_during_a_stage_then_the_rerun_resumes(tmp_path):
    """SIGTERM during ta1, after its first epoch's checkpoint: exit 143, one line, results.json interrupted
    with the teacher listed; the rerun of the same command reuses the teacher and resumes ta1."""
    out, store = tmp_path / "out", tmp_path / "out" / "store"
    args = [*THREE, "+pipeline.per_stage.ta1.max_epochs=12"]

    def ta1_checkpointed() -> bool:
        return len(done_keys(store)) == 1 and any(p.parent.parent.name not in done_keys(store)
                                                  for p in store.glob("*/work/last.ckpt"))

    run1 = tmp_path / "run1"
    rc = signal_when(start(args, out, run1), ta1_checkpointed, "ta1's first checkpoint", signal.SIGTERM)
    stdout, stderr = output(run1)
    assert rc == 128 + signal.SIGTERM == 143, stderr[-3000:]
    assert re.fullmatch(line_re("SIGTERM", "during stage ta1"), last_line(stderr)), stderr[-3000:]
    assert stderr.count("kdlab: interrupted") == 1 and "Traceback" not in stderr
    res = read_results(run1)
    assert res["status"] == "interrupted"
    assert res["error"] == "interrupted by SIGTERM during stage ta1"
    assert [s["name"] for s in res["stages"]] == ["teacher"] and "traceback" not in res
    teacher_key = res["stages"][0]["store_key"]
    assert done_keys(store) == {teacher_key}  # the interrupted stage is not marked done
    (ta1_key,) = {p.parent.parent.name for p in store.glob("*/work/last.ckpt")}
    lock = FileLock(str(store / f"{ta1_key}.lock"))
    lock.acquire(timeout=0)  # released (raises Timeout if it were still held)
    lock.release()

    run2 = tmp_path / "run2"
    proc = start(args, out, run2)
    rc = proc.wait(timeout=300)
    stdout, stderr = output(run2)
    assert rc == 0, stderr[-3000:]
    res = read_results(run2)
    assert res["status"] == "completed"
    assert [(s["name"], s["cached"]) for s in res["stages"]] == [("teacher", True), ("ta1", False),
                                                                  ("student", False)]
    assert res["stages"][1]["store_key"] == ta1_key
    assert "stage ta1: resuming from" in stdout and "last.ckpt" in stdout
    assert len(res["stages"][1]["val_curve"]) == 12  # the resumed stage's curve covers every epoch
    assert done_keys(store) == {s["store_key"] for s in res["stages"]}


def test_sigint_during_the_first_stage(tmp_path):
    """Ctrl-C while the teacher trains: exit 130, one line, no traceback, nothing marked done."""
    out, run = tmp_path / "out", tmp_path / "run"
    args = [*THREE, "+pipeline.per_stage.teacher.max_epochs=50"]
    rc = signal_when(start(args, out, run), training(run, "teacher"), "the teacher's start", signal.SIGINT)
    _, stderr = output(run)
    assert rc == 128 + signal.SIGINT == 130, stderr[-3000:]
    assert re.fullmatch(line_re("SIGINT", "during stage teacher"), last_line(stderr)), stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    res = read_results(run)
    assert (res["status"], res["error"]) == ("interrupted", "interrupted by SIGINT during stage teacher")
    assert res["stages"] == []
    assert not done_keys(out / "store")


def test_sigterm_stops_a_sweep_and_its_summary_names_the_job(tmp_path):
    """In a sweep the interrupted job is reported as interrupted, the next job never starts, and the
    process exits 143."""
    out, sweep = tmp_path / "out", tmp_path / "sweep"
    args = [*THREE, "+pipeline.per_stage.teacher.max_epochs=50", "seed=0,1"]
    rc = signal_when(start(args, out, sweep, multirun=True), training(sweep, "teacher"), "job 0's teacher",
                     signal.SIGTERM)
    _, stderr = output(sweep)
    assert rc == 143, stderr[-3000:]
    assert re.fullmatch(line_re("SIGTERM", "during stage teacher of job 0"), last_line(stderr)), stderr[-3000:]
    assert "1 job(s), 0 completed, 0 failed, 1 interrupted (0)" in stderr
    assert "job 0 interrupted: interrupted by SIGTERM during stage teacher" in stderr
    assert "Traceback" not in stderr
    assert read_results(sweep / "0")["status"] == "interrupted"
    assert not (sweep / "1").exists()  # the next job was not started


# -- in this process ----------------------------------------------------------------------------------
def compose(tmp_path: Path, *overrides: str) -> dict:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from kdlab.cli.hydra_app import CONF_DIR, register_configs

    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=[
                *SYNTH, "trainer.max_epochs=1", "callbacks.progress=none", "logger=none",
                f"paths.output_dir={tmp_path}", *overrides])
    finally:
        GlobalHydra.instance().clear()
    return OmegaConf.to_container(cfg, resolve=True)


def sentinel(signum, frame):  # a handler of the caller's, to be put back
    raise AssertionError("the caller's handler ran")


@pytest.fixture
def caller_handlers():
    """Installs the caller's own handlers; checks that they are the ones in place afterwards (and the caller's
    ``sys.unraisablehook``, which kdlab replaces while its handlers are installed)."""
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    hook = sys.unraisablehook
    for s in before:
        signal.signal(s, sentinel)
    yield
    now = {s: signal.getsignal(s) for s in before}
    for s, h in before.items():
        signal.signal(s, h)
    assert all(h is sentinel for h in now.values()), now
    assert sys.unraisablehook is hook


def test_run_pipeline_restores_the_handlers_after_a_real_stage(tmp_path, caller_handlers):
    """After a completed run (Lightning registers and restores its own SIGTERM handler inside) the caller's
    handlers are back; while it runs they are kdlab's."""
    from kdlab.pipeline import runner

    seen = {}
    real = runner.train_stage

    def spy(*a, **kw):
        seen.update({s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)})
        seen["unraisablehook"] = sys.unraisablehook
        return real(*a, **kw)

    cfg = compose(tmp_path, "pipeline=single", "model=plain2")
    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(runner, "train_stage", spy)
        res = runner.run_pipeline(cfg, tmp_path / "run")
    finally:
        mp.undo()
    assert res["status"] == "completed"
    assert seen and all(h is not sentinel and callable(h) for h in seen.values())
    assert seen["unraisablehook"].__name__ == "_redeliver"  # an Interrupted swallowed by a finalizer comes back


def test_run_pipeline_restores_the_handlers_after_a_failure(tmp_path, monkeypatch, caller_handlers):
    from kdlab.pipeline import runner

    def boom(*a, **kw):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(runner, "build_datamodule", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        runner.run_pipeline(compose(tmp_path, "pipeline=single", "model=plain2"), tmp_path / "run")
    res = read_results(tmp_path / "run")
    assert res["status"] == "failed" and res["error"] == "RuntimeError: disk on fire"


@pytest.mark.parametrize(("where", "signum"), [("data", signal.SIGTERM), ("stage", signal.SIGINT),
                                               ("lightning", signal.SIGTERM)])
def test_a_signal_inside_run_pipeline_is_recorded_as_interrupted(tmp_path, monkeypatch, caller_handlers,
                                                                  where, signum):
    """A signal while the data loads or during a stage; and Lightning's own SIGTERMException (what it raises
    when it handled the SIGTERM itself) counts as SIGTERM too."""
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from kdlab.pipeline import runner

    def signalled(*a, **kw):
        if where == "lightning":
            raise SIGTERMException
        os.kill(os.getpid(), signum)
        time.sleep(30)  # the handler raises before this ends
        raise AssertionError("no Interrupted")

    monkeypatch.setattr(runner, "build_datamodule" if where == "data" else "train_stage", signalled)
    cfg = compose(tmp_path, *THREE[len(SYNTH):])
    t0 = time.monotonic()
    with pytest.raises(Interrupted) as info:
        runner.run_pipeline(cfg, tmp_path / "run")
    assert time.monotonic() - t0 < 25
    e = info.value
    expected = "before the first stage" if where == "data" else "during stage teacher"
    assert (e.signum, e.exit_code, e.where) == (signum, 128 + signum, expected)
    assert str(e) == f"interrupted by {signal.Signals(signum).name} {expected}"
    res = read_results(tmp_path / "run")
    assert (res["status"], res["error"], res["stages"]) == ("interrupted", str(e), [])
    assert not done_keys(tmp_path / "store")


def test_interrupted_is_not_an_exception():
    e = Interrupted(signal.SIGTERM)
    assert not isinstance(e, Exception)  # `except Exception` clean-up blocks let it through
    assert (e.exit_code, e.signame, str(e)) == (143, "SIGTERM", "interrupted by SIGTERM before the first stage")
    assert Interrupted(signal.SIGINT, "during stage ta1").exit_code == 130


def _in_child(body) -> int:
    """Run ``body`` in a forked child; its exit status (negative: killed by that signal)."""
    pid = os.fork()
    if pid == 0:  # never return into pytest from the child
        code = 99
        try:
            code = body()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def test_a_forked_child_keeps_the_default_behaviour():
    """A DataLoader worker forked while kdlab's handlers are installed dies of SIGTERM as by default."""
    previous = install_interrupt_handlers()
    try:
        def child() -> int:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)
            return 0

        assert _in_child(child) == -signal.SIGTERM
    finally:
        restore_interrupt_handlers(previous)


def test_a_second_signal_lets_the_cleanup_finish_and_a_third_exits_at_once():
    def child() -> int:
        install_interrupt_handlers()
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)
            return 1
        except Interrupted:
            os.kill(os.getpid(), signal.SIGINT)  # ignored: the clean-up goes on
            time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGTERM)  # the third: exit now, 128 + 15
            time.sleep(10)
            return 2

    assert _in_child(child) == 143


def test_a_signal_inside_a_finalizer_still_stops_the_run():
    """A signal whose handler runs inside a finalizer, where Python swallows every exception (a ``__del__`` run
    by the garbage collector: Lightning's ``Profiler.__del__`` when an earlier Trainer is collected), still
    stops the run once the finalizer has returned, and counts as one signal (a lost Ctrl-C let a run go on
    to its end)."""
    from kdlab.errors import _INTERRUPTS

    state = {"finalizer_finished": False}

    class Finalized:
        def __del__(self):
            signal.raise_signal(signal.SIGINT)  # its handler runs here, inside the finalizer
            state["finalizer_finished"] = True

    def child() -> int:
        install_interrupt_handlers()
        t0 = time.monotonic()
        try:
            obj = Finalized()
            del obj
            time.sleep(5)
            return 1  # the signal was lost
        except Interrupted as e:
            if state["finalizer_finished"]:
                return 2  # the handler did not run inside the finalizer: nothing was tested
            if e.signum != signal.SIGINT or _INTERRUPTS["received"] != [signal.SIGINT]:
                return 3
            return 0 if time.monotonic() - t0 < 2 else 4

    assert _in_child(child) == 0


def test_sweep_summary_names_interrupted_jobs(tmp_path, capsys):
    from kdlab.cli.hydra_app import SweepStatus

    for name, status, error in (("0", "completed", None), ("1", "failed", "boom"),
                                ("2", "interrupted", "interrupted by SIGTERM during stage ta1")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps({"status": status, "error": error}))
    failed = SweepStatus.summarize(tmp_path)
    err = capsys.readouterr().err
    assert sorted(d.name for d in failed) == ["1", "2"]
    assert "3 job(s), 1 completed, 1 failed, 1 interrupted (1, 2)" in err
    assert "job 2 interrupted: interrupted by SIGTERM during stage ta1" in err


def test_in_a_ddp_fit_the_signal_goes_to_lightnings_synchronized_stop(monkeypatch):
    """With more than one process fitting, kdlab's handler does not raise mid-step (the other ranks would
    wait in a collective): a SIGTERM is left to Lightning's handler, a Ctrl-C is handed to it as a SIGTERM,
    and Lightning's SIGTERMException then counts as the signal received."""
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from kdlab import errors

    calls = []
    monkeypatch.setattr(errors, "_distributed_fit", lambda: lambda signum, frame: calls.append(signum))
    previous = install_interrupt_handlers()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # no Interrupted raised here
        stop = errors.interruption(SIGTERMException())
    finally:
        restore_interrupt_handlers(previous)
    assert calls == [signal.SIGTERM]
    assert isinstance(stop, Interrupted) and stop.signum == signal.SIGINT and stop.exit_code == 130
    assert errors.interruption(ValueError("x")) is None
