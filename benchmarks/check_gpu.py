"""``make check-gpu``: kdlab's CUDA paths on the GPU machine at hand, in one command and within 10 minutes, so that a
short time on a lent GPU is enough to run it twice.

    make check-gpu                                # = python benchmarks/check_gpu.py
    python benchmarks/check_gpu.py --dry-run      # the commands it would run, on any machine
    python benchmarks/check_gpu.py --only tests,sweep

Checks, each a subprocess with its own time limit and log (``<workdir>/logs/<check>.log``), one summary line each:

* ``tests``: the tests whose code takes a GPU where there is one (GPU JPEG decode, pinned memory, channels_last
  sources, the device recorded in results.json, source caches and the pipeline on the device, the per-job GPU
  assignment) run on this machine;
* ``dgkd_cifar100``: the paper recipe (5 stages, dense DGKD, bf16 where the GPU has it) on a generated CIFAR-100
  archive in the real pickle format (12,800 training images: 90 steps per stage, 450 in all);
* ``kd_imagenet``: the ImageNet recipe (torchvision ResNet-34 -> ResNet-18, 224 px, RandomResizedCrop, nvJPEG
  decode with ``data.decode_device=auto``) on a generated ImageFolder of JPEGs, the teacher trained here (no
  hub weights offline): 100 steps per stage;
* ``sweep``: a two-job joblib sweep that must put its jobs on two different GPUs (``environment.device`` in each
  results.json), where the machine has two or more; else skipped;
* ``ddp``: a three-stage pipeline with ``trainer=ddp`` on two GPUs (NCCL), where there are two; else skipped;
* ``bench_gpu``: ``benchmarks/bench_gpu.py`` (KD epochs at CIFAR-100 and ImageNet shapes, fp32 and bf16:
  images/s and the fraction of the GPU's peak).

Exit status: 0 when every check that ran passed; 1 when one failed, or when a GPU is present (``nvidia-smi``
lists one, or /dev/nvidia0 exists) but torch cannot use it; 0 with one line on a machine without a GPU (nothing to
check: CI and these CPU machines run ``make check-gpu`` harmlessly). The summary is also written as JSON
(``<workdir>/check-gpu.json``), from which docs/performance.md's GPU figures are copied.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CHECKS = ["tests", "dgkd_cifar100", "kd_imagenet", "sweep", "ddp", "bench_gpu"]
# seconds each check may take: 570 in all, so that the whole command (with the data, ~20 s) stays under 10 minutes
LIMITS = {"tests": 100, "dgkd_cifar100": 90, "kd_imagenet": 110, "sweep": 50, "ddp": 50, "bench_gpu": 170}
# the tests whose code runs on a GPU where there is one (everything else in `make test` is CPU-only logic)
GPU_TESTS = ["tests/data/test_imagefolder.py", "tests/modules/test_modules.py", "tests/pipeline/test_environment.py",
             "tests/pipeline/test_source_cache.py", "tests/pipeline/test_runner.py", "tests/cli/test_resources.py"]
CIFAR_TRAIN, CIFAR_TEST = 12800, 1000
JPEG_CLASSES, JPEG_PER_CLASS, JPEG_VAL = 10, 640, 50


def gpu_present() -> str | None:
    """What says this machine has an NVIDIA GPU, whatever torch thinks (None: nothing does)."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30, check=False).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        if "GPU" in out:
            return out.strip().splitlines()[0]
    return "/dev/nvidia0 exists" if Path("/dev/nvidia0").exists() else None


def kdlab(*args: str) -> list[str]:
    return [sys.executable, "-m", "kdlab", *args]


def commands(work: Path, n_gpus: int) -> dict[str, list[str] | None]:
    """Every check's command (None: skipped on this machine). The recipes keep their settings but the data and
    the length: one epoch per stage on the generated data."""
    common = ["logger=csv", "callbacks.progress=none", f"paths.output_dir={work / 'out'}"]
    return {
        "tests": [sys.executable, "-m", "pytest", "-q", "-m", "not slow", "-p", "no:cacheprovider", *GPU_TESTS],
        "dgkd_cifar100": kdlab("+experiment=dgkd_cifar100", f"data.root={work / 'cifar'}", "trainer.max_epochs=1",
                               *common, f"hydra.run.dir={work / 'runs' / 'dgkd_cifar100'}"),
        "kd_imagenet": kdlab("+experiment=kd_imagenet", f"data.root={work / 'jpegs'}",
                             "pipeline.chain=[torchvision/resnet34,torchvision/resnet18]", "data.batch_size=64",
                             "data.num_workers=8", "data.decode_device=auto", "trainer.max_epochs=1", *common,
                             f"hydra.run.dir={work / 'runs' / 'kd_imagenet'}"),
        "sweep": None if n_gpus < 2 else kdlab(
            "-m", "preset=none", "data=synthetic", "data.channels=3", "data.image_size=32", "data.n_train=4000",
            "data.n_test=500", "pipeline=direct", "pipeline.chain=[resnet20,resnet8]", "distill=kd",
            "trainer.max_epochs=1", "distill.temperature=2,4", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
            *common, f"hydra.sweep.dir={work / 'runs' / 'sweep'}"),
        "ddp": None if n_gpus < 2 else kdlab(
            "preset=none", "data=synthetic", "data.n_train=2048", "data.n_test=256", "data.batch_size=64",
            "pipeline=dense", "pipeline.chain=[plain4,plain2,plain2]", "trainer=ddp", "trainer.accelerator=gpu",
            "trainer.devices=2", "trainer.max_epochs=1", *common, f"hydra.run.dir={work / 'runs' / 'ddp'}"),
        "bench_gpu": [sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--workdir", str(work / "bench"),
                      "--out", str(work / "bench_gpu.json")],
    }


def write_data(work: Path, which: list[str]) -> None:
    """The generated data sets, in the real formats (tests/helpers/data.py): a CIFAR-100 archive, an ImageFolder."""
    sys.path.insert(0, str(ROOT))
    from tests.helpers.data import write_cifar100, write_jpegs

    if "dgkd_cifar100" in which and not (work / "cifar" / "cifar-100-python").exists():
        write_cifar100(work / "cifar", n_train=CIFAR_TRAIN, n_test=CIFAR_TEST)
    if "kd_imagenet" in which and not (work / "jpegs" / "train").exists():
        classes = {f"c{i}": JPEG_PER_CLASS for i in range(JPEG_CLASSES)}
        write_jpegs(work / "jpegs", "train", classes, size=(160, 120))
        write_jpegs(work / "jpegs", "val", {c: JPEG_VAL for c in classes}, size=(160, 120))


def summarize(name: str, work: Path, rc: int, output: str) -> str:
    """The check's one line of facts, read from what it wrote."""
    if name == "tests":
        last = [ln for ln in output.strip().splitlines() if ln.strip()]
        return last[-1].strip("= ") if last else f"exit {rc}"
    if name in ("dgkd_cifar100", "kd_imagenet", "ddp"):
        return describe_run(work / "runs" / name / "results.json")
    if name == "sweep":
        devices = sweep_devices(work / "runs" / "sweep")
        return f"devices {', '.join(devices) or '-'}"
    if name == "bench_gpu":
        path = work / "bench_gpu.json"
        if not path.exists():
            return f"exit {rc}"
        figs = json.loads(path.read_text()).get("figures", [])
        return "; ".join(f"{f['key']} {f['value']} {f['unit']}" for f in figs)
    return f"exit {rc}"


def describe_run(path: Path) -> str:
    if not path.exists():
        return "no results.json"
    res = json.loads(path.read_text())
    stages = res.get("stages", [])
    env = res.get("environment") or {}
    rates = ", ".join(f"{s['name']} {s.get('samples_per_second')}/s" for s in stages)
    final = (res.get("final") or {}).get("test_acc")
    return (f"{res.get('status')}, {len(stages)} stage(s) on {env.get('device')} ({env.get('gpu')}), "
            f"precision {res.get('config', {}).get('trainer.precision')}, samples/s {rates}; student test_acc "
            f"{final}; {res.get('wall_seconds')} s")


def sweep_devices(sweep: Path) -> list[str]:
    return [json.loads(p.read_text())["environment"]["device"] for p in sorted(sweep.glob("*/results.json"))]


def passed(name: str, work: Path, rc: int) -> bool:
    if rc != 0:
        return False
    if name in ("dgkd_cifar100", "kd_imagenet", "ddp"):
        path = work / "runs" / name / "results.json"
        res = json.loads(path.read_text()) if path.exists() else {}
        device = str((res.get("environment") or {}).get("device"))
        return res.get("status") == "completed" and device.startswith("cuda") and (name != "ddp" or "," in device)
    if name == "sweep":
        devices = sweep_devices(work / "runs" / "sweep")
        return len(devices) == 2 and len(set(devices)) == 2 and all(d.startswith("cuda:") for d in devices)
    return True


def run_check(name: str, cmd: list[str], work: Path, limit: float) -> dict[str, Any]:
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONWARNINGS": "ignore"}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit, check=False)
        rc, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        rc = 124
        output = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        output += f"\ncheck-gpu: {name} stopped after {limit:.0f} s"
    (logs / f"{name}.log").write_text(" ".join(map(shlex.quote, cmd)) + "\n\n" + output)
    seconds = time.perf_counter() - t0
    ok = passed(name, work, rc)
    return {"check": name, "ok": ok, "exit": rc, "seconds": round(seconds, 1), "summary": summarize(name, work, rc, output),
            "command": " ".join(map(shlex.quote, cmd))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=ROOT / ".check-gpu", help="data, runs and logs (default .check-gpu)")
    ap.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(CHECKS)}")
    ap.add_argument("--dry-run", action="store_true", help="print the commands and stop (any machine)")
    a = ap.parse_args(argv)
    which = [c.strip() for c in a.only.split(",")] if a.only else list(CHECKS)
    unknown = [c for c in which if c not in CHECKS]
    if unknown:
        print(f"check-gpu: error: unknown check {unknown[0]!r}; known: {', '.join(CHECKS)}", file=sys.stderr)
        return 2
    import torch

    work = a.workdir.resolve()
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    cmds = commands(work, n_gpus)
    if a.dry_run:
        for name in which:
            cmd = cmds[name]
            print(f"{name}: " + (" ".join(map(shlex.quote, cmd)) if cmd else "skipped (needs 2 GPUs)"))
        return 0
    if not n_gpus:
        hint = gpu_present()
        if hint:
            print(f"check-gpu: error: a GPU is present ({hint}) but torch {torch.__version__} (CUDA build "
                  f"{torch.version.cuda}) cannot use it: check the driver against that CUDA version", file=sys.stderr)
            return 1
        print(f"check-gpu: no CUDA GPU on this machine (torch {torch.__version__}): nothing to check")
        return 0
    names = ", ".join(torch.cuda.get_device_name(i) for i in range(n_gpus))
    print(f"check-gpu: {n_gpus} GPU(s): {names}; torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)
    t0 = time.perf_counter()
    write_data(work, which)
    print(f"check-gpu: data written in {time.perf_counter() - t0:.0f} s under {work}", flush=True)
    results = []
    for name in which:
        if cmds[name] is None:
            results.append({"check": name, "ok": None, "summary": f"skipped: {n_gpus} GPU(s), needs 2"})
            print(f"check-gpu: {name}: skipped ({n_gpus} GPU, needs 2)", flush=True)
            continue
        shutil.rmtree(work / "runs" / name, ignore_errors=True)
        r = run_check(name, cmds[name], work, LIMITS[name])
        results.append(r)
        print(f"check-gpu: {name}: {'ok' if r['ok'] else 'FAILED'} in {r['seconds']:.0f} s: {r['summary']}"
              + ("" if r["ok"] else f" (log {work / 'logs' / (name + '.log')})"), flush=True)
    failed = [r["check"] for r in results if r["ok"] is False]
    total = time.perf_counter() - t0
    (work / "check-gpu.json").write_text(json.dumps({"gpus": names, "torch": torch.__version__, "cuda": torch.version.cuda,
                                                     "seconds": round(total, 1), "checks": results}, indent=2) + "\n")
    print(f"check-gpu: {len(results) - len(failed)} of {len(results)} check(s) passed or skipped in {total:.0f} s"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
