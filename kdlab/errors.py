"""kdlab's error types.

Every error a user can cause ends the program with one clear line and a fixed exit status:
2 for bad configuration or input, 1 for runtime failures (missing data, NaN loss, I/O), 128 + the signal
number for a run stopped by SIGTERM (143: SLURM preemption, Kubernetes, ``timeout``) or SIGINT (130: Ctrl-C).
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any


class KdlabError(Exception):
    """Base class: a failure with a one-line message meant for the user."""

    exit_code = 1


class ConfigError(KdlabError):
    """Bad configuration or input (exit status 2)."""

    exit_code = 2


class DataError(KdlabError):
    """Data missing, empty or malformed on disk (exit status 1)."""

    exit_code = 1


class TrainingError(KdlabError):
    """A stage failed while training, e.g. a NaN loss (exit status 1)."""

    exit_code = 1


class StoreError(KdlabError):
    """The stage store cannot be read or written (exit status 1)."""

    exit_code = 1


class Interrupted(BaseException):
    """The run was stopped by SIGTERM or SIGINT (exit status 128 + the signal number).

    A BaseException, like KeyboardInterrupt, so that ``except Exception`` clean-up blocks let it through.
    ``where`` ("during stage ta1", "before the first stage") is filled in by the pipeline runner.
    """

    def __init__(self, signum: int, where: str | None = None) -> None:
        super().__init__(int(signum))
        self.signum = int(signum)
        try:
            self.signame = signal.Signals(self.signum).name
        except ValueError:
            self.signame = f"signal {self.signum}"
        self.where = where
        self.exit_code = 128 + self.signum

    def __str__(self) -> str:
        return f"interrupted by {self.signame} {self.where or 'before the first stage'}"


def interruption(e: BaseException) -> Interrupted | None:
    """``e`` as an :class:`Interrupted`, or None if it is no interruption. Lightning's own SIGTERM handling
    (``SIGTERMException``, a SystemExit, raised where kdlab's handler is not installed: outside the main
    thread, or under another handler) counts as SIGTERM."""
    if isinstance(e, Interrupted):
        return e
    if type(e).__name__ == "SIGTERMException" and isinstance(e, SystemExit):
        received = _INTERRUPTS["received"]  # a Ctrl-C that a DDP fit handed to Lightning as a SIGTERM
        return Interrupted(received[0] if received else signal.SIGTERM)
    return None


INTERRUPT_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Shared by nested installs (``python -m kdlab`` around ``run_pipeline``): the signals received since the
# outermost install. The first raises Interrupted; a second is ignored so that the clean-up it started
# (checkpoints, loggers, results.json, the stage lock) finishes; a third exits at once.
_INTERRUPTS: dict[str, Any] = {"depth": 0, "received": [], "forwarding": False, "redeliver": False,
                                "unraisablehook": None}
REDELIVER_SECONDS = 0.01


def _on_signal(owner: int, signum: int, frame: Any) -> None:
    if os.getpid() != owner:  # a forked child (a DataLoader worker) inherited the handler: the default
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    if _INTERRUPTS["forwarding"]:
        return
    if _INTERRUPTS["redeliver"]:  # the first one, swallowed by a finalizer (see _redeliver): not a new signal
        _INTERRUPTS["redeliver"] = False
        raise Interrupted(signum)
    received = _INTERRUPTS["received"]
    received.append(signum)
    if len(received) == 1:
        lightning = _distributed_fit()
        if lightning is None:
            raise Interrupted(signum)
        # A DDP fit: raising here, at any point of this rank's step, would leave the other ranks waiting in
        # a collective. Lightning's own SIGTERM handler (which has just run, if the signal is SIGTERM) stops
        # every rank at the same step instead, raising SIGTERMException (see interruption()).
        if signum != signal.SIGTERM:  # Ctrl-C: handed to Lightning as a SIGTERM (kdlab's part is a no-op)
            _INTERRUPTS["forwarding"] = True
            try:
                lightning(signal.SIGTERM, frame)
            finally:
                _INTERRUPTS["forwarding"] = False
    if len(received) >= 3:  # the clean-up seems stuck: go now (the store's locks die with the process)
        print(f"kdlab: interrupted again by {signal.Signals(signum).name}; exiting without clean-up",
              file=sys.stderr, flush=True)
        os._exit(128 + signum)


def _redeliver(unraisable: Any) -> None:
    """``sys.unraisablehook`` while the handlers are installed. A signal's handler runs in whatever Python code
    the main thread is executing, which may be a finalizer: a ``__del__`` called by the garbage collector (e.g.
    Lightning's ``Profiler.__del__`` when an earlier Trainer is collected) or a weakref callback. Python does
    not let an exception out of a finalizer; it hands it to this hook and carries on, so the Interrupted would
    be lost and the run would go on. Here it is delivered again, as the same signal sent to this process a
    moment later (from a timer thread), when the finalizer has returned; every other exception goes to the
    previous hook."""
    exc = unraisable.exc_value
    if isinstance(exc, Interrupted) and _INTERRUPTS["depth"] > 0:
        _INTERRUPTS["redeliver"] = True
        timer = threading.Timer(REDELIVER_SECONDS, os.kill, (os.getpid(), exc.signum))
        timer.daemon = True
        timer.start()
        return
    (_INTERRUPTS["unraisablehook"] or sys.__unraisablehook__)(unraisable)


def _distributed_fit() -> Any:
    """Lightning's SIGTERM handler while a Trainer fits with more than one process, else None."""
    handler = signal.getsignal(signal.SIGTERM)
    if type(handler).__name__ != "_HandlersCompose":  # pytorch_lightning's, registered for a fit only
        return None
    dist = sys.modules.get("torch.distributed")
    try:
        if dist is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return handler
    except Exception:  # noqa: BLE001, S110 - no process group: not distributed
        pass
    return None


def install_interrupt_handlers() -> dict[int, Any] | None:
    """Make SIGTERM and SIGINT raise :class:`Interrupted`; returns the previous handlers for
    :func:`restore_interrupt_handlers`. Outside the main thread (where Python cannot set handlers) nothing
    changes and None is returned."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = {int(s): signal.getsignal(s) for s in INTERRUPT_SIGNALS}
    if _INTERRUPTS["depth"] == 0:
        _INTERRUPTS.update(received=[], redeliver=False, unraisablehook=sys.unraisablehook)
        sys.unraisablehook = _redeliver
    _INTERRUPTS["depth"] += 1
    owner = os.getpid()

    def handler(signum: int, frame: Any) -> None:
        _on_signal(owner, signum, frame)

    for s in INTERRUPT_SIGNALS:
        signal.signal(s, handler)
    return previous


def restore_interrupt_handlers(previous: dict[int, Any] | None) -> None:
    """Put back the handlers :func:`install_interrupt_handlers` replaced."""
    if previous is None:
        return
    for s, h in previous.items():
        signal.signal(s, h if h is not None else signal.SIG_DFL)
    _INTERRUPTS["depth"] = max(0, _INTERRUPTS["depth"] - 1)
    if _INTERRUPTS["depth"] == 0 and sys.unraisablehook is _redeliver:
        sys.unraisablehook = _INTERRUPTS["unraisablehook"] or sys.__unraisablehook__


@contextmanager
def interrupt_handlers() -> Iterator[None]:
    """SIGTERM / SIGINT raise :class:`Interrupted` inside the block; the previous handlers come back after."""
    previous = install_interrupt_handlers()
    try:
        yield
    finally:
        restore_interrupt_handlers(previous)


def unknown_name(kind: str, name: object, known: Iterable[str]) -> ConfigError:
    """The error for an unknown registry name, listing the known ones."""
    known = sorted(known)
    return ConfigError(f"unknown {kind} {name!r}; known: {', '.join(known)}")


def warn(message: str) -> None:
    """A warning the user must see (a corrupted stage being retrained, a growing chain): one line on stderr,
    where errors go too, while the log (progress, INFO) goes to stdout and the run's log file."""
    print(f"kdlab: warning: {message}", file=sys.stderr, flush=True)
