"""The released CIFAR-100 teachers (RepDistiller / mdistiller ``cifar_teachers``) import as kdlab stages.

For every teacher architecture of the tables, a file is written in the released format: ``{"epoch": 240, "model":
state_dict, ...}`` under ``<arch>_vanilla/ckpt_epoch_240.pth``, random weights under RepDistiller's exact parameter
names and shapes. The names are built here from the structure of RepDistiller's model code (models/resnet.py,
wrn.py, vgg.py), written out as data, with the kdlab name each must land on: independent of kdlab's key map. The
import must be lossless (every tensor of the file is the model's tensor of that name, and they are all of the
model's), and the imported model's logits must equal a functional forward written here from the same reference
code with the file's weights.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kdlab.errors import ConfigError
from kdlab.models import build_model
from kdlab.models.library import load_pretrained
from kdlab.models.released import (
    RELEASED,
    TOLERANCE,
    accuracy_warning,
    check_released_file,
    released_arch,
    released_teacher_file,
)
from kdlab.models.weights import pretrained_state


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def bn(prefix: str, c: int, kd: str | None = None) -> list[tuple[str, str, tuple]]:
    kd = prefix if kd is None else kd
    return [(f"{prefix}.{k}", f"{kd}.{k}", () if k == "num_batches_tracked" else (c,)) for k in BN]


# -- RepDistiller's parameter names and shapes: (RepDistiller name, kdlab name, shape) ------------------------------
def resnet_keys(depth: int, widths: tuple[int, int, int, int], classes: int = 100) -> list[tuple[str, str, tuple]]:
    """models/resnet.py: conv1 / bn1 / layer{1,2,3}.{i}.{conv1,bn1,conv2,bn2[,downsample.0,downsample.1]} / fc;
    a 1x1 downsample where the stride is 2 or the width changes. kdlab: the same names."""
    n = (depth - 2) // 6
    keys = [("conv1.weight", "conv1.weight", (widths[0], 3, 3, 3)), *bn("bn1", widths[0])]
    cin = widths[0]
    for stage, w in enumerate(widths[1:], 1):
        for i in range(n):
            p = f"layer{stage}.{i}"
            c_in = cin if i == 0 else w
            keys += [(f"{p}.conv1.weight", f"{p}.conv1.weight", (w, c_in, 3, 3)), *bn(f"{p}.bn1", w),
                     (f"{p}.conv2.weight", f"{p}.conv2.weight", (w, w, 3, 3)), *bn(f"{p}.bn2", w)]
            if i == 0 and (stage > 1 or cin != w):
                keys += [(f"{p}.downsample.0.weight", f"{p}.downsample.0.weight", (w, c_in, 1, 1)),
                         *bn(f"{p}.downsample.1", w)]
        cin = w
    return keys + [("fc.weight", "fc.weight", (classes, cin)), ("fc.bias", "fc.bias", (classes,))]


def wrn_keys(depth: int, k: int, classes: int = 100) -> list[tuple[str, str, tuple]]:
    """models/wrn.py: conv1 / block{1,2,3}.layer.{i}.{bn1,conv1,bn2,conv2[,convShortcut]} / bn1 / fc; convShortcut
    where the block's input and output widths differ. kdlab: block{s}.{i}.*, ``shortcut``."""
    n = (depth - 4) // 6
    widths = [16, 16 * k, 32 * k, 64 * k]
    keys = [("conv1.weight", "conv1.weight", (16, 3, 3, 3))]
    for stage in (1, 2, 3):
        for i in range(n):
            c_in, w = widths[stage - 1] if i == 0 else widths[stage], widths[stage]
            r, kd = f"block{stage}.layer.{i}", f"block{stage}.{i}"
            keys += [*bn(f"{r}.bn1", c_in, f"{kd}.bn1"), (f"{r}.conv1.weight", f"{kd}.conv1.weight", (w, c_in, 3, 3)),
                     *bn(f"{r}.bn2", w, f"{kd}.bn2"), (f"{r}.conv2.weight", f"{kd}.conv2.weight", (w, w, 3, 3))]
            if c_in != w:
                keys.append((f"{r}.convShortcut.weight", f"{kd}.shortcut.weight", (w, c_in, 1, 1)))
    return keys + [*bn("bn1", widths[3]), ("fc.weight", "fc.weight", (classes, widths[3])),
                   ("fc.bias", "fc.bias", (classes,))]


VGG13 = [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]]


def vgg_keys(cfg: list[list[int]], classes: int = 100) -> list[tuple[str, str, tuple]]:
    """models/vgg.py (batch_norm): block{b} = [conv(bias), BN, ReLU] per width with the last ReLU dropped, so the
    j-th conv is block{b}.{3j} and its BN block{b}.{3j+1}; classifier = Linear(512, classes). kdlab: ``fc``."""
    keys, cin = [], 3
    for b, block in enumerate(cfg):
        for j, c in enumerate(block):
            keys += [(f"block{b}.{3 * j}.weight",) * 2 + ((c, cin, 3, 3),), (f"block{b}.{3 * j}.bias",) * 2 + ((c,),),
                     *bn(f"block{b}.{3 * j + 1}", c)]
            cin = c
    return keys + [("classifier.weight", "fc.weight", (classes, 512)), ("classifier.bias", "fc.bias", (classes,))]


TEACHERS = {
    "resnet56": resnet_keys(56, (16, 16, 32, 64)),
    "resnet110": resnet_keys(110, (16, 16, 32, 64)),
    "resnet32x4": resnet_keys(32, (32, 64, 128, 256)),
    "wrn_40_2": wrn_keys(40, 2),
    "vgg13": vgg_keys(VGG13),
}


# -- the reference forwards, functional, from the same model code (eval mode) --------------------------------------
def _bn(x, w, p):
    return F.batch_norm(x, w[f"{p}.running_mean"], w[f"{p}.running_var"], w[f"{p}.weight"], w[f"{p}.bias"],
                        False, 0.0, 1e-5)


def resnet_forward(w, x, depth):
    n = (depth - 2) // 6
    x = F.relu(_bn(F.conv2d(x, w["conv1.weight"], padding=1), w, "bn1"))
    for stage in (1, 2, 3):
        for i in range(n):
            p, s = f"layer{stage}.{i}", 2 if stage > 1 and i == 0 else 1
            out = F.relu(_bn(F.conv2d(x, w[f"{p}.conv1.weight"], stride=s, padding=1), w, f"{p}.bn1"))
            out = _bn(F.conv2d(out, w[f"{p}.conv2.weight"], padding=1), w, f"{p}.bn2")
            res = _bn(F.conv2d(x, w[f"{p}.downsample.0.weight"], stride=s), w, f"{p}.downsample.1") \
                if f"{p}.downsample.0.weight" in w else x
            x = F.relu(out + res)
    return F.linear(F.avg_pool2d(x, 8).flatten(1), w["fc.weight"], w["fc.bias"])


def wrn_forward(w, x, depth):
    n = (depth - 4) // 6
    x = F.conv2d(x, w["conv1.weight"], padding=1)
    for stage in (1, 2, 3):
        for i in range(n):
            p, s = f"block{stage}.layer.{i}", 2 if stage > 1 and i == 0 else 1
            act = F.relu(_bn(x, w, f"{p}.bn1"))
            out = F.relu(_bn(F.conv2d(act, w[f"{p}.conv1.weight"], stride=s, padding=1), w, f"{p}.bn2"))
            out = F.conv2d(out, w[f"{p}.conv2.weight"], padding=1)
            short = w.get(f"{p}.convShortcut.weight")
            x = (x if short is None else F.conv2d(act, short, stride=s)) + out
    x = F.relu(_bn(x, w, "bn1"))
    return F.linear(F.avg_pool2d(x, 8).flatten(1), w["fc.weight"], w["fc.bias"])


def vgg_forward(w, x, cfg):
    for b, block in enumerate(cfg):
        for j in range(len(block)):
            x = F.conv2d(x, w[f"block{b}.{3 * j}.weight"], w[f"block{b}.{3 * j}.bias"], padding=1)
            x = F.relu(_bn(x, w, f"block{b}.{3 * j + 1}"))  # the block's last ReLU is F.relu in forward()
        if b < 3:  # pool3 only for 64-px inputs
            x = F.max_pool2d(x, 2)
    return F.linear(F.adaptive_avg_pool2d(x, 1).flatten(1), w["classifier.weight"], w["classifier.bias"])


FORWARD = {"resnet56": lambda w, x: resnet_forward(w, x, 56), "resnet110": lambda w, x: resnet_forward(w, x, 110),
           "resnet32x4": lambda w, x: resnet_forward(w, x, 32), "wrn_40_2": lambda w, x: wrn_forward(w, x, 40),
           "vgg13": lambda w, x: vgg_forward(w, x, VGG13)}


def released_file(root: Path, arch: str, seed: int = 0, counts: bool = True) -> tuple[Path, dict]:
    """``<root>/<arch>_vanilla/ckpt_epoch_240.pth`` as RepDistiller's train_teacher.py saves it, random weights
    (float64); ``counts=False``: without ``num_batches_tracked`` (files saved before PyTorch 0.4.1)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for rep, _, shape in TEACHERS[arch]:
        if rep.endswith("num_batches_tracked"):
            if counts:
                state[rep] = torch.tensor(1000, dtype=torch.long)
        elif rep.endswith("running_var"):
            state[rep] = torch.rand(shape, generator=g, dtype=torch.float64) + 0.5
        else:
            state[rep] = torch.randn(shape, generator=g, dtype=torch.float64) * 0.2
    path = root / f"{arch}_vanilla" / "ckpt_epoch_240.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 240, "model": state, "accuracy": torch.tensor(RELEASED[arch]),
                "optimizer": {"state": {}, "param_groups": [{"lr": 5e-4, "params": [0, 1]}]}}, path)
    return path, state


@pytest.mark.parametrize("arch", list(TEACHERS))
def test_released_file_imports_losslessly_and_gives_the_reference_logits(arch, tmp_path):
    path, state = released_file(tmp_path, arch)
    imported, _, where = pretrained_state(arch, str(path), 3)
    model = build_model(arch, 100).double().eval()
    load_pretrained(model, imported, arch, where, 100)
    got = model.state_dict()
    names = {kd for _, kd, _ in TEACHERS[arch]}
    assert names == set(got), f"the model's names: {sorted(set(got) ^ names)[:4]}"  # every tensor, nothing else
    for rep, kd, shape in TEACHERS[arch]:
        assert tuple(got[kd].shape) == shape and torch.equal(got[kd], state[rep].to(got[kd].dtype)), rep
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x), FORWARD[arch](state, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("arch", ["wrn_40_2", "resnet56"])
def test_files_without_batch_counts_import_too(arch, tmp_path):
    path, state = released_file(tmp_path, arch, counts=False)
    imported, _, where = pretrained_state(arch, str(path), 3)
    model = build_model(arch, 100).double().eval()
    load_pretrained(model, imported, arch, where, 100)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), FORWARD[arch](state, x), rtol=1e-10, atol=1e-10)


def test_a_file_of_another_architecture_is_refused(tmp_path):
    path, _ = released_file(tmp_path, "wrn_40_2")
    imported, _, where = pretrained_state("resnet32x4", str(path), 3)
    with pytest.raises(ConfigError, match="do not match architecture 'resnet32x4'"):
        load_pretrained(build_model("resnet32x4", 100), imported, "resnet32x4", where, 100)
    with pytest.raises(ConfigError, match=r"model.pretrained '.*wrn_40_2_vanilla/ckpt_epoch_240.pth' \(stage "
                                          r"teacher\) is the released wrn_40_2 teacher, but the stage's model is "
                                          r"'resnet32x4'; released teachers: resnet56 \(resnet56_vanilla/"):
        check_released_file("resnet32x4", str(path), "teacher")
    check_released_file("wrn_40_2", str(path), "teacher")  # its own architecture
    check_released_file("resnet32x4", str(tmp_path / "mine.pt"), "teacher")  # any other file: its keys decide


def test_released_file_paths_and_names():
    assert released_teacher_file("vgg13", "/t", "teacher") == "/t/vgg13_vanilla/ckpt_epoch_240.pth"
    assert released_arch("/t/resnet32x4_vanilla/ckpt_epoch_240.pth") == "resnet32x4"
    assert released_arch("resnet110_vanilla/ckpt_epoch_240.pth") == "resnet110"
    assert released_arch("/t/resnet32x4_vanilla/ckpt_epoch_200.pth") is None
    with pytest.raises(ConfigError, match=r"model.pretrained=released \(stage teacher\): no released CIFAR-100 "
                                          r"teacher for 'resnet8x4'; released teachers: resnet56 .*vgg13"):
        released_teacher_file("resnet8x4", "/t", "teacher")


def test_the_switch_picks_the_teachers_file_in_every_table_recipe():
    from kdlab.pipeline.spec import build_stages
    from tests.helpers.config import compose_config

    table = {m: "resnet32x4" for m in ("at", "crd", "dist", "dkd", "fitnet", "pkt", "reviewkd", "rkd", "sp")}
    table.update(dgkd_dkd="resnet56", dgkd_dist="resnet56")
    for recipe, arch in ((f"{m}_cifar100", a) for m, a in table.items()):
        cfg = compose_config(f"+experiment={recipe}", "teacher=released", "paths.teachers_dir=/w")
        teacher = build_stages(cfg)[0]
        assert teacher.name == "teacher" and teacher.pretrained == f"/w/{arch}_vanilla/ckpt_epoch_240.pth"
    cfg = compose_config("+experiment=at_cifar100", "teacher=released", "pipeline.chain=[wrn_40_2,wrn_16_2]")
    assert build_stages(cfg)[0].pretrained == f"{cfg['paths']['data_dir']}/cifar_teachers/wrn_40_2_vanilla/" \
                                              f"ckpt_epoch_240.pth"  # paths.teachers_dir's default
    assert all(s.pretrained is None for s in build_stages(compose_config("+experiment=dkd_cifar100")))


@pytest.mark.parametrize("arch,acc,dataset,test_size,classes,warns", [
    ("resnet56", 0.7234, "cifar100", 10000, 100, False),
    ("resnet56", 0.7234 + TOLERANCE / 100 - 1e-6, "cifar100", 10000, 100, False),
    ("resnet110", 0.7027, "cifar100", 10000, 100, True),  # RepDistiller issue #29's measurement of the hosted file
    ("resnet110", 0.7027, "cifar100", 2000, 100, False),  # a test subset: the published number does not apply
    ("resnet110", 0.7027, "cifar10", 10000, 100, False),
])
def test_accuracy_check_against_the_published_accuracy(arch, acc, dataset, test_size, classes, warns):
    where = f"/t/{arch}_vanilla/ckpt_epoch_240.pth"
    note = accuracy_warning(arch, where, acc, dataset, test_size, classes)
    assert (note is not None) == warns
    if warns:
        assert f"tests at {100 * acc:.2f}%" in note and f"published {RELEASED[arch]:.2f}%" in note
    assert accuracy_warning(arch, "/t/mine.pt", 0.1, "cifar100", 10000, 100) is None  # not a released file


@pytest.mark.slow
def test_released_teacher_imports_teaches_is_reused_and_is_checked(tmp_path, monkeypatch, capsys):
    """teacher=released on a CIFAR-100 recipe: the file is imported (never trained), teaches the student, is reused
    by the next run; its test accuracy is checked against the published one (here the tiny test split stands for
    the full one, so the check runs: random weights are far from 72.34 %, a warning)."""
    from kdlab.models import released
    from kdlab.pipeline.runner import run_pipeline
    from tests.helpers.config import compose_config
    from tests.helpers.data import write_cifar100
    write_cifar100(tmp_path / "data", n_train=60, n_test=20)
    path, _ = released_file(tmp_path / "teachers", "resnet56")
    monkeypatch.setattr(released, "CIFAR100_TEST_SIZE", 20)
    cfg = compose_config("+experiment=dkd_cifar100", "teacher=released", f"paths.teachers_dir={tmp_path}/teachers",
                         "pipeline.chain=[resnet56,resnet8]", f"data.root={tmp_path}/data", "data.batch_size=16",
                         "trainer.max_epochs=1", "trainer.precision=32-true", "logger=csv",
                         "callbacks.progress=none", f"paths.output_dir={tmp_path}/out")
    results = []
    for run in ("r1", "r2"):
        run_pipeline(cfg, tmp_path / run)
        results.append(json.loads((tmp_path / run / "results.json").read_text()))
    teacher = results[0]["stages"][0]
    assert teacher["name"] == "teacher" and teacher["pretrained"] is True and teacher["epochs"] == 0
    meta = json.loads((Path(teacher["checkpoint"]).parent / "meta.json").read_text())
    assert meta["imported_from"] == str(path) and meta["description"]["model"]["pretrained"] == str(path)
    assert not teacher["cached"]
    assert [s["cached"] for s in results[1]["stages"]] == [True, True]  # the same file: the same stage, reused
    err = capsys.readouterr().err
    assert err.count("kdlab: warning: the released resnet56 teacher") == 1  # at its import only
    assert f"tests at {100 * teacher['test_acc']:.2f}% on the CIFAR-100 test set, published 72.34%" in err
