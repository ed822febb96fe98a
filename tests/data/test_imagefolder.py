"""ImageNet scale: the on-disk ImageFolder path (torchvision.io decoding, v2 transforms, DataLoader workers),
a corrupt JPEG, and the ImageNet recipes (learning-rate scaling with the global batch: tests/pipeline/test_lr_scaling.py).

Everything runs on a CPU with small generated JPEG folders; the GPU decode path is checked only where a GPU
is (its refusal on a CPU-only machine is checked everywhere)."""
from __future__ import annotations

import math
import socket

import pytest
import torch

from kdlab.data import build_datamodule
from kdlab.errors import ConfigError, DataError
from tests.helpers.cli import read_results, run_kdlab
from tests.helpers.config import compose_config
from tests.helpers.data import write_jpegs

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("jpegs")
    write_jpegs(root, "train", {"a": 40, "b": 40, "c": 40, "d": 40})
    write_jpegs(root, "val", {"a": 8, "b": 8, "c": 8, "d": 8})
    return root


def cfg_of(root, **kw):
    return {"name": "imagefolder", "root": str(root), "num_workers": 0, **kw}


# ---- transforms: shapes, dtypes, normalization, geometry ----------------------------------------------
def test_train_batches_are_normalized_float_crops(folder):
    dm = build_datamodule(cfg_of(folder, image_size=24, augment="imagenet"), 16, 0)
    x, y, idx = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 3, 24, 24) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and idx.dtype == torch.int64
    assert dm.mean == IMAGENET_MEAN and dm.crop_pct == 0.875
    # the fused normalize equals v2's ToDtype(scale=True) + Normalize on the same uint8 crop
    from torchvision.transforms import v2

    from kdlab.data.imagefolder import FolderTransform

    img = (torch.rand(3, 30, 40) * 255).to(torch.uint8)
    t = FolderTransform(24, "none", False, (0.08, 1.0), 1.0, IMAGENET_MEAN, IMAGENET_STD)
    ref = v2.Compose([v2.Resize(24, antialias=True), v2.CenterCrop(24), v2.ToDtype(torch.float32, scale=True),
                      v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])(img)
    assert torch.allclose(t(img), ref, atol=1e-5)


def test_eval_resize_then_center_crop_geometry():
    """Resize(floor(S / crop_pct)) then CenterCrop(S): a 256 x 320 image at S = 8, crop_pct 0.5 is resized to
    16 x 20 (short side 16) and its central 8 x 8 kept: the window rows 4..11, cols 6..13 of the resized image."""
    from torchvision.transforms import v2

    from kdlab.data.imagefolder import FolderTransform, crop_pct_of

    assert crop_pct_of("imagenet", None) == 0.875 and crop_pct_of("crop_flip", None) == 1.0
    assert math.floor(224 / crop_pct_of("imagenet", None)) == 256  # the ImageNet convention
    img = torch.arange(256 * 320, dtype=torch.float32).view(1, 256, 320).expand(3, -1, -1)
    img = (img % 251).to(torch.uint8).contiguous()
    t = FolderTransform(8, "imagenet", False, (0.08, 1.0), 0.5, (0.0,) * 3, (1 / 255,) * 3)  # normalize = identity
    out = t(img)
    resized = v2.Resize(16, antialias=True)(img)
    assert resized.shape == (3, 16, 20)
    assert torch.equal(out, resized[:, 4:12, 6:14].float())


def test_random_resized_crop_respects_scale():
    from kdlab.data.imagefolder import FolderTransform

    # scale (1, 1) with ratio 3/4..4/3 on a square image: the whole image, resized
    img = (torch.rand(3, 50, 50) * 255).to(torch.uint8)
    t = FolderTransform(10, "crop_flip", True, (1.0, 1.0), 1.0, (0.0,) * 3, (1 / 255,) * 3)
    from torchvision.transforms import v2

    whole = v2.Resize((10, 10), antialias=True)(img).float()
    out = t(img)
    assert torch.equal(out, whole) or torch.equal(out, whole.flip(-1))


def test_loader_settings(folder):
    dm = build_datamodule(cfg_of(folder, image_size=16, num_workers=2, prefetch_factor=3), 8, 0)
    loader = dm.train_dataloader()
    assert loader.num_workers == 2 and loader.persistent_workers and loader.prefetch_factor == 3
    assert loader.pin_memory == torch.cuda.is_available()  # auto: only for a GPU
    first = [b[2] for b in loader]  # two epochs through the same persistent workers
    second = [b[2] for b in loader]
    assert sorted(torch.cat(first).tolist()) == sorted(torch.cat(second).tolist()) == list(range(dm.train_size))
    assert not torch.equal(torch.cat(first), torch.cat(second))  # reshuffled per epoch
    off = build_datamodule(cfg_of(folder, image_size=16, num_workers=1, persistent_workers=False,
                                  pin_memory=False), 8, 0).train_dataloader()
    assert not off.persistent_workers and not off.pin_memory
    assert build_datamodule(cfg_of(folder, image_size=16), 8, 0).train_dataloader().prefetch_factor is None


def test_small_image_defaults_keep_their_identity(folder):
    """crop_flip with the default scale and crop_pct 1 hashes as before the new keys existed."""
    dm = build_datamodule(cfg_of(folder, image_size=16), 8, 0)
    ident = dm.identity()
    assert "rrc_scale" not in ident and "crop_pct" not in ident
    other = build_datamodule(cfg_of(folder, image_size=16, rrc_scale=[0.25, 1.0]), 8, 0)
    assert other.identity()["rrc_scale"] == [0.25, 1.0] and other.fingerprint() != dm.fingerprint()
    net = build_datamodule(cfg_of(folder, image_size=16, augment="imagenet"), 8, 0)
    assert net.identity()["crop_pct"] == 0.875


@pytest.mark.parametrize("key,value,needle", [
    ("augment", "cutmix", "known: none, flip, crop_flip, imagenet"),
    ("rrc_scale", [0.5, 0.1], "data.rrc_scale"),
    ("crop_pct", 1.5, "data.crop_pct"),
    ("decode_device", "tpu", "known: cpu, cuda, auto"),
    ("pin_memory", "maybe", "data.pin_memory"),
    ("prefetch_factor", 0, "data.prefetch_factor"),
])
def test_bad_loader_settings(folder, key, value, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        build_datamodule(cfg_of(folder, **{key: value}), 8, 0)


def test_imagenet_augment_is_for_imagefolder_only():
    with pytest.raises(ConfigError, match="unknown data.augment 'imagenet'"):
        build_datamodule({"name": "synthetic", "augment": "imagenet"}, 8, 0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU-only machine")
def test_cuda_decode_refused_without_a_gpu(folder):
    with pytest.raises(ConfigError, match="data.decode_device=cuda needs a CUDA GPU"):
        build_datamodule(cfg_of(folder, decode_device="cuda"), 8, 0)
    auto = build_datamodule(cfg_of(folder, decode_device="auto", image_size=8), 8, 0)
    assert not auto.decode_on_gpu() and next(iter(auto.train_dataloader()))[0].device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_decode_matches_cpu_decode(folder):
    cpu = build_datamodule(cfg_of(folder, image_size=16, augment="none"), 8, 0)
    gpu = build_datamodule(cfg_of(folder, image_size=16, augment="none", decode_device="cuda", num_workers=2), 8, 0)
    xc, yc, _ = next(iter(cpu.test_dataloader()))
    xg, yg, _ = next(iter(gpu.test_dataloader()))
    assert xg.device.type == "cuda" and torch.equal(yg.cpu(), yc)
    assert (xg.cpu() - xc).abs().mean() < 0.05  # nvJPEG and libjpeg-turbo differ by rounding only


# ---- corrupt files -------------------------------------------------------------------------------------
def test_corrupt_jpeg_names_the_file(tmp_path):
    write_jpegs(tmp_path, "train", {"a": 6, "b": 6})
    write_jpegs(tmp_path, "val", {"a": 2, "b": 2})
    bad = tmp_path / "train" / "b" / "3.jpg"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated
    dm = build_datamodule(cfg_of(tmp_path, image_size=8, num_workers=1), 4, 0)
    with pytest.raises(DataError) as info:
        list(dm.train_eval_dataloader())
    msg = str(info.value)
    assert msg.startswith(f"cannot decode image {bad}") and "\n" not in msg, msg


@pytest.mark.slow  # a long CLI run: in make test-slow (CI runs both)
def test_corrupt_jpeg_in_a_run_is_one_line_exit_1(tmp_path):
    write_jpegs(tmp_path / "img", "train", {"a": 8, "b": 8})
    write_jpegs(tmp_path / "img", "val", {"a": 2, "b": 2})
    bad = tmp_path / "img" / "train" / "a" / "5.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0" + b"\x00garbage" * 20)
    r = run_kdlab(["pipeline=single", "model=plain2", "data=imagefolder", f"data.root={tmp_path / 'img'}",
                   "data.image_size=8", "data.num_workers=1", "data.batch_size=8", "trainer.max_epochs=1",
                   "logger=none", "callbacks.progress=none"], tmp_path / "out", tmp_path / "run", synth=False)
    assert r.returncode == 1, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert lines[0].startswith("kdlab: error: cannot decode image ") and str(bad) in lines[0], lines[0]
    assert read_results(tmp_path / "run")["status"] == "failed"


# ---- end to end through the CLI ------------------------------------------------------------------------
@pytest.mark.slow  # a long CLI run: in make test-slow (CI runs both)
def test_cli_trains_a_zoo_model_on_a_jpeg_folder(folder, tmp_path):
    r = run_kdlab(["pipeline=single", "model=resnet8", "data=imagefolder", f"data.root={folder}",
                   "data.image_size=32", "data.num_workers=2", "data.batch_size=32", "trainer.max_epochs=1",
                   "optimizer.lr=0.05", "logger=csv", "callbacks.progress=none"],
                  tmp_path / "out", tmp_path / "run", synth=False)
    assert r.returncode == 0, r.stderr[-3000:]
    res = read_results(tmp_path / "run")
    assert res["status"] == "completed" and res["dataset"] == "imagefolder"
    (stage,) = res["stages"]
    assert stage["arch"] == "resnet8" and 0.0 <= stage["test_acc"] <= 1.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_gloo_processes_on_a_jpeg_folder(folder, tmp_path):
    """2 CPU processes (gloo) through the FolderLoader: Lightning re-creates it with its distributed sampler."""
    run_dir = tmp_path / "ddp_run"
    r = run_kdlab(["pipeline=single", "model=plain2", "data=imagefolder", f"data.root={folder}",
                   "data.image_size=16", "data.num_workers=1", "data.batch_size=16", "trainer.max_epochs=1",
                   "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "optimizer.lr=0.05",
                   "optimizer.lr_scaling=linear", "optimizer.reference_batch=16", "logger=csv",
                   "callbacks.progress=plain"],
                  tmp_path / "out", run_dir, synth=False, env={"MASTER_PORT": str(_free_port())})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in r.stdout + r.stderr
    assert "lr 0.1 = 0.05 x 32/16 (linear lr scaling, global batch 32" in r.stdout + r.stderr
    res = read_results(run_dir)
    assert res["status"] == "completed" and 0.0 <= res["stages"][0]["test_acc"] <= 1.0




# ---- the ImageNet recipes ------------------------------------------------------------------------------
def _library_arches_registered(cfg) -> str | None:
    """None where every chain arch is a known model name (the library models are another change's), else why not."""
    try:
        from kdlab.models.factory import check_model_name
    except ImportError:
        return "kdlab.models.factory.check_model_name (library model names) does not exist yet"
    chain = cfg["pipeline"]["chain"]
    missing = []
    for arch in (e["arch"] if isinstance(e, dict) else e for e in chain):
        try:
            check_model_name(arch)
        except ConfigError:
            missing.append(arch)
    return f"library models not registered yet: {', '.join(missing)}" if missing else None


@pytest.mark.parametrize("recipe", ["kd_imagenet", "dgkd_imagenet"])
def test_imagenet_recipes_compose(recipe):
    cfg = compose_config(f"+experiment={recipe}", "data.root=/data/imagenet", "trainer=ddp", "trainer.devices=8")
    d, o = cfg["data"], cfg["optimizer"]
    assert (d["name"], d["image_size"], d["augment"], d["crop_pct"], d["batch_size"]) == \
        ("imagefolder", 224, "imagenet", 0.875, 256)
    assert (o["lr"], o["momentum"], o["weight_decay"], o["lr_scaling"], o["reference_batch"]) == \
        (0.1, 0.9, 1e-4, "linear", 256)
    assert cfg["scheduler"]["milestones"] == [30, 60, 90] and cfg["trainer"]["max_epochs"] == 100
    assert (cfg["distill"]["temperature"], cfg["distill"]["lam"]) == (1.0, 0.5)
    teacher = cfg["pipeline"]["chain"][0]
    assert teacher["pretrained"] is True and cfg["pipeline"]["chain"][-1] == "torchvision/resnet18"
    assert compose_config(f"+experiment={recipe}")["data"]["root"] == "???"  # data.root is required
    missing = _library_arches_registered(cfg)
    if missing:
        pytest.skip(missing)
    from kdlab.pipeline.checks import validate_config

    specs = validate_config(cfg)
    assert specs[-1].optimizer["lr"] == pytest.approx(0.8)  # 0.1 x (256 x 8) / 256


def test_val_split_zero_holds_out_nothing_in_every_layout(folder, tmp_path):
    """train + val (the ImageNet layout): val/ is the test set and nothing of train/ is held out; train + val + test:
    val/ is not read (there is no validation split)."""
    dm = build_datamodule(cfg_of(folder, val_split=0), 8, 0)
    dm.setup()
    assert (dm.train_size, dm.val_size, dm.test_size) == (160, 0, 32)
    three = tmp_path / "three"
    write_jpegs(three, "train", {"a": 6, "b": 6})
    write_jpegs(three, "val", {"a": 2, "b": 2})
    write_jpegs(three, "test", {"a": 3, "b": 3})
    dm = build_datamodule(cfg_of(three, val_split=0), 4, 0)
    dm.setup()
    assert (dm.train_size, dm.val_size, dm.test_size) == (12, 0, 6)
    dm = build_datamodule(cfg_of(three), 4, 0)
    dm.setup()
    assert (dm.train_size, dm.val_size, dm.test_size) == (12, 4, 6)  # val/ used as it is
