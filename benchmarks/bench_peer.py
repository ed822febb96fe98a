"""(d) Peer: one vanilla KD job (plain10 teacher -> plain2 student, Fashion-MNIST) run by kdlab and by
torchdistill, end to end, each as its own process, timed by wall clock from process start to exit.

Same teacher (the fixture's plain10 weights file, given to both), same student architecture (kdlab's model
code, registered in torchdistill's model registry), same train / validation / test images (kdlab's split,
handed to torchdistill as index lists), epochs, batch size (128), optimizer (SGD 0.01, momentum 0.9, wd
1e-4, constant rate), loss (0.5 CE + 0.5 T^2 KL, T = 4), checkpoint rule (best validation accuracy) and
test set. Each framework feeds its data its usual way: kdlab's in-memory tensors with the teacher's
outputs cached (data.augment=none), torchdistill's torchvision dataset with PIL transforms in a
DataLoader, the teacher run every step. torchdistill leaves the teacher in train mode, as its example script
does (its DistillationBox never calls ``eval()`` on it): the teacher's batch-norm layers normalise with each
batch's statistics and update their running statistics while it teaches, which is why the teacher's test
accuracy torchdistill reports afterwards differs from the one kdlab reports for the same weights file.

Each side starts from nothing (kdlab from an empty store), ``--repeats`` interleaved rounds (peer, kdlab,
kdlab at fp32, peer, ...); the figure is each side's best round, every round is in the details.

    kdlab:        python -m kdlab +experiment=kd_fashion_mnist pipeline.teacher_checkpoint=<teacher> ...
    torchdistill: benchmarks/.peer-venv/bin/python benchmarks/peer/torchdistill_kd.py --config <yaml>

torchdistill is installed from PyPI into benchmarks/.peer-venv by benchmarks/peer/peer_env.py (never into
kdlab's environment). If that fails, the peer is a classic PyTorch KD script (DataLoader + PIL), clearly
labelled as such in the output.
"""
from __future__ import annotations

import json
import os
import shutil
import string
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import common
from common import ROOT, Options, check, figure, ratio

PEER_DIR = Path(__file__).resolve().parent / "peer"
WORKERS = 2  # DataLoader workers of the peer (this is a 2-core machine; the "2 workers")


def _run(cmd: list[str], env: dict[str, str], timeout: float = 3600) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    return time.perf_counter() - t0, proc


def _last_json(text: str) -> dict[str, Any]:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON line in the output")


def run(o: Options) -> dict[str, Any]:
    import torch

    fx = common.fixture(o)
    teacher = fx["stages"]["teacher"]["checkpoint"]
    job = o.workdir / f"peer-{os.getpid()}"
    job.mkdir(parents=True, exist_ok=True)
    # the recipe as shipped (CPU preset: data subset, epochs; the full test set), sized down only by options
    job_ov = ["+experiment=kd_fashion_mnist"]
    job_ov += [] if o.subset is None else [f"data.subset={o.subset}"]
    job_ov += [f"data.test_subset={o.test_subset}"] if o.quick else []
    job_ov += [] if o.peer_epochs is None else [f"trainer.max_epochs={o.peer_epochs}"]
    t_arch, s_arch = o.chain[0], o.chain[-1]  # plain10 -> plain2 by default
    kd_overrides = [*job_ov, f"pipeline.chain=[{t_arch},{s_arch}]", f"pipeline.teacher_checkpoint={teacher}",
                    "logger=csv", "callbacks.progress=none", f"paths.output_dir={job / 'kdlab'}",
                    f"hydra.run.dir={job / 'kdlab' / 'run'}"]
    # kdlab's split and settings, for the peer
    dm, plain = common.kdlab_datamodule(job_ov)
    E = int(plain["trainer"]["max_epochs"])
    opt, dist, bs = plain["optimizer"], plain["distill"], int(plain["data"]["batch_size"])
    if "constant" not in str((plain.get("scheduler") or {}).get("_target_", "constant")) \
            or dist.get("strategy") != "kd":
        raise RuntimeError("the peer job expects Hinton KD at a constant learning rate")
    settings = {"lr": float(opt["lr"]), "momentum": float(opt["momentum"]),
                "weight_decay": float(opt["weight_decay"]), "temperature": float(dist["temperature"]),
                "alpha": 1.0 - float(dist["lam"]), "batch_size": bs,
                "eval_batch_size": int(plain["data"].get("batch_size_eval") or 2 * bs),
                "mean": list(dm.mean), "std": list(dm.std)}
    index_file = job / "split.pt"
    torch.save({k: torch.as_tensor(getattr(dm, f"{k}_index")).long() for k in ("train", "val", "test")},
               index_file)
    root = common.torchvision_fashion_root(o)

    # -- the peer environment ------------------------------------------------------------------------
    peer_note, peer_env = "", None
    mode = o.peer_mode
    if mode == "torchdistill":
        sys.path.insert(0, str(PEER_DIR))
        try:
            from peer_env import ensure

            peer_env = ensure()
        except Exception as e:  # noqa: BLE001 - any failure: say why, fall back
            peer_note = f"torchdistill could not be installed: {type(e).__name__}: {e}".splitlines()[0]
            mode = "classic"

    env = {**os.environ, "PYTHONWARNINGS": "ignore", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    peer_pythonpath = os.pathsep.join([str(ROOT), str(PEER_DIR)])

    def run_peer() -> dict[str, Any]:
        """One run of the peer job; falls back to the classic loop (for good) if torchdistill fails."""
        nonlocal mode, peer_note
        if mode == "torchdistill":
            cfg_text = string.Template((PEER_DIR / "kd_fashion_mnist.yaml").read_text()).substitute(
                index_file=index_file, root=root, teacher_ckpt=teacher, student_ckpt=job / "td_student.pt",
                teacher_arch=t_arch, student_arch=s_arch, epochs=E, num_workers=WORKERS, **settings)
            cfg_path = job / "torchdistill.yaml"
            cfg_path.write_text(cfg_text)
            cmd = [peer_env["python"], str(PEER_DIR / "torchdistill_kd.py"), "--config", str(cfg_path)]
            wall, proc = _run(cmd, {**env, "PYTHONPATH": peer_pythonpath})
            if proc.returncode == 0:
                return {**_last_json(proc.stdout), "wall_seconds": round(wall, 2), "framework":
                        f"torchdistill {peer_env['torchdistill']}"}
            peer_note = (f"torchdistill {peer_env.get('torchdistill')} failed to run (exit {proc.returncode}): "
                         + (proc.stderr.strip().splitlines() or ["no output"])[-1])
            mode = "classic"
        cmd = [sys.executable, str(PEER_DIR / "classic_kd.py"), "--root", str(root), "--index-file",
               str(index_file), "--teacher", teacher, "--teacher-arch", t_arch, "--student-arch", s_arch,
               "--epochs", str(E), "--workers", str(WORKERS), "--settings", json.dumps(settings),
               "--out-ckpt", str(job / "classic_student.pt")]
        wall, proc = _run(cmd, {**env, "PYTHONPATH": peer_pythonpath})
        if proc.returncode != 0:
            raise RuntimeError(f"classic peer failed: {proc.stderr.strip()[-500:]}")
        return {**_last_json(proc.stdout), "wall_seconds": round(wall, 2),
                "framework": "classic PyTorch KD loop (DataLoader + PIL) -- fallback, not torchdistill"}

    # -- kdlab, as a user runs it (default precision: auto), and at torchdistill's fp32 when auto differs -----
    from kdlab.pipeline.runtime import resolve_precision

    auto = str(resolve_precision(plain["trainer"].get("precision", "auto"),
                                 torch.device("cuda" if torch.cuda.is_available() else "cpu")))
    runs = {"default": []} if auto == "32-true" else {"default": [], "fp32": ["trainer.precision=32-true"]}

    def run_kdlab(label: str) -> dict[str, Any]:
        shutil.rmtree(job / "kdlab", ignore_errors=True)  # an empty store: the teacher imported, the cache built
        wall, proc = _run([sys.executable, "-m", "kdlab", *kd_overrides, *runs[label]], env)
        if proc.returncode != 0:
            raise RuntimeError(f"kdlab job failed: {proc.stderr.strip()[-800:]}")
        res = json.loads((job / "kdlab" / "run" / "results.json").read_text())
        return {"wall_seconds": round(wall, 2), "test_acc": res["final"]["test_acc"],
                "val_acc": res["final"]["val_acc"], "teacher_test_acc": res["stages"][0]["test_acc"],
                "train_seconds": res["stages"][-1]["train_seconds"],
                "precision": auto if label == "default" else "32-true"}

    # interleaved rounds (peer, kdlab, kdlab fp32, peer, ...), so that a change in the machine's load hits every
    # side; each side's best round is the figure, every round is in the details
    rounds: list[dict[str, Any]] = []
    for _ in range(max(1, o.repeats)):
        rounds.append({"peer": run_peer(), **{label: run_kdlab(label) for label in runs}})
    peer = min((r["peer"] for r in rounds), key=lambda p: p["wall_seconds"])
    kd = {label: min((r[label] for r in rounds), key=lambda k: k["wall_seconds"]) for label in runs}
    walls = {side: [r[side]["wall_seconds"] for r in rounds] for side in ("peer", *runs)}

    name = peer["framework"].split(" --")[0]
    figs = []
    for label, k in kd.items():
        r = ratio(k["wall_seconds"], peer["wall_seconds"])
        gap = None if peer.get("test_acc") is None else round(abs(k["test_acc"] - peer["test_acc"]) * 100, 2)
        how = (f"kdlab at its default precision (auto: {auto} here), {name} at fp32" if label == "default"
               else "both at fp32")
        suffix = "" if label == "default" else "_fp32"
        figs.append(figure(f"d_peer_time{suffix}", f"d. peer: kdlab / {name} wall time, KD {t_arch} -> {s_arch}, "
                           f"{E} epochs{'' if label == 'default' else ', both fp32'}", r, "x", "<= 0.5",
                           check(r, "<=", 0.5), f"kdlab {k['wall_seconds']} s vs {peer['wall_seconds']} s, best of "
                           f"{len(rounds)} interleaved rounds (kdlab {walls[label]} s, peer {walls['peer']} s); {how}"
                           + (f"; {peer_note}" if peer_note else "")))
        figs.append(figure(f"d_peer_acc{suffix}", f"d. peer: test accuracy gap |kdlab - {name}|"
                           f"{'' if label == 'default' else ', both fp32'}", gap, "points", "<= 1",
                           check(gap, "<=", 1.0), f"kdlab {k['test_acc']:.4f} vs {peer['test_acc']:.4f} "
                           f"(teacher {k['teacher_test_acc']:.4f}); {how}"))
    shutil.rmtree(job, ignore_errors=True)
    return {"name": "peer", "figures": figs,
            "details": {"kdlab": kd, "peer": peer, "rounds": rounds, "peer_env": peer_env, "note": peer_note, "epochs": E,
                        "workers": WORKERS, "train_images": dm.train_size, "test_images": dm.test_size}}


if __name__ == "__main__":
    common.cli(run, __doc__.splitlines()[0])
