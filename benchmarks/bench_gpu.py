"""(5) GPU: one CIFAR-100-shaped KD epoch (synthetic 3x32x32 images, 100 classes, crop+flip augmentation,
the teacher run live) of resnet32x4 -> resnet8x4, and one ImageNet-shaped KD epoch (torchvision ResNet-34 ->
ResNet-18, synthetic 3x224x224 images, 1,000 classes, channels_last) through kdlab's pipeline, each in fp32 and
bf16-mixed: images/s and the fraction of the GPU's peak FLOP rate that the step uses.

FLOPs per training image = 2 x (teacher forward MACs + 3 x student forward MACs) (a backward pass costs
about twice its forward), counted by ``kdlab.models.count_macs``. Peaks are the vendor's dense figures
(``PEAK_TFLOPS``): fp32 runs are compared with the TF32 tensor-core peak (PyTorch's default for
convolutions) and the plain FP32 peak, bf16 runs with the BF16 peak.

Without a CUDA device the benchmark reports that none was available (``--gpu-dry-run`` runs the same code
path on the CPU at a tiny size, to check it).
"""
from __future__ import annotations

import sys
from typing import Any

import common
from common import Options, figure

DRY_RUN = False

#: the two KD steps measured: the CIFAR-100 shape, and the ImageNet shape of the issue on ImageNet scale
#: (torchvision's ResNet-34 -> ResNet-18 at 224 px, 1,000 classes, channels_last; synthetic images: a step
#: costs the same whatever the pixels, and no download is needed)
SETUPS = {
    "cifar": {"teacher": "resnet32x4", "student": "resnet8x4", "classes": 100, "size": 32, "dry_size": 32,
              "n_train": 50000, "dry_train": 256, "batch": 128, "dry_batch": 128, "extra": [], "prefix": "g_"},
    "imagenet": {"teacher": "torchvision/resnet34", "student": "torchvision/resnet18", "classes": 1000,
                 "size": 224, "dry_size": 64, "n_train": 12800, "dry_train": 64, "batch": 256, "dry_batch": 32,
                 "extra": ["speed.channels_last=true"], "prefix": "g_imagenet_"},
}

# dense TFLOP/s: (fp32, tf32, bf16), by a substring of torch.cuda.get_device_name()
PEAK_TFLOPS = {
    "H200": (66.9, 494.7, 989.4), "H100 PCIe": (51.2, 378.0, 756.0), "H100": (66.9, 494.7, 989.4),
    "A100": (19.5, 156.0, 312.0), "L40S": (91.6, 183.0, 362.0), "L4": (30.3, 60.0, 121.0),
    "A10": (31.2, 62.5, 125.0), "RTX 4090": (82.6, 82.6, 165.2),
}


def peak_for(name: str) -> tuple[float, float, float] | None:
    for key, peak in PEAK_TFLOPS.items():
        if key in name:
            return peak
    return None


def run(o: Options) -> dict[str, Any]:
    import torch

    from kdlab.models import build_model, count_macs

    dry = DRY_RUN
    if not torch.cuda.is_available() and not dry:
        return {"name": "gpu", "figures": [figure("g_none", "5. GPU: resnet32x4 -> resnet8x4 KD epoch (CIFAR-100 "
                                                  "shape) and ResNet-34 -> ResNet-18 at 224 px", None, "", None,
                                                  None, "no GPU on this machine: not measured")],
                "details": {"gpu": None}}
    name = "cpu (dry run)" if dry else torch.cuda.get_device_name(0)
    peak = None if dry else peak_for(name)
    figs: list[dict] = []
    details: dict[str, Any] = {"gpu": name}
    for tag, setup in SETUPS.items():
        size = setup["dry_size"] if dry else setup["size"]
        teacher, student, classes = setup["teacher"], setup["student"], setup["classes"]
        base = [f"paths.output_dir={o.workdir / 'runs'}", f"paths.store_dir={o.workdir / 'store-gpu'}",
                "preset=none", "data=synthetic", f"data.num_classes={classes}", "data.channels=3",
                f"data.image_size={size}", f"data.n_train={setup['dry_train'] if dry else setup['n_train']}",
                f"data.n_test={64 if dry else 1000}", "data.augment=crop_flip",
                f"data.batch_size={setup['dry_batch'] if dry else setup['batch']}", "logger=csv",
                "callbacks.progress=none", "pipeline=direct", f"pipeline.chain=[{teacher},{student}]", "distill=kd",
                "distill.cache=off", "trainer.max_epochs=1", *setup["extra"],
                "trainer.accelerator=" + ("cpu" if dry else "gpu")]
        shape = (3, size, size)
        macs_t = count_macs(build_model(teacher, num_classes=classes, in_channels=3, input_size=size), shape)
        macs_s = count_macs(build_model(student, num_classes=classes, in_channels=3, input_size=size), shape)
        flops_per_image = 2 * (macs_t + 3 * macs_s)
        details[tag] = {"flops_per_image": flops_per_image, "macs": {teacher: macs_t, student: macs_s},
                        "image_size": size}
        for precision in ("32-true", "bf16-mixed"):
            r = _kd_epoch(o, base, precision, f"{tag}-{precision}")
            rate = r["samples_per_second"]
            achieved = rate * flops_per_image / 1e12 if rate else None
            frac = None
            note = f"{rate} images/s, {achieved and round(achieved, 2)} TFLOP/s"
            if peak and achieved:
                ref = peak[2] if precision == "bf16-mixed" else peak[1]
                frac = round(achieved / ref, 4)
                note += f" = {frac:.1%} of {'BF16' if precision == 'bf16-mixed' else 'TF32'} peak {ref} TFLOP/s"
                if precision == "32-true":
                    note += f" ({achieved / peak[0]:.1%} of FP32 peak {peak[0]})"
            figs.append(figure(f"{setup['prefix']}{precision}",
                               f"5. GPU {name}: KD epoch {teacher} -> {student} at {size} px, {precision}", rate,
                               "images/s", None, None, note))
            details[tag][precision] = {**r, "tflops": achieved, "fraction_of_peak": frac}
    return {"name": "gpu", "figures": figs, "details": details}


def _kd_epoch(o: Options, base: list[str], precision: str, tag: str) -> dict[str, Any]:
    """Train (or reuse) the teacher (one epoch, same precision), then time one KD epoch of the student with
    the teacher live (steady-state images/s, BatchTimer)."""
    results, rec = common.run_pipeline([*base, f"trainer.precision={precision}"], f"gpu-{tag}", o)
    stage = results["stages"][-1]
    common.drop_stage(o, stage["store_key"], store=o.workdir / "store-gpu")
    timer = rec.train_timer()
    return {"samples_per_second": round(timer.rate, 1) if timer and timer.rate else None,
            "fit_seconds": stage["train_seconds"], "test_acc": stage["test_acc"]}


if __name__ == "__main__":
    if "--gpu-dry-run" in sys.argv:
        sys.argv.remove("--gpu-dry-run")
        DRY_RUN = True
    common.cli(run, __doc__.splitlines()[0])
