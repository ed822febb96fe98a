"""The peer environment: torchdistill from PyPI in its own venv (benchmarks/.peer-venv), never in kdlab's.

torchdistill's only heavy dependencies are torch and torchvision. Downloading a second copy of the CUDA
build of torch (about 4 GB with its nvidia-* wheels) would dominate ``make bench``, so by default the peer
venv *reuses the torch that kdlab's venv already has*: a ``.pth`` file puts a shim directory on the peer's
``sys.path`` that holds symlinks to exactly torch, torchvision and their own dependency closure (nothing
else of kdlab's venv: no Lightning, Hydra, wandb, kdlab). pip then sees torch/torchvision as installed and
``pip install torchdistill`` only fetches torchdistill and its small pure dependencies (pyyaml, scipy,
cython). ``--mode full`` does a plain ``pip install torchdistill torch==<same> torchvision==<same>``
instead (slow: the full download).

    python benchmarks/peer/peer_env.py [--venv benchmarks/.peer-venv] [--mode shim|full] [--force]

Prints one JSON line: {"python": ..., "torchdistill": version, "torch": version, "mode": ..., "seconds": ...}
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_VENV = HERE.parent / ".peer-venv"
SKIP = {"pip", "setuptools", "wheel"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def torch_closure() -> list[md.Distribution]:
    """torch, torchvision and everything they need (requirements followed recursively, plus the CUDA
    runtime wheels torch loads at import), as installed in *this* interpreter's environment."""
    from packaging.requirements import Requirement

    seen: dict[str, md.Distribution] = {}
    todo = ["torch", "torchvision"]
    while todo:
        name = todo.pop()
        key = _norm(name)
        if key in seen or key in SKIP:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        seen[key] = dist
        for r in dist.requires or []:
            req = Requirement(r)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    for dist in md.distributions():  # nvidia-* / cuda-* wheels pulled in through extras
        key = _norm(dist.metadata["Name"] or "")
        if key.startswith(("nvidia-", "cuda-")) and key not in seen:
            seen[key] = dist
    return list(seen.values())


def build_shim(shim: Path) -> int:
    """Symlink the top-level entries (packages, modules, .libs dirs, dist-info) of the closure into shim."""
    if shim.exists():
        shutil.rmtree(shim)
    shim.mkdir(parents=True)
    site = Path(sysconfig.get_paths()["purelib"])
    n = 0
    for dist in torch_closure():
        tops = {Path(str(f)).parts[0] for f in (dist.files or []) if not str(f).startswith("..")}
        for top in tops:
            src = site / top
            if top in ("__pycache__",) or not src.exists() or (shim / top).exists():
                continue
            (shim / top).symlink_to(src)
            n += 1
    return n


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw)


def peer_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def installed(venv: Path) -> dict | None:
    py = peer_python(venv)
    if not py.exists():
        return None
    probe = ("import json, torch, torchvision, torchdistill; print(json.dumps({'torch': torch.__version__, "
             "'torchvision': torchvision.__version__, 'torchdistill': torchdistill.__version__}))")
    try:
        out = run([str(py), "-c", probe])
    except subprocess.CalledProcessError:
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def ensure(venv: Path = DEFAULT_VENV, mode: str = "shim", force: bool = False) -> dict:
    import torch
    import torchvision

    t0 = time.perf_counter()
    have = None if force else installed(venv)
    if have and have["torch"] == torch.__version__:
        return {**have, "python": str(peer_python(venv)), "mode": mode, "seconds": 0.0, "reused": True}
    if venv.exists():
        shutil.rmtree(venv)
    run([sys.executable, "-m", "venv", str(venv)])
    py = str(peer_python(venv))
    if mode == "shim":
        shim = venv / "torch-shim"
        build_shim(shim)
        peer_site = Path(run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
        (peer_site / "zz_kdlab_bench_torch_shim.pth").write_text(str(shim) + "\n")
        run([py, "-m", "pip", "install", "-q", "torchdistill"])
    else:
        run([py, "-m", "pip", "install", "-q", "torchdistill", f"torch=={torch.__version__.split('+')[0]}",
             f"torchvision=={torchvision.__version__.split('+')[0]}"])
    have = installed(venv)
    if have is None:
        raise RuntimeError(f"torchdistill does not import in {venv}")
    return {**have, "python": py, "mode": mode, "seconds": round(time.perf_counter() - t0, 1), "reused": False}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    ap.add_argument("--mode", choices=["shim", "full"], default="shim")
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args()
    print(json.dumps(ensure(a.venv, a.mode, a.force)))


if __name__ == "__main__":
    main()
