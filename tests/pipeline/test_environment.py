"""The pinned environment: requirements.lock is what `make install` installs, and every results.json
records the versions and hardware that produced it (kdlab/pipeline/environment.py)."""
from __future__ import annotations

import re
import shutil
import subprocess
from importlib import metadata

import pytest
import torch

from kdlab.pipeline.environment import describe_device, describe_environment
from tests.helpers.cli import ROOT, read_results, run_kdlab

LOCK = ROOT / "requirements.lock"
MAKEFILE = ROOT / "Makefile"
ENV_KEYS = {"kdlab", "python", "torch", "torchvision", "lightning", "hydra", "torchmetrics", "numpy", "cpu",
            "cpu_count", "gpu", "cuda", "platform", "threads", "device"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked() -> dict[str, str]:
    pins: dict[str, str] = {}
    for raw in LOCK.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep and name and version, f"requirements.lock: not name==version: {raw!r}"
        pins[canonical(name.strip())] = version.strip()
    return pins


def installed() -> dict[str, str]:
    return {canonical(d.metadata["Name"]): d.version for d in metadata.distributions()}


def test_lock_is_installed_exactly():
    have = installed()
    mismatches = [f"{name}=={want} (installed: {have.get(name, 'missing')})"
                  for name, want in sorted(locked().items()) if have.get(name) != want]
    assert not mismatches, ("this interpreter does not match requirements.lock (make install, or make lock "
                            "after a deliberate upgrade): " + ", ".join(mismatches))


def test_lock_pins_the_core_and_no_cpu_torch():
    pins = locked()
    for name in ("torch", "torchvision", "pytorch-lightning", "hydra-core"):
        assert name in pins, f"requirements.lock does not pin {name}"
    assert "kdlab" not in pins and not {"pip", "setuptools", "wheel"} & set(pins)
    cpu_builds = [f"{n}=={v}" for n, v in pins.items() if "+cpu" in v]
    assert not cpu_builds, f"requirements.lock pins +cpu builds (a fresh install gets PyPI's): {cpu_builds}"
    assert LOCK.read_text().startswith("#"), "requirements.lock lost its header comment"


def recipe(target: str) -> str:
    """The recipe lines of one Makefile rule (the text, so this works whatever the stamp's state)."""
    lines = MAKEFILE.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"^{re.escape(target)}\s*:(?!=)", line))
    body = []
    for line in lines[start + 1:]:
        if not line.startswith("\t"):
            break
        body.append(line)
    return "\n".join(body)


def test_make_install_uses_the_lock():
    text = MAKEFILE.read_text()
    assert re.search(r"^LOCK\s*:=\s*requirements\.lock\s*$", text, re.MULTILINE)
    stamp = recipe("$(STAMP)")
    assert re.search(r"pip install .*-e '\.\[dev\]' -c (\$\(LOCK\)|requirements\.lock)", stamp), stamp
    deps = next(line for line in text.splitlines() if line.startswith("$(STAMP):"))
    assert "pyproject.toml" in deps and ("$(LOCK)" in deps or "requirements.lock" in deps), deps
    assert re.search(r"^install:\s*\$\(STAMP\)\s*$", text, re.MULTILINE)
    for target in ("install-unpinned", "lock"):
        assert re.search(rf"^\.PHONY:.*\b{target}\b", text, re.MULTILINE), f"{target} not .PHONY"


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_dry_runs():
    def dry(*args: str) -> str:
        r = subprocess.run(["make", "-n", *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
                           check=False)
        assert r.returncode == 0, r.stderr
        return r.stdout

    assert "-c requirements.lock" in dry("-B", "install")
    unpinned = dry("install-unpinned")
    assert "pip install" in unpinned and "-e '.[dev]'" in unpinned
    assert "requirements.lock" not in unpinned and " -c " not in unpinned
    assert "pip freeze" in dry("lock")


def test_describe_environment():
    env = describe_environment()
    assert set(env) == ENV_KEYS
    assert env["torch"] == metadata.version("torch")
    assert env["torch"] == torch.__version__.split("+")[0]
    assert env["lightning"] == metadata.version("pytorch-lightning")
    assert env["hydra"] == metadata.version("hydra-core")
    assert env["kdlab"] == metadata.version("kdlab")
    assert env["cuda"] == torch.version.cuda
    assert env["cpu_count"] is None or env["cpu_count"] >= 1
    assert env["cpu"] is None or isinstance(env["cpu"], str) and env["cpu"]
    assert env["threads"] == torch.get_num_threads()
    if not torch.cuda.is_available():
        assert env["gpu"] is None and env["device"] == "cpu"
    else:
        assert env["gpu"] == torch.cuda.get_device_name(0)


def test_describe_device_names_the_gpus_a_run_uses(monkeypatch):
    """environment.device: cpu, or the GPU(s) as CUDA_VISIBLE_DEVICES names them (a sweep job's own GPU)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert describe_device({"accelerator": "auto", "devices": 1}) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert describe_device({"accelerator": "auto", "devices": 1}) == "cuda:0"
    assert describe_device({"accelerator": "cpu", "devices": 1}) == "cpu"
    assert describe_device({"accelerator": "gpu", "devices": 2}) == "cuda:0,1"
    assert describe_device({"accelerator": "gpu", "devices": [1, 3]}) == "cuda:1,3"
    assert describe_device({"accelerator": "gpu", "devices": "auto"}) == "cuda:0,1,2,3"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "6,7")  # a job given GPUs 6 and 7: Lightning's cuda:0 is GPU 6
    assert describe_device({"accelerator": "auto", "devices": 1}) == "cuda:6"
    assert describe_device({"accelerator": "auto", "devices": -1}) == "cuda:6,7"


@pytest.mark.slow  # a long CLI run: in make test-slow (CI runs both)
def test_results_json_records_environment(tmp_path):
    r = run_kdlab(["pipeline=single", "model=plain2", "distill=none", "trainer.max_epochs=1"], tmp_path / "out",
                  tmp_path / "run")
    assert r.returncode == 0, r.stderr[-2000:]
    env = read_results(tmp_path / "run")["environment"]
    assert env["torch"] == metadata.version("torch")
    assert "cpu" in env and set(env) == ENV_KEYS
