"""Library models (timm, torchvision) as stages: construction, taps, transforms, preprocessing, pretrained
imports (local weights files only: nothing is downloaded) and their bad inputs."""
from __future__ import annotations

import hashlib
import types

import pytest
import torch
import torch.nn.functional as F

from kdlab.errors import ConfigError
from kdlab.models import FeatureTaps, build_model, feature_points
from kdlab.pipeline.spec import model_spec
from tests.helpers.cli import read_results, run_kdlab, trained
from tests.helpers.config import compose_config

pytest.importorskip("timm")

RGB = ["preset=none", "data=synthetic", "data.channels=3", "data.image_size=32", "data.n_train=320",
       "data.n_test=100", "data.batch_size=64", "logger=csv", "trainer.max_epochs=1", "optimizer.lr=0.01",
       "callbacks.progress=plain"]
TIMM = "timm/test_resnet"  # timm's test-sized ResNet (373k parameters); expects mean/std 0.5, 160 px


def _one_error_line(proc) -> str:
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("kdlab: error:"), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    return lines[0]


# -- construction, attributes, taps, transforms -----------------------------------------------------------
def test_library_models_build_with_kdlab_attributes_and_taps() -> None:
    tv = build_model("torchvision/resnet18", 10, 3, input_size=32)
    assert (tv.arch, tv.num_classes, tv.in_channels) == ("torchvision/resnet18", 10, 3)
    assert feature_points(tv) == {"embedding": "avgpool", "logits": "fc"}
    with FeatureTaps(tv, ["layer4", "logits"]) as taps:
        out = tv(torch.randn(2, 3, 32, 32))
    assert taps.features["layer4"].shape == (2, 512, 1, 1) and torch.equal(taps.features["logits"], out)
    tm = build_model(TIMM, 7, 1, input_size=32)  # grey images: timm's in_chans
    points = feature_points(tm)
    assert points["logits"] == "fc" and points["embedding"] == "global_pool.flatten" and points["prepool"] == "layer4"
    with FeatureTaps(tm, ["layer2", "embedding", "stage2"]) as taps:
        assert tm(torch.randn(2, 1, 32, 32)).shape == (2, 7)
    assert taps.features["embedding"].ndim == 2 and taps.features["layer2"].ndim == 4
    assert not any(getattr(m, "inplace", False) is True for m in tm.modules())  # taps may hold any output
    grey = build_model("torchvision/mobilenet_v3_small", 10, 1, input_size=32)  # first conv replaced
    assert grey(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_quant_and_on_the_fly_apply_to_library_models() -> None:
    from kdlab.models.quant import QuantConv2d, QuantLinear

    q = build_model(TIMM, 10, 3, input_size=32, quant={"weight_bits": 4, "act_bits": 4})
    assert q.quant["layers"] > 0 and isinstance(q.fc, QuantLinear) and isinstance(q.conv1[0], QuantConv2d)
    assert q(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    o = build_model(TIMM, 10, 3, input_size=32, on_the_fly=True)
    assert o.on_the_fly["converted"] > 0
    assert all(m.kernel_size[0] == 1 for m in o.modules() if isinstance(m, torch.nn.Conv2d))
    assert o(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_unknown_names_and_arguments_are_one_line() -> None:
    with pytest.raises(ConfigError, match=r"unknown timm model 'resnt18'; close matches: resnet18"):
        build_model("timm/resnt18", 10)
    with pytest.raises(ConfigError, match=r"unknown torchvision model 'resnet19'; close matches: resnet18"):
        build_model("torchvision/resnet19", 10)
    with pytest.raises(ConfigError, match=r"rejects its arguments \['nonsense'\]"):
        build_model(TIMM, 10, nonsense=1)


# -- spellings and store keys ------------------------------------------------------------------------------
def test_spellings_and_unchanged_zoo_keys() -> None:
    assert model_spec("plain2") == {"arch": "plain2", "on_the_fly": False, "on_the_fly_n": None,
                                    "on_the_fly_mode": "row", "kwargs": {}}  # no pretrained / preprocess keys
    from kdlab.pipeline import build_stages

    zoo = build_stages(compose_config("pipeline=single", "model=plain2"))[0].model
    assert zoo == model_spec("plain2")
    group = build_stages(compose_config("pipeline=single", "model=timm", "model.name=test_resnet"))[0].model
    assert group == model_spec({"arch": TIMM}) and "name" not in group
    spec = model_spec({"arch": TIMM, "pretrained": "/w.pt", "preprocess": "none"})
    assert spec["pretrained"] == "/w.pt" and spec["preprocess"] == "none"
    with pytest.raises(ConfigError, match="preprocess must be auto, none or a mapping"):
        model_spec({"arch": TIMM, "preprocess": "imagenet"})
    cfg = compose_config("pipeline=direct", f"pipeline.chain=[plain4,{TIMM}]",
                         "+pipeline.per_stage.student.model.pretrained=/w.pt")
    with pytest.raises(ConfigError, match="only a stage without sources"):
        build_stages(cfg)


# -- preprocessing ----------------------------------------------------------------------------------------
def _dm(mean, std, size=32, channels=3):  # what build_stage_model reads from a data module
    return types.SimpleNamespace(num_classes=10, in_channels=channels, image_size=size, mean=mean, std=std)


def _first_conv_input(model, x):
    seen = {}
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    h = conv.register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0].detach().clone()))
    with torch.no_grad():
        model.eval()(x)
    h.remove()
    return seen["x"]


def test_each_model_is_fed_its_own_normalization() -> None:
    """A pretrained timm teacher (mean/std 0.5, 160 px) and a zoo student see one batch normalized with the
    data's statistics; the teacher's first conv gets the batch in its own normalization, at its own size."""
    from kdlab.pipeline.assemble import build_stage_model
    from kdlab.pipeline.spec import StageSpec

    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    dm = _dm(mean, std)

    def stage(model):
        return StageSpec(name="s", role="teacher", model=model_spec(model), sources=[], distill={}, optimizer={},
                         scheduler={}, max_epochs=1, seed=0)

    x = torch.randn(2, 3, 32, 32)
    teacher = build_stage_model(stage({"arch": TIMM, "pretrained": "/unused.pt"}), dm)
    assert teacher.preprocess == {"mean": [0.5] * 3, "std": [0.5] * 3, "input_size": [160, 160]}
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    want = F.interpolate((x * s + m - 0.5) / 0.5, size=(160, 160), mode="bilinear", antialias=True,
                         align_corners=False)
    torch.testing.assert_close(_first_conv_input(teacher, x), want, rtol=1e-5, atol=1e-5)
    student = build_stage_model(stage("plain2"), dm)
    torch.testing.assert_close(_first_conv_input(student, x), x)  # the data's own normalization
    scratch = build_stage_model(stage({"arch": TIMM}), dm)  # trained here: it learns the data's normalization
    assert not hasattr(scratch, "preprocess")
    off = build_stage_model(stage({"arch": TIMM, "pretrained": "/unused.pt", "preprocess": "none"}), dm)
    assert not hasattr(off, "preprocess")
    # an explicit mapping (any model), and torchvision's weights' meta (ImageNet statistics, 224 px)
    tv = build_stage_model(stage({"arch": "torchvision/resnet18", "pretrained": "/unused.pt",
                                  "preprocess": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                                                 "input_size": 32}}), dm)
    want = (x * s + m - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / \
        torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(_first_conv_input(tv, x), want, rtol=1e-5, atol=1e-5)
    from kdlab.models.library import expected_input

    assert expected_input(tv, "torchvision/resnet18") == {"mean": [0.485, 0.456, 0.406],
                                                          "std": [0.229, 0.224, 0.225], "input_size": [224, 224]}
    assert tuple(teacher.state_dict()) == tuple(build_model(TIMM, 10, 3).state_dict())  # no new keys


def test_pretrained_weights_are_checked(tmp_path) -> None:
    from kdlab.models.library import load_pretrained
    from kdlab.models.weights import pretrained_state

    model = build_model(TIMM, 10, 3, input_size=32)
    path = tmp_path / "w.safetensors"
    from safetensors.torch import save_file

    save_file(model.state_dict(), str(path))
    state, sha, where = pretrained_state(TIMM, str(path), 3)
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest() and where == str(path)
    fresh = build_model(TIMM, 10, 3, input_size=32)
    load_pretrained(fresh, state, TIMM, where, 10)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    torch.save(build_model(TIMM, 1000, 3).state_dict(), tmp_path / "in1k.pt")
    state, _, where = pretrained_state(TIMM, str(tmp_path / "in1k.pt"), 3)
    with pytest.raises(ConfigError, match=r"has 1000 classes; the data set has 10 \(fc.weight\)"):
        load_pretrained(fresh, state, TIMM, where, 10)
    with pytest.raises(ConfigError, match="needs a library model"):
        pretrained_state("plain2", True, 3)


# -- through the CLI ---------------------------------------------------------------------------------------
@pytest.mark.slow  # a long CLI run: in make test-slow (CI runs both)
def test_pretrained_teacher_and_library_stages_through_the_cli(tmp_path) -> None:
    """A pretrained timm teacher (a local weights file) is imported, not trained; it teaches a torchvision
    TA, which teaches a timm TA, which teaches a zoo student; a second run reuses every stage."""
    import json
    from pathlib import Path

    from kdlab.store import stage_key

    weights = tmp_path / "teacher.pt"
    torch.manual_seed(0)
    torch.save(build_model(TIMM, 10, 3).state_dict(), weights)
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    args = [*RGB, "pipeline=sequential", f"pipeline.chain=[{TIMM},torchvision/resnet18,{TIMM},plain2]",
            f"+pipeline.per_stage.teacher.model.pretrained={weights}",
            "+pipeline.per_stage.teacher.model.preprocess.input_size=64"]  # timm's mean / std, at 64 px
    run1, run2 = tmp_path / "r1", tmp_path / "r2"
    proc = run_kdlab(args, tmp_path, run1, synth=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = read_results(run1)
    assert [s["arch"] for s in res["stages"]] == [TIMM, "torchvision/resnet18", TIMM, "plain2"]
    teacher, *rest = res["stages"]
    assert teacher["pretrained"] is True and teacher["epochs"] == 0 and teacher["train_seconds"] == 0.0
    assert teacher["csv_log"] is None and 0 <= teacher["test_acc"] <= 1  # evaluated, never trained
    assert trained(res) == ["teacher", "ta1", "ta2", "student"]
    assert all(s["epochs"] == 1 and "pretrained" not in s for s in rest)
    meta = json.loads((Path(teacher["checkpoint"]).parent / "meta.json").read_text())
    desc = meta["description"]
    assert desc["pretrained_sha256"] == sha and stage_key(desc) == teacher["store_key"]
    assert "max_epochs" not in desc and desc["model"]["pretrained"] == str(weights)
    assert desc["model"]["preprocess"] == {"input_size": 64}
    proc = run_kdlab(args, tmp_path, run2, synth=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = read_results(run2)
    assert trained(again) == [] and again["stages"][0]["store_key"] == teacher["store_key"]
    assert again["stages"][0]["pretrained"] is True


@pytest.mark.slow  # a long CLI run: in make test-slow (CI runs both)
def test_bad_library_inputs_are_one_line(tmp_path) -> None:
    from kdlab.pipeline.checks import validate_config

    # what `python -m kdlab` checks before it runs (preflight); test_bad_inputs runs it through the CLI
    with pytest.raises(ConfigError, match=r"unknown timm model 'resnt18'; close matches: resnet18"):
        validate_config(compose_config("pipeline=direct", "pipeline.chain=[timm/resnt18,plain2]"))
    with pytest.raises(ConfigError, match=r"model.pretrained '/nonexistent/w.pt' \(stage teacher\) does not exist"):
        validate_config(compose_config("pipeline=direct", f"pipeline.chain=[{TIMM},plain2]",
                                       "+pipeline.per_stage.teacher.model.pretrained=/nonexistent/w.pt"))
    other = tmp_path / "plain6.pt"
    torch.save(build_model("plain6", 10, 3, input_size=32).state_dict(), other)
    line = _one_error_line(run_kdlab([*RGB, "pipeline=direct", f"pipeline.chain=[{TIMM},plain2]",
                                      f"+pipeline.per_stage.teacher.model.pretrained={other}"], tmp_path,
                                     tmp_path / "b", synth=False))
    assert str(other) in line and f"do not match architecture '{TIMM}'" in line and "e.g. missing" in line
