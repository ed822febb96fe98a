"""(k) On-disk ImageFolder loader: kdlab's training loader (data=imagefolder) against the loader of torchvision's
reference classification script, over the same generated folder of JPEGs, at the same batch size, workers and
crop size.

    kdlab:      dm.train_dataloader() with data.augment=imagenet: DataLoader workers read the file's bytes,
                torchvision.io.decode_image (libjpeg-turbo), v2 RandomResizedCrop + RandomHorizontalFlip on the
                uint8 tensor, one fused float conversion + normalize; persistent workers, prefetch 2
    reference:  pytorch/vision references/classification/train.py (load_data + main): torchvision.datasets.
                ImageFolder (PIL loader: open + convert RGB) with presets.ClassificationPresetTrain(crop_size)
                (backend pil, use_v2 False: RandomResizedCrop(crop, BILINEAR, antialias=True),
                RandomHorizontalFlip(0.5), PILToTensor, ConvertImageDtype(float), Normalize), a RandomSampler,
                DataLoader(batch_size, sampler, num_workers, pin_memory=True, collate_fn=default_collate)

Each loader is timed over a fixed number of batches after ``warmup`` batches (worker start-up and the
first prefetches are not counted against either); the sides alternate ``repeats`` times and each side's
best repeat counts. pin_memory is what each would use here (no GPU: no pinning).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import common
from common import Options, check, figure, ratio


def make_folder(root: Path, images: int, classes: int, side: int, seed: int = 0) -> Path:
    """``images`` JPEGs (quality 90, ``side`` x ``side``) in ``classes`` class folders under root/train, plus
    a small root/val; smooth class-coloured images with noise, so they compress like photos (~4-8 % of raw)."""
    import torch
    import torch.nn.functional as F
    from torchvision.io import encode_jpeg

    done = root / f".done-{images}-{classes}-{side}"
    if done.exists():
        return root
    g = torch.Generator().manual_seed(seed)
    for split, n in (("train", images), ("val", max(classes, images // 20))):
        for k in range(n):
            c = k % classes
            d = root / split / f"class{c:02d}"
            d.mkdir(parents=True, exist_ok=True)
            low = torch.rand(1, 3, 6, 6, generator=g) * 255
            x = F.interpolate(low, size=(side, side), mode="bicubic", align_corners=False)[0]
            x = (x + 12 * torch.randn(3, side, side, generator=g)).clamp(0, 255).to(torch.uint8)
            (d / f"{k:06d}.jpg").write_bytes(encode_jpeg(x, quality=90).numpy().tobytes())
    done.touch()
    return root


def reference_loader(root: Path, batch_size: int, workers: int, crop: int, pin: bool):
    """torchvision's references/classification/train.py training loader, as that script builds it."""
    import torch
    from torchvision import datasets
    from torchvision import transforms as T
    from torchvision.transforms.functional import InterpolationMode

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    preset = T.Compose([T.RandomResizedCrop(crop, interpolation=InterpolationMode.BILINEAR, antialias=True),
                        T.RandomHorizontalFlip(0.5), T.PILToTensor(), T.ConvertImageDtype(torch.float),
                        T.Normalize(mean=mean, std=std)])
    dataset = datasets.ImageFolder(str(root / "train"), preset)
    sampler = torch.utils.data.RandomSampler(dataset)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                                       pin_memory=pin, collate_fn=torch.utils.data.dataloader.default_collate)


def timed(loader, warmup: int, batches: int) -> dict[str, Any]:
    """samples/s over ``batches`` batches after ``warmup`` (new epochs started as needed)."""
    it = iter(loader)

    def nxt():
        nonlocal it
        try:
            return next(it)
        except StopIteration:
            it = iter(loader)
            return next(it)

    for _ in range(warmup):
        nxt()
    n, t0 = 0, time.perf_counter()
    for _ in range(batches):
        n += int(nxt()[0].shape[0])
    dt = time.perf_counter() - t0
    return {"samples": n, "seconds": round(dt, 3), "samples_per_second": round(n / dt, 1)}


def run(o: Options) -> dict[str, Any]:
    import torch

    quick = o.quick
    images, side, crop = (240, 96, 64) if quick else (3000, 256, 224)
    batch, workers = (16, 2) if quick else (64, 2)
    warmup, batches, repeats = (2, 4, 1) if quick else (4, 30, max(o.repeats, 2))
    root = make_folder(o.workdir / f"imagefolder-{images}-{side}", images, 10, side)
    pin = torch.cuda.is_available()
    dm, _ = common.kdlab_datamodule(["data=imagefolder", f"data.root={root}", f"data.image_size={crop}",
                                     "data.augment=imagenet", f"data.num_workers={workers}",
                                     f"data.batch_size={batch}", "preset=none"])
    kd_loader, ref_loader = dm.train_dataloader(), reference_loader(root, batch, workers, crop, pin)
    runs: dict[str, list[dict[str, Any]]] = {"kdlab": [], "reference": []}
    for _ in range(repeats):  # alternate, so that a change in the machine's load hits both sides
        runs["kdlab"].append(timed(kd_loader, warmup, batches))
        runs["reference"].append(timed(ref_loader, warmup, batches))
    best = {k: max(r["samples_per_second"] for r in v) for k, v in runs.items()}
    xk, xr = next(iter(kd_loader))[0], next(iter(ref_loader))[0]
    same = tuple(xk.shape) == tuple(xr.shape) and xk.dtype == xr.dtype == torch.float32 and \
        abs(float(xk.mean()) - float(xr.mean())) < 0.25
    kd_loader = ref_loader = None  # their workers exit
    r = ratio(best["kdlab"], best["reference"])
    figs = [figure("k_imagefolder", "k. on-disk ImageFolder loader: kdlab / torchvision reference train.py, samples/s",
                   r, "x", ">= 1", check(r, ">=", 1.0),
                   f"kdlab {best['kdlab']:.0f} vs reference {best['reference']:.0f} samples/s; {images} JPEGs "
                   f"{side}px -> {crop}px crops, batch {batch}, {workers} workers")]
    return {"name": "imagefolder", "figures": figs,
            "details": {"runs": runs, "images": images, "side": side, "crop": crop, "batch_size": batch,
                        "workers": workers, "warmup_batches": warmup, "timed_batches": batches,
                        "pin_memory": pin, "batches_agree": same, "folder": str(root)}}


if __name__ == "__main__":
    common.cli(run, __doc__.splitlines()[0])
