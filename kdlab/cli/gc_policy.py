"""The cyclic garbage collector around a run's start-up and exit: CPython's documented ``gc.disable`` /
``gc.freeze`` pattern, applied by ``python -m kdlab``.

Importing torch and Lightning (and through Lightning torchmetrics, which imports torchvision, scipy and
matplotlib) creates some 750,000 long-lived objects. With the collector on, every few hundred new objects
trigger a collection that walks the young ones and, each time the older generations fill, all of them again:
on a 2-core machine ``import torch, pytorch_lightning, hydra`` took 4.3-5.4 s with the collector on and
2.9-3.3 s with it off, for some 330 objects it found to collect. At interpreter exit CPython collects twice more
over everything: 1.1-1.3 s after importing torch and Lightning, 0.2 s with them frozen. So a run

1. ``hold()``: imports with the collector off (the only garbage they leave is those few hundred objects);
2. ``release()``: once they are imported (after the config is checked, before Hydra runs the job or the
   sweep) moves every object alive then (the libraries) into the permanent generation, which later
   collections skip, and turns the collector back on: the training loop's own garbage is collected as
   before, without rescanning the libraries at each full collection;
3. ``at_exit()``: freezes again just before ``sys.exit``, so the exit collections skip the run's objects. The
   atexit handlers (logging's flush, ``weakref.finalize``) still run; open files outside reference cycles are
   closed as their modules are cleared. kdlab writes everything it keeps (checkpoints, results.json, logs)
   and closes it before this point.
"""
from __future__ import annotations

import gc


def hold() -> None:
    """No cyclic collection while the libraries are imported (``release`` turns it back on)."""
    gc.disable()


def release() -> None:
    """Freeze what is alive now and collect as usual from here on. Acts only after ``hold``, once."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


def at_exit() -> None:
    """The exit collections skip everything alive now."""
    gc.freeze()
