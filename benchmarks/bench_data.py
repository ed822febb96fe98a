"""(b) Data path: kdlab's in-memory batched augmentation against torchvision's DataLoader with PIL
transforms, over the same images (the Fashion-MNIST training split kdlab uses, 54,000 images), producing
the same batches: random 28x28 crop of the 4-pixel zero-padded image, random horizontal flip, normalized
float32, batch 128, shuffled.

    kdlab:       dm.train_dataloader() with data.augment=crop_flip (uint8 tensor -> gather crop/flip ->
                 normalize, whole batches, in the training process)
    torchvision: DataLoader(FashionMNIST(transform=Compose([RandomCrop(28, padding=4),
                 RandomHorizontalFlip(), ToTensor(), Normalize()])), batch_size=128, shuffle=True,
                 num_workers=2, persistent_workers=True)

Both are timed from the first batch's arrival (worker start-up is not counted against torchvision) until
at least ``seconds`` have passed; samples/s counts the batches after the first.
"""
from __future__ import annotations

import time
from typing import Any

import common
from common import Options, check, figure, ratio


def _rate(batches, seconds: float) -> dict[str, Any]:
    it = iter(batches())
    next(it)  # the first batch: worker start-up, generator creation
    n, t0 = 0, time.perf_counter()
    while True:
        try:
            x = next(it)[0]
        except StopIteration:
            it = iter(batches())
            continue
        n += x.shape[0]
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return {"samples": n, "seconds": round(elapsed, 3), "samples_per_second": round(n / elapsed, 1)}


def run(o: Options) -> dict[str, Any]:
    import torch
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets, transforms

    dm, _ = common.kdlab_datamodule(["data.subset=null", "data.augment=crop_flip", "data.pad=4",
                                         f"data.batch_size={128}"])
    seconds = 1.0 if o.quick else 10.0
    kd = _rate(dm.train_dataloader, seconds)

    tf = transforms.Compose([transforms.RandomCrop(dm.image_size, padding=dm.pad), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(), transforms.Normalize(dm.mean, dm.std)])
    ds = Subset(datasets.FashionMNIST(common.torchvision_fashion_root(o), train=True, download=False, transform=tf),
                [int(i) for i in dm.train_index])
    loader = DataLoader(ds, batch_size=128, shuffle=True, num_workers=2, persistent_workers=True)
    tv = _rate(lambda: loader, seconds)
    loader = None  # its persistent workers exit

    # the same batches: shapes, dtype and value range agree
    xk = next(iter(dm.train_dataloader()))[0]
    xt = next(iter(DataLoader(ds, batch_size=128)))[0]
    same = xk.shape == xt.shape and xk.dtype == xt.dtype == torch.float32 and \
        abs(float(xk.mean()) - float(xt.mean())) < 0.2
    r = ratio(kd["samples_per_second"], tv["samples_per_second"])
    figs = [figure("b_data", "b. data path: kdlab batched aug / torchvision DataLoader+PIL (2 workers), samples/s",
                   r, "x", ">= 10", check(r, ">=", 10.0),
                   f"kdlab {kd['samples_per_second']:.0f} vs torchvision {tv['samples_per_second']:.0f} samples/s "
                   f"over {dm.train_size} images")]
    return {"name": "data", "figures": figs,
            "details": {"kdlab": kd, "torchvision": tv, "images": dm.train_size, "batches_agree": same}}


if __name__ == "__main__":
    common.cli(run, __doc__.splitlines()[0])
