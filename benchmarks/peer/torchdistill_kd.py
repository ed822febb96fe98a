"""torchdistill's image-classification KD job (its examples/torchvision/image_classification.py, cut to
one process), run in the peer venv by bench_peer.py:

    PYTHONPATH=<repo>:<repo>/benchmarks/peer .peer-venv/bin/python torchdistill_kd.py --config cfg.yaml

Per epoch: DistillationBox training (teacher under no_grad, student, KDLoss, SGD step), validation of the
student, a checkpoint whenever the validation accuracy improves. Then the best checkpoint is loaded and the
teacher and the student are tested, as the example script does. Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import time

T_START = time.perf_counter()

import torch
from torchdistill.common import yaml_util
from torchdistill.common.main_util import import_dependencies, load_ckpt, save_ckpt, set_seed
from torchdistill.core.distillation import get_distillation_box
from torchdistill.datasets.util import build_data_loader
from torchdistill.models.registry import get_model


def load_model(model_config, device):
    model = get_model(model_config["key"], None, **model_config["kwargs"])
    load_ckpt(model_config.get("src_ckpt", None), model=model, strict=True)
    return model.to(device)


@torch.inference_mode()
def evaluate(model, data_loader, device) -> float:
    model.eval()
    correct, total = 0, 0
    for image, target in data_loader:
        output = model(image.to(device))
        correct += int((output.argmax(1) == target.to(device)).sum())
        total += target.shape[0]
    return correct / max(total, 1)


def train_one_epoch(box, device) -> None:
    for sample_batch, targets, supp_dict in box.train_data_loader:
        sample_batch, targets = sample_batch.to(device), targets.to(device)
        loss = box.forward_process(sample_batch, targets, supp_dict)
        box.post_forward_process(loss=loss)
        if torch.isnan(loss) or torch.isinf(loss):
            raise ValueError(f"The training loop was broken due to loss = {loss}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    set_seed(args.seed)
    config = yaml_util.load_yaml_file(args.config)
    import_dependencies(config.get("dependencies", None))
    device = torch.device(args.device)
    dataset_dict = config["datasets"]
    models_config = config["models"]
    teacher = load_model(models_config["teacher_model"], device)
    student_cfg = models_config["student_model"]
    student = load_model(student_cfg, device)
    train_config = config["train"]
    box = get_distillation_box(teacher, student, dataset_dict, train_config, device, None, False, 1)
    t_train = time.perf_counter()
    best = 0.0
    epoch_seconds = []
    for epoch in range(box.num_epochs):
        t0 = time.perf_counter()
        box.pre_epoch_process(epoch=epoch)
        train_one_epoch(box, device)
        epoch_seconds.append(time.perf_counter() - t0)
        val = evaluate(box.student_model, box.val_data_loader, device)
        if val > best:
            best = val
            save_ckpt(box.student_model, box.optimizer, box.lr_scheduler, best, args, student_cfg["dst_ckpt"])
        box.post_epoch_process()
    train_seconds = time.perf_counter() - t_train
    box.clean_modules()
    load_ckpt(student_cfg["dst_ckpt"], model=student, strict=True)
    test_cfg = config["test"]["test_data_loader"]
    test_loader = build_data_loader(dataset_dict[test_cfg["dataset_id"]], test_cfg, False)
    teacher_acc = evaluate(teacher, test_loader, device)
    student_acc = evaluate(student, test_loader, device)
    print(json.dumps({"test_acc": student_acc, "teacher_test_acc": teacher_acc, "val_acc": best,
                      "train_seconds": round(train_seconds, 3),
                      "epoch_seconds": [round(s, 3) for s in epoch_seconds],
                      "seconds_in_process": round(time.perf_counter() - T_START, 3)}), flush=True)


if __name__ == "__main__":
    main()
