"""``make check-gpu`` (benchmarks/check_gpu.py) on a CPU machine: its refusal without a GPU (one line, exit 0; exit 1
when a GPU is there but torch cannot use it), the commands it builds (valid kdlab configs of the real recipes on
the generated data), the generated data read by kdlab's own loaders, and how it judges a check from what ran."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.config import compose_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def check_gpu(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import check_gpu

    return check_gpu


def test_without_a_gpu_it_says_so_in_one_line_and_exits_0(check_gpu, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(check_gpu, "gpu_present", lambda: None)
    assert check_gpu.main(["--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr()
    assert out.out.strip().splitlines() == [(f"check-gpu: no CUDA GPU on this machine (torch {torch.__version__}): "
                                            "nothing to check")]
    assert not list(tmp_path.iterdir())  # nothing written, nothing run


def test_a_gpu_torch_cannot_use_is_an_error(check_gpu, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(check_gpu, "gpu_present", lambda: "GPU 0: NVIDIA H100 (UUID: GPU-x)")
    assert check_gpu.main(["--workdir", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("check-gpu: error: a GPU is present (GPU 0: NVIDIA H100")


def test_unknown_check_is_bad_input(check_gpu, capsys):
    assert check_gpu.main(["--only", "tests,gpuz"]) == 2
    assert "unknown check 'gpuz'; known: tests, dgkd_cifar100, kd_imagenet, sweep, ddp, bench_gpu" in \
        capsys.readouterr().err


@pytest.mark.parametrize("n_gpus", [1, 2])
def test_dry_run_lists_every_check(check_gpu, monkeypatch, capsys, tmp_path, n_gpus):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n_gpus)
    assert check_gpu.main(["--dry-run", "--workdir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [ln.split(":", 1)[0] for ln in lines] == check_gpu.CHECKS
    for two in ("sweep", "ddp"):
        line = next(ln for ln in lines if ln.startswith(f"{two}:"))
        assert (line == f"{two}: skipped (needs 2 GPUs)") == (n_gpus == 1)
    assert sum(check_gpu.LIMITS.values()) <= 570  # with the data, the whole command within 10 minutes


def overrides_of(cmd: list[str]) -> list[str]:
    """The kdlab overrides of a ``python -m kdlab ...`` command (without -m and Hydra's own keys)."""
    return [a for a in cmd[3:] if a != "-m" and not a.startswith(("hydra.", "hydra/"))]


def test_the_recipes_run_as_written_on_the_generated_data(check_gpu, tmp_path):
    cmds = check_gpu.commands(tmp_path, n_gpus=2)
    cifar = compose_config(*overrides_of(cmds["dgkd_cifar100"]))
    assert cifar["experiment_name"] == "dgkd_cifar100" and cifar["data"]["root"] == str(tmp_path / "cifar")
    assert cifar["pipeline"]["chain"] == ["plain10", "plain8", "plain6", "plain4", "plain2"]
    assert cifar["trainer"]["max_epochs"] == 1 and cifar["trainer"]["precision"] == "auto"
    imagenet = compose_config(*overrides_of(cmds["kd_imagenet"]))
    assert imagenet["experiment_name"] == "kd_imagenet" and imagenet["data"]["image_size"] == 224
    assert imagenet["data"]["decode_device"] == "auto" and imagenet["data"]["augment"] == "imagenet"
    assert imagenet["pipeline"]["chain"] == ["torchvision/resnet34", "torchvision/resnet18"]  # no hub weights
    sweep = cmds["sweep"]
    assert "hydra/launcher=joblib" in sweep and "hydra.launcher.n_jobs=2" in sweep
    assert "distill.temperature=2,4" in sweep  # two jobs
    assert compose_config(*[a.replace("=2,4", "=2") for a in overrides_of(sweep)])["trainer"]["accelerator"] == "auto"
    for path in check_gpu.GPU_TESTS:
        assert (ROOT / path).is_file(), path
    assert cmds["bench_gpu"][1].endswith("benchmarks/bench_gpu.py")
    ddp = compose_config(*overrides_of(cmds["ddp"]))
    assert (ddp["trainer"]["strategy"], ddp["trainer"]["devices"], ddp["trainer"]["accelerator"]) == ("ddp", 2, "gpu")
    assert check_gpu.commands(tmp_path, n_gpus=1)["ddp"] is None


def test_the_generated_data_is_read_by_kdlabs_loaders(check_gpu, monkeypatch, tmp_path):
    from kdlab.data import build_datamodule

    monkeypatch.setattr(check_gpu, "CIFAR_TRAIN", 200)
    monkeypatch.setattr(check_gpu, "CIFAR_TEST", 50)
    monkeypatch.setattr(check_gpu, "JPEG_PER_CLASS", 6)
    monkeypatch.setattr(check_gpu, "JPEG_VAL", 2)
    check_gpu.write_data(tmp_path, ["dgkd_cifar100", "kd_imagenet"])
    cifar = build_datamodule({"name": "cifar100", "root": str(tmp_path / "cifar"), "augment": "none"}, 32, 0)
    assert (cifar.num_classes, cifar.train_size + cifar.val_size, cifar.test_size) == (100, 200, 50)
    jpegs = build_datamodule({"name": "imagefolder", "root": str(tmp_path / "jpegs"), "num_workers": 0,
                              "image_size": 64}, 8, 0)
    assert jpegs.num_classes == check_gpu.JPEG_CLASSES and jpegs.test_size == check_gpu.JPEG_CLASSES * 2
    batch = next(iter(jpegs.train_dataloader()))
    assert batch[0].shape == (8, 3, 64, 64) and batch[1].max() < check_gpu.JPEG_CLASSES


def test_a_check_passes_on_what_its_run_recorded(check_gpu, tmp_path):
    def job(n: int, device: str) -> None:
        d = tmp_path / "runs" / "sweep" / str(n)
        d.mkdir(parents=True, exist_ok=True)
        (d / "results.json").write_text(json.dumps({"environment": {"device": device}}))

    job(0, "cuda:0")
    job(1, "cuda:0")
    assert not check_gpu.passed("sweep", tmp_path, 0)  # both jobs on one GPU: the assignment failed
    job(1, "cuda:1")
    assert check_gpu.passed("sweep", tmp_path, 0) and not check_gpu.passed("sweep", tmp_path, 1)
    assert check_gpu.summarize("sweep", tmp_path, 0, "") == "devices cuda:0, cuda:1"
    run = tmp_path / "runs" / "dgkd_cifar100"
    run.mkdir(parents=True)
    rec = {"status": "completed", "environment": {"device": "cpu", "gpu": None}, "stages": [], "final": None}
    (run / "results.json").write_text(json.dumps(rec))
    assert not check_gpu.passed("dgkd_cifar100", tmp_path, 0)  # it ran, but not on the GPU
    rec["environment"]["device"] = "cuda:0"
    (run / "results.json").write_text(json.dumps(rec))
    assert check_gpu.passed("dgkd_cifar100", tmp_path, 0)
    assert check_gpu.summarize("tests", tmp_path, 0, "...\n===== 41 passed, 2 skipped in 63.2s =====\n") == \
        "41 passed, 2 skipped in 63.2s"
    assert sys.modules["check_gpu"] is check_gpu
