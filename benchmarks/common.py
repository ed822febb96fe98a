"""Shared pieces of kdlab's benchmarks: options, the real pipeline run in-process, the source fixture,
the steady-state batch timer, and the result format every bench script returns.

Every benchmark runs kdlab through its real code path: the Hydra config is composed exactly as
``python -m kdlab`` composes it, and ``kdlab.pipeline.runner.run_pipeline`` trains the stages (store,
source-output cache, DistillModule, Lightning Trainer, checkpoints, validation, test). Two measurements
are added from outside, without changing what kdlab does:

* ``BatchTimer``, a Lightning callback added to the stage's Trainer through config, times the training batches of each
  epoch from the start of batch 1 to the end of the last batch (batch 0, the iterator's creation, the
  validation loop and the epoch-end hooks are outside the timed span); it reads ``perf_counter`` twice per
  batch and does nothing else.
* the stage's wall time, which kdlab itself records (``stage_seconds`` in results.json: model and sources
  built, caches loaded, fit, the test passes): the "stage time".
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pytorch_lightning.callbacks import Callback

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CHAIN = ["plain10", "plain8", "plain6", "plain4", "plain2"]  # the default DGKD pipeline (make run)


@dataclass
class Options:
    """What every bench script accepts. ``quick`` shrinks everything for the smoke test."""

    quick: bool = False
    workdir: Path = ROOT / ".bench"  # git-ignored: the fixture store, run dirs, peer data
    subset: int | None = 5000  # training images before the 10% validation split (the bench's own size)
    test_subset: int = 2000  # test images (each stage is tested twice; the figure does not depend on it)
    epochs: int = 20  # epochs of a timed student stage without live sources (cached, alone): ~10 s quiet
    live_epochs: int = 3  # epochs of a timed stage whose sources run live (~7x slower per epoch): ~10 s quiet
    repeats: int = 2  # interleaved repeats where two sides are compared
    chain: list[str] = field(default_factory=lambda: list(CHAIN))
    peer_epochs: int | None = None  # None: the kd_fashion_mnist recipe's (8, the CPU preset)
    peer_mode: str = "torchdistill"  # torchdistill | classic
    memory_full: bool = False  # measure the real `make run` instead of its 1-epoch variant
    threads: int | None = None  # torch/OpenMP threads of every process (None: torch's default, one per core)

    @classmethod
    def make(cls, quick: bool = False, **kw: Any) -> Options:
        o = cls(quick=quick)
        if quick:  # a 3-model chain (2 sources), a few hundred images, one epoch, no repeats
            o.subset, o.test_subset, o.epochs, o.live_epochs, o.repeats, o.peer_epochs = 400, 200, 1, 1, 1, 1
            o.chain = ["plain6", "plain4", "plain2"]
        for k, v in kw.items():
            if v is not None:
                setattr(o, k, v)
        o.workdir = Path(o.workdir)
        return o

    @property
    def store(self) -> Path:
        return self.workdir / ("store-quick" if self.quick else "store")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["workdir"] = str(self.workdir)
        return d


def add_options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--subset", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=None, help="epochs of cached / alone stages (default 20)")
    ap.add_argument("--live-epochs", type=int, default=None, help="epochs of stages with live sources (default 3)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--chain", default=None, help="comma-separated DGKD chain, largest first; the last is the "
                    "student (default plain10,plain8,plain6,plain4,plain2)")
    ap.add_argument("--peer-epochs", type=int, default=None)
    ap.add_argument("--peer-mode", choices=["torchdistill", "classic"], default=None)
    ap.add_argument("--memory-full", action="store_true", default=None,
                    help="measure the real `make run` (all its epochs; many minutes)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch/OpenMP threads in every benchmark process (default: torch's, one per core); "
                    "1 keeps ratios meaningful on a machine shared with other jobs")


def options_from(a: argparse.Namespace) -> Options:
    return Options.make(quick=a.quick, workdir=a.workdir, subset=a.subset, epochs=a.epochs, live_epochs=a.live_epochs,
                        repeats=a.repeats, chain=a.chain.split(",") if a.chain else None, peer_epochs=a.peer_epochs, peer_mode=a.peer_mode,
                        memory_full=a.memory_full, threads=a.threads)


def set_threads(n: int | None) -> None:
    """``--threads``: for this process and (through the environment) every process it starts."""
    if n is None:
        return
    import torch

    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(n)
    torch.set_num_threads(n)


def quiet() -> None:
    """The same library noise filters as ``python -m kdlab``, and no W&B network use."""
    import pytorch_lightning  # noqa: F401  (it sets its loggers' levels when imported)

    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    warnings.filterwarnings("ignore")
    for name in ("pytorch_lightning", "pytorch_lightning.utilities.rank_zero", "lightning", "lightning_fabric",
                 "lightning.pytorch", "lightning.pytorch.utilities.rank_zero", "kdlab", "torch._dynamo",
                 "torch._inductor"):
        logging.getLogger(name).setLevel(logging.ERROR)


def machine() -> dict[str, Any]:
    import torch

    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "loadavg": list(os.getloadavg())}


# -- the real pipeline, in-process ---------------------------------------------------------------------
def base_overrides(o: Options) -> list[str]:
    """The root config (make run's), sized by the options; no W&B, no progress output, a private store."""
    subset = [] if o.subset is None else [f"data.subset={o.subset}"]
    return [*subset, f"data.test_subset={o.test_subset}", "logger=csv", "callbacks.progress=none",
            f"paths.output_dir={o.workdir / 'runs'}", f"paths.store_dir={o.store}", "trainer.max_epochs=1", f"pipeline.chain=[{','.join(o.chain)}]"]


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from kdlab.cli.hydra_app import CONF_DIR, register_configs

    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return hydra_compose(config_name="config", overrides=overrides)
    finally:
        GlobalHydra.instance().clear()


class BatchTimer(Callback):
    """Steady-state training throughput: per epoch, from the start of batch ``skip`` to the end of the last
    batch (so the first batch, iterator creation, validation and epoch hooks are not timed).

    Added to every stage's Trainer through config (``+callbacks.bench_timer._target_=<this class>``, see
    :func:`run_pipeline`); each instance registers itself with the open :class:`Instruments`, records the
    module it fits and runs the ``before_fit`` hooks (f(trainer, module)) as fit starts."""

    def __init__(self, skip: int = 1):
        self.skip = skip
        self.seconds = 0.0
        self.samples = 0
        self.batches = 0
        self._t0: float | None = None
        self._t1: float | None = None
        if RECORDING:
            RECORDING[-1].timers.append(self)

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and RECORDING:
            RECORDING[-1].modules.append(pl_module)
            for hook in RECORDING[-1].before_fit:
                hook(trainer, pl_module)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t0 = self._t1 = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.skip:
            _sync(pl_module)
            self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._t0 is not None and batch_idx >= self.skip:
            # a data-free stage (DAFL) iterates step numbers: its batch is the module's generated images
            self.samples += int(batch[1].shape[0]) if isinstance(batch, (list, tuple)) else int(pl_module.batch_size)
            self.batches += 1
            if batch_idx >= trainer.num_training_batches - 1:  # a GPU's queue drains before the clock stops
                _sync(pl_module)
            self._t1 = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._t0 is not None and self._t1 is not None:
            self.seconds += self._t1 - self._t0
        self._t0 = self._t1 = None

    @property
    def rate(self) -> float | None:
        return self.samples / self.seconds if self.seconds > 0 else None


def _sync(module) -> None:
    import torch

    if module.device.type == "cuda":
        torch.cuda.synchronize(module.device)


@dataclass
class Instruments:
    timers: list[Any] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)  # from results.json (kdlab measures it)
    modules: list[Any] = field(default_factory=list)
    before_fit: list[Any] = field(default_factory=list)  # f(trainer, module), called as fit starts

    def train_timer(self) -> BatchTimer | None:
        """The timer of the Trainer that trained (the last one that saw training batches)."""
        seen = [t for t in self.timers if t.samples > 0]
        return seen[-1] if seen else None


RECORDING: list[Instruments] = []  # the open recording (run_pipeline), which new BatchTimers join
TIMER_OVERRIDE = f"+callbacks.bench_timer._target_={__name__}.BatchTimer"


def run_pipeline(overrides: list[str], run_name: str, o: Options, before_fit: list[Any] = ()
                 ) -> tuple[dict[str, Any], Instruments]:
    """Compose the config like the CLI and run the pipeline in this process; returns (results, instruments)."""
    from kdlab.pipeline.runner import run_pipeline as kdlab_run_pipeline

    cfg = compose([*overrides, TIMER_OVERRIDE])
    run_dir = o.workdir / "runs" / f"{run_name}-{os.getpid()}-{time.time_ns()}"
    rec = Instruments(before_fit=list(before_fit))
    RECORDING.append(rec)
    try:
        results = kdlab_run_pipeline(cfg, run_dir, overrides)
    finally:
        RECORDING.remove(rec)
    rec.stage_seconds = {s["name"]: s["stage_seconds"] for s in results["stages"] if not s["cached"]}
    shutil.rmtree(run_dir, ignore_errors=True)
    return results, rec


def fixture(o: Options) -> dict[str, Any]:
    """The frozen sources every student-stage benchmark uses: the default DGKD chain (plain10 -> plain8 ->
    plain6 -> plain4 -> plain2) trained for one epoch by kdlab itself, kept in the bench store (reused by
    later runs: the store is content-addressed), with the source-output caches it built on the way."""
    t0 = time.perf_counter()
    # the fixture's own student gets another seed: the timed student stages (seed offset 0) never find it
    results, rec = run_pipeline([*base_overrides(o), "+pipeline.per_stage.student.seed_offset=1000"], "fixture", o)
    stages = {s["name"]: s for s in results["stages"]}
    return {"stages": stages, "trained": [s["name"] for s in results["stages"] if not s["cached"]],
            "stage_seconds": {k: round(v, 1) for k, v in rec.stage_seconds.items()},
            "seconds": round(time.perf_counter() - t0, 1)}


def drop_stage(o: Options, key: str, store: Path | None = None) -> None:
    """Forget a timed stage so that the next run trains it again (and the bench store does not grow)."""
    store = store or o.store
    shutil.rmtree(store / key, ignore_errors=True)
    (store / f"{key}.lock").unlink(missing_ok=True)


def student_stage(o: Options, sources: int, cache: bool | None, epochs: int, extra: list[str] = (),
                  name: str = "student", before_fit: list[Any] = ()) -> dict[str, Any]:
    """Train the student (plain2) of a dense chain with the first ``sources`` chain models as its sources
    (``sources=0``: the student alone, from labels), reusing the fixture's stages from the store.

    Returns the stage's figures: stage wall time, fit time, steady-state samples/s, accuracy.
    """
    if sources == 0:
        chain = ["pipeline=single", f"pipeline.chain=[{o.chain[-1]}]", "distill=none"]
    else:
        chain = [f"pipeline.chain=[{','.join(o.chain[:sources] + o.chain[-1:])}]"]
    cache_ov = [] if cache is None else [f"distill.cache={'on' if cache else 'off'}"]
    overrides = [*base_overrides(o), *chain, *cache_ov, f"+pipeline.per_stage.student.max_epochs={epochs}",
                 *extra]
    results, rec = run_pipeline(overrides, name, o, before_fit)
    stage = results["stages"][-1]
    if stage["cached"]:
        raise RuntimeError(f"{name}: the student stage came from the store; nothing was timed")
    drop_stage(o, stage["store_key"])
    timer = rec.train_timer()
    module = rec.modules[-1] if rec.modules else None
    bank = getattr(module, "bank", None)
    return {
        "stage_seconds": round(rec.stage_seconds.get("student", float("nan")), 3),
        "fit_seconds": stage["train_seconds"],
        "samples_per_second": round(timer.rate, 1) if timer and timer.rate else None,
        "timed_samples": timer.samples if timer else 0, "timed_seconds": round(timer.seconds, 6) if timer else 0,
        "epochs": epochs, "test_acc": stage["test_acc"], "val_acc": stage["val_acc"],
        "source_forward_calls": dict(bank.forward_calls) if bank is not None else {},
    }


# -- result format -------------------------------------------------------------------------------------
def timed_fresh_stage(o: Options, overrides: list[str], name: str, batch: int) -> tuple[dict, dict, Any]:
    """Run a pipeline whose last stage must train here (it is dropped from the store afterwards, so the next
    repeat trains it again) and time its steps: (results, the steady-state figures of that stage, the
    recording). A stage from the store or one without a timed step is an error: nothing would be measured."""
    results, rec = run_pipeline(overrides, name, o)
    st = results["stages"][-1]
    if st["cached"]:
        raise RuntimeError(f"{name}: the stage {st['name']} came from the store; nothing was timed")
    drop_stage(o, st["store_key"])
    timer = rec.train_timer()
    if timer is None or not timer.samples:
        raise RuntimeError(f"{name}: no training step was timed (one batch per epoch? raise --subset)")
    return results, {
        "ms_per_step": round(1000 * batch * timer.seconds / timer.samples, 2),
        "samples_per_second": round(timer.rate, 1), "timed_steps": timer.batches,
        "timed_samples": timer.samples, "timed_seconds": round(timer.seconds, 6),  # to the us: quick stages time ~30 ms
        "stage_seconds": round(rec.stage_seconds.get(st["name"], float("nan")), 3),
        "fit_seconds": st["train_seconds"], "test_acc": st["test_acc"],
    }, rec


def figure(key: str, label: str, value: float | None, unit: str = "", target: str | None = None,
           ok: bool | None = None, note: str = "", any_size: bool = False) -> dict[str, Any]:
    """One row of the bench table. ``target`` is text like '>= 0.95'; ok is None when there is none.
    ``any_size``: the target holds at any size (an exact count or equality: calls == 0), so ``--quick`` judges
    it too; a target on a timing or accuracy ratio is judged at full size only (:func:`judge`)."""
    return {"key": key, "label": label, "value": value, "unit": unit, "target": target, "ok": ok, "note": note,
            "any_size": any_size}


QUICK_NOTE = "not judged at --quick size"


def judge(figures: list[dict[str, Any]], quick: bool) -> list[dict[str, Any]]:
    """``figures`` as reported: at ``--quick`` size a target that needs full size (tiny stages time start-up
    and overhead, not work) is shown but not judged (ok None, the note says so)."""
    for f in figures:
        if quick and f["target"] and not f.get("any_size") and f["ok"] is not None:
            f["ok"] = None
            f["note"] = f"{QUICK_NOTE}; {f['note']}" if f["note"] else QUICK_NOTE
    return figures


def check(value: float | None, op: str, bound: float) -> bool | None:
    if value is None:
        return None
    return value >= bound if op == ">=" else value <= bound


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b not in (None, 0) else None


def cli(run, description: str) -> None:
    """``python benchmarks/bench_x.py [--quick] [--out FILE]``: run one benchmark, print/write its JSON."""
    ap = argparse.ArgumentParser(description=description)
    add_options(ap)
    ap.add_argument("--out", type=Path, default=None, help="write the result JSON here")
    a = ap.parse_args()
    quiet()
    o = options_from(a)
    set_threads(o.threads)
    o.workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result = run(o)
    judge(result.get("figures", []), o.quick)
    result.setdefault("seconds", round(time.perf_counter() - t0, 1))
    text = json.dumps(result, indent=2, default=str)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text)
    else:
        print(text)


# -- Fashion-MNIST in torchvision's layout (for the DataLoader + PIL peers) ------------------------------
FASHION_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"]
FASHION_DIRS = [Path("/usr/share/datasets/fashion-mnist"), ROOT / "data" / "FashionMNIST" / "raw",
                ROOT / "data" / "fashion-mnist", ROOT / "data"]


def torchvision_fashion_root(o: Options) -> Path:
    """``<workdir>/torchvision`` holding FashionMNIST/raw/*-ubyte (decompressed once), which
    ``torchvision.datasets.FashionMNIST(root, download=False)`` reads."""
    import gzip

    root = o.workdir / "torchvision"
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in FASHION_FILES:
        dst = raw / name
        if dst.exists():
            continue
        for d in FASHION_DIRS:
            if (d / name).exists():
                shutil.copyfile(d / name, dst)
                break
            if (d / f"{name}.gz").exists():
                tmp = dst.with_suffix(".tmp")
                with gzip.open(d / f"{name}.gz", "rb") as src, open(tmp, "wb") as out:
                    shutil.copyfileobj(src, out)
                tmp.replace(dst)
                break
        else:
            raise FileNotFoundError(f"Fashion-MNIST file {name}[.gz] not found in "
                                    f"{', '.join(str(d) for d in FASHION_DIRS)}")
    return root


def kdlab_datamodule(overrides: list[str]):
    """kdlab's datamodule for a composed config (as the runner builds it)."""
    from omegaconf import OmegaConf

    from kdlab.data import build_datamodule

    plain = OmegaConf.to_container(compose(overrides), resolve=True)
    dm = build_datamodule({k: v for k, v in plain["data"].items() if k != "batch_size"},
                          batch_size=int(plain["data"]["batch_size"]), seed=int(plain["seed"]))
    return dm, plain
