"""The fallback peer: a classic PyTorch KD script (torchvision FashionMNIST + PIL transforms + DataLoader,
teacher under no_grad, Hinton KD), used by bench_peer.py only when torchdistill cannot be installed or
run. Same data split, models, settings, checkpoint rule and JSON output as torchdistill_kd.py.

    python classic_kd.py --root R --index-file I --teacher T --epochs E --workers W --out-ckpt C
"""
from __future__ import annotations

import argparse
import json
import time

T_START = time.perf_counter()

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms

from kdlab.models import build_model


@torch.inference_mode()
def evaluate(model, loader) -> float:
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += int((model(x).argmax(1) == y).sum())
        total += y.shape[0]
    return correct / max(total, 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--index-file", required=True)
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--teacher-arch", default="plain10")
    ap.add_argument("--student-arch", default="plain2")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out-ckpt", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--settings", default="{}", help="JSON: lr, momentum, weight_decay, temperature, alpha, "
                    "batch_size, eval_batch_size, mean, std (bench_peer.py passes kdlab's)")
    a = ap.parse_args()
    st = {"lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4, "temperature": 4.0, "alpha": 0.5, "batch_size": 128,
          "eval_batch_size": 256, "mean": [0.2860], "std": [0.3530], **json.loads(a.settings)}
    torch.manual_seed(a.seed)
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(st["mean"], st["std"])])
    index = torch.load(a.index_file, weights_only=True)
    train_set = datasets.FashionMNIST(a.root, train=True, download=False, transform=tf)
    test_set = datasets.FashionMNIST(a.root, train=False, download=False, transform=tf)
    loaders = {
        "train": DataLoader(Subset(train_set, index["train"].tolist()), batch_size=st["batch_size"], shuffle=True,
                            num_workers=a.workers),
        "val": DataLoader(Subset(train_set, index["val"].tolist()), batch_size=st["eval_batch_size"],
                          num_workers=a.workers),
        "test": DataLoader(Subset(test_set, index["test"].tolist()), batch_size=st["eval_batch_size"],
                           num_workers=a.workers),
    }
    kw = {"num_classes": 10, "in_channels": 1, "input_size": 28}
    teacher = build_model(a.teacher_arch, **kw)
    teacher.load_state_dict(torch.load(a.teacher, weights_only=True))
    teacher.eval()
    student = build_model(a.student_arch, **kw)
    opt = torch.optim.SGD(student.parameters(), lr=st["lr"], momentum=st["momentum"], weight_decay=st["weight_decay"])
    T, alpha = st["temperature"], st["alpha"]
    best, epoch_seconds = 0.0, []
    t_train = time.perf_counter()
    for _ in range(a.epochs):
        t0 = time.perf_counter()
        student.train()
        for x, y in loaders["train"]:
            with torch.no_grad():
                t_logits = teacher(x)
            logits = student(x)
            soft = F.kl_div(F.log_softmax(logits / T, 1), F.softmax(t_logits / T, 1), reduction="batchmean")
            loss = alpha * F.cross_entropy(logits, y) + (1 - alpha) * T * T * soft
            opt.zero_grad()
            loss.backward()
            opt.step()
        epoch_seconds.append(time.perf_counter() - t0)
        val = evaluate(student, loaders["val"])
        if val > best:
            best = val
            torch.save({"model": student.state_dict(), "optimizer": opt.state_dict()}, a.out_ckpt)
    train_seconds = time.perf_counter() - t_train
    student.load_state_dict(torch.load(a.out_ckpt, weights_only=True)["model"])
    print(json.dumps({"test_acc": evaluate(student, loaders["test"]),
                      "teacher_test_acc": evaluate(teacher, loaders["test"]), "val_acc": best,
                      "train_seconds": round(train_seconds, 3), "epoch_seconds": [round(s, 3) for s in epoch_seconds],
                      "seconds_in_process": round(time.perf_counter() - T_START, 3)}), flush=True)


if __name__ == "__main__":
    main()
