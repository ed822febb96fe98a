"""The CIFAR-100 teachers RepDistiller and mdistiller publish, imported as kdlab stages.

RepDistiller (HobbitLong/RepDistiller, ``scripts/fetch_pretrained_teachers.sh``) and mdistiller
(megvii-research/mdistiller, release ``checkpoints``: ``cifar_teachers.tar``; ``mdistiller/models/cifar/__init__.py``)
publish the teachers of their CIFAR-100 tables as ``<model>_vanilla/ckpt_epoch_240.pth``: the last (240th) epoch
of RepDistiller's ``train_teacher.py``, a dict whose ``model`` entry is the state_dict. kdlab imports such a file
as the teacher stage (``model.pretrained``; ``teacher=released`` picks ``${paths.teachers_dir}/<arch>_vanilla/
ckpt_epoch_240.pth`` for the teacher's architecture), its parameter names mapped to the zoo's
(:func:`to_zoo_keys`): the CIFAR ResNets have the same names; WRN's ``blockN.layer.M`` / ``convShortcut`` and
VGG's ``classifier`` are renamed. RepDistiller's ResNet50 (79.34) has no kdlab zoo model, so it is not here.

When an imported released teacher is tested on the full CIFAR-100 test set, its accuracy should be the published
one: :func:`accuracy_warning` names a difference larger than :data:`TOLERANCE`.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from kdlab.errors import ConfigError

#: the released teachers kdlab's zoo builds -> their published CIFAR-100 top-1 (%), RepDistiller README.md
#: (the teacher rows of its two tables; the CRD paper's Tables 1-2)
RELEASED: dict[str, float] = {
    "resnet56": 72.34,
    "resnet110": 74.31,
    "resnet32x4": 79.42,
    "wrn_40_2": 75.61,
    "vgg13": 74.64,
}
#: the file of a released teacher, relative to ``paths.teachers_dir``
FILE = "{arch}_vanilla/ckpt_epoch_240.pth"
#: the largest difference (percentage points) between an imported released teacher's test accuracy on the full
#: CIFAR-100 test set and its published accuracy that passes without a warning: the files are the published
#: weights, so only the evaluation differs (kdlab's normalization constants differ from RepDistiller's in the
#: 4th decimal; GPU kernels' rounding)
TOLERANCE = 0.5
#: the CIFAR-100 test set, the split the published accuracies were measured on
CIFAR100_TEST_SIZE = 10000

_FILE_RE = re.compile(r"(?:^|/)([A-Za-z0-9_]+)_vanilla/ckpt_epoch_240\.pth$")


def known() -> str:
    return ", ".join(f"{a} ({FILE.format(arch=a)})" for a in RELEASED)


def released_teacher_file(arch: str, teachers_dir: str | None, stage: str) -> str:
    """The released teacher's file for ``arch`` under ``teachers_dir`` (``model.pretrained: released`` of stage
    ``stage``); a ConfigError naming the stage, the architecture and the released ones for another architecture."""
    if arch not in RELEASED:
        raise ConfigError(f"model.pretrained=released (stage {stage}): no released CIFAR-100 teacher for {arch!r}; "
                          f"released teachers: {known()}")
    if not teachers_dir:
        raise ConfigError(f"model.pretrained=released (stage {stage}) needs paths.teachers_dir (the folder of the "
                          f"unpacked cifar_teachers archive)")
    return str(Path(str(teachers_dir)).expanduser() / FILE.format(arch=arch))


def released_arch(path: str) -> str | None:
    """The architecture a path names by the released file layout (``<arch>_vanilla/ckpt_epoch_240.pth``), if any."""
    m = _FILE_RE.search(str(path).replace("\\", "/"))
    return m.group(1) if m else None


def check_released_file(arch: str, path: str, stage: str) -> None:
    """A ConfigError when ``path`` is a released teacher's file (by its name) of another architecture than ``arch``."""
    named = released_arch(path)
    if named is not None and named != arch:
        raise ConfigError(f"model.pretrained {path!r} (stage {stage}) is the released {named} teacher, but the "
                          f"stage's model is {arch!r}; released teachers: {known()}")


def to_zoo_keys(arch: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """RepDistiller's (and mdistiller's) parameter names of zoo model ``arch`` as kdlab's.

    WRN: ``blockN.layer.M.*`` -> ``blockN.M.*``, ``convShortcut`` -> ``shortcut``; VGG: ``classifier.*`` -> ``fc.*``;
    the CIFAR ResNets use kdlab's names already. Names already in kdlab's form pass unchanged, so a file kdlab wrote
    imports too. A BatchNorm without ``num_batches_tracked`` (files saved before PyTorch 0.4.1) gets a zero count,
    which evaluation never reads."""
    from kdlab.models.factory import model_family

    family = model_family(arch)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if family == "wrn":
            key = re.sub(r"^(block\d+)\.layer\.(\d+)\.", r"\1.\2.", key).replace(".convShortcut.", ".shortcut.")
        elif family == "vgg":
            key = re.sub(r"^classifier\.", "fc.", key)
        out[key] = value
    for key in [k for k in out if k.endswith(".running_mean")]:
        count = key[: -len("running_mean")] + "num_batches_tracked"
        out.setdefault(count, torch.tensor(0, dtype=torch.long))
    return out


def accuracy_warning(arch: str, imported_from: str, test_acc: float, dataset: str, test_size: int,
                     num_classes: int) -> str | None:
    """The warning for a released teacher (by its file name) whose test accuracy on the full CIFAR-100 test set is
    more than :data:`TOLERANCE` points from the published one; None otherwise (and on any other test split, where
    the published number does not apply)."""
    if released_arch(imported_from) != arch or arch not in RELEASED:
        return None
    if dataset != "cifar100" or int(test_size) != CIFAR100_TEST_SIZE or int(num_classes) != 100:
        return None
    published = RELEASED[arch]
    measured = 100.0 * float(test_acc)
    if abs(measured - published) <= TOLERANCE:
        return None
    return (f"the released {arch} teacher {imported_from!r} tests at {measured:.2f}% on the CIFAR-100 test set, "
            f"published {published:.2f}% (tolerance {TOLERANCE} points): check the file and data.mean/std")
