"""DAFL (data-free distillation): loss terms against independent numpy arithmetic, the generator, the zoo's
LeNet-5 pair, the stage that never reads the training split, its determinism and resume, and the recipe
end to end on Fashion-MNIST."""
from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from PIL import Image

from kdlab.distill.base import StrategyContext, build_strategy
from kdlab.errors import ConfigError
from kdlab.models import GENERATORS, build_generator, build_model, count_params, feature_shapes
from tests.helpers.cli import FASHION_MNIST_DIR, read_results, run_kdlab
from tests.helpers.config import compose_dictconfig

GRID = 8  # images per row of the saved grids (kdlab.modules.datafree: 64 images)


def dafl(**opts):
    ctx = StrategyContext("student", ["teacher"], 3)
    return build_strategy({"strategy": "dafl", "dafl": opts}, ctx)


# -- loss terms, worked out with numpy -------------------------------------------------------------------------
def np_softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_loss_terms_match_numpy():
    rng = np.random.default_rng(0)
    z_t = rng.normal(size=(5, 3)) * 2
    z_s = rng.normal(size=(5, 3))
    f_t = rng.normal(size=(5, 4, 2, 2))
    p = np_softmax(z_t)
    want_oh = -np.mean(np.log(p[np.arange(5), z_t.argmax(1)]))
    want_a = -np.mean(np.abs(f_t))
    mean_p = p.mean(0)
    want_ie = np.sum(mean_p * np.log10(mean_p))
    want_kd = np.sum(p * (np.log(p) - np.log(np_softmax(z_s)))) / 5
    s = dafl(oh=0.5, a=0.25, ie=2.0)
    terms, weights = s.generator_terms(torch.tensor(z_t), torch.tensor(f_t))
    assert weights == {"oh": 0.5, "a": 0.25, "ie": 2.0}
    for name, want in (("oh", want_oh), ("a", want_a), ("ie", want_ie)):
        assert terms[name].item() == pytest.approx(want, rel=1e-6), name
    assert s.kd_term(torch.tensor(z_s), torch.tensor(z_t)).item() == pytest.approx(want_kd, rel=1e-6)


def test_entropy_term_is_smallest_for_balanced_batches():
    s = dafl()
    balanced = torch.eye(3) * 20  # one confident image per class: batch-mean distribution uniform
    one_class = torch.tensor([[20.0, 0, 0]] * 3)
    ie_balanced = s.generator_terms(balanced, torch.ones(3, 1))[0]["ie"].item()
    assert ie_balanced == pytest.approx(-math.log10(3), abs=1e-6)
    assert ie_balanced < s.generator_terms(one_class, torch.ones(3, 1))[0]["ie"].item()
    # the one-hot term is small for confident outputs, large for flat ones
    assert s.generator_terms(balanced, torch.ones(3, 1))[0]["oh"] < s.generator_terms(
        torch.zeros(3, 3), torch.ones(3, 1))[0]["oh"]


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="unknown generator 'gan'; known: dafl, noise"):
        dafl(generator="gan")
    with pytest.raises(ConfigError, match=r"distill.dafl.batch_size must be an integer >= 1, got 0"):
        dafl(batch_size=0)
    with pytest.raises(ConfigError, match=r"distill.dafl.iters_per_epoch must be an integer >= 1, got 0"):
        dafl(iters_per_epoch=0)
    with pytest.raises(ConfigError, match="unknown distill.dafl key"):
        dafl(alpha=1)
    with pytest.raises(ConfigError, match="exactly one teacher"):
        build_strategy({"strategy": "dafl"}, StrategyContext("student", ["t1", "t2"], 3))
    with pytest.raises(ConfigError, match="generator_optimizer"):
        dafl(generator_optimizer={"_target_": "torch.optim.NoSuchOptimizer", "_partial_": True})


# -- the generator and the zoo pair ----------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (3, 30, 22), (2, 9, 13)])
def test_generator_output_shape_and_range(shape):
    torch.manual_seed(0)
    g = build_generator("dafl", shape, latent_dim=16)
    x = g(g.sample(32))
    assert x.shape == (32, *shape) and torch.isfinite(x).all()
    # training mode: the last BN (no affine) standardizes each channel over the batch
    per_channel = x.transpose(0, 1).flatten(1)
    assert torch.allclose(per_channel.mean(1), torch.zeros(shape[0]), atol=1e-4)
    assert torch.allclose(per_channel.var(1, unbiased=False), torch.ones(shape[0]), atol=1e-2)
    x.pow(2).mean().backward()
    assert all(p.grad is not None for p in g.parameters())
    # the latent batch follows the torch.Generator it is drawn from
    a, b = (g.sample(4, torch.Generator().manual_seed(3)) for _ in range(2))
    assert torch.equal(a, b) and a.shape == (4, 16)
    noise = build_generator("noise", shape)
    z = noise.sample(5, torch.Generator().manual_seed(0))
    assert z.shape == (5, *shape) and torch.equal(noise(z), z) and not list(noise.parameters())


def test_generator_size_follows_the_latent_and_the_image():
    def linear_params(latent, h, w):  # Linear(latent -> 128 * ceil(h/4) * ceil(w/4))
        n = 128 * math.ceil(h / 4) * math.ceil(w / 4)
        return latent * n + n

    for latent, (c, h, w) in ((100, (1, 28, 28)), (1000, (3, 32, 32)), (7, (3, 30, 22))):
        g = build_generator("dafl", (c, h, w), latent_dim=latent)
        assert count_params(g.l1) == linear_params(latent, h, w)
        assert g.conv3.out_channels == c
    assert GENERATORS.names() == ["dafl", "noise"]
    with pytest.raises(ConfigError, match="unknown generator"):
        build_generator("gan", (1, 28, 28))


def lenet_params_by_hand(widths, in_ch=1, classes=10):
    c1, c2, c3, f1 = widths
    convs = [(in_ch, c1, 25), (c1, c2, 25), (c2, c3, 25), (c3, f1, 1)]
    return sum(cin * cout * k + cout for cin, cout, k in convs) + f1 * classes + classes


def test_lenet_pair():
    assert count_params(build_model("lenet5", 10, 1, input_size=28)) == lenet_params_by_hand((6, 16, 120, 84))
    assert count_params(build_model("lenet5_half", 10, 1, input_size=28)) == lenet_params_by_hand((3, 8, 60, 42))
    # ZSKD's LeNet-5-Half (Lopes et al. 2017): half convolutions, full FC widths; the paper's parameter counts
    assert count_params(build_model("lenet5_half_conv", 10, 1, input_size=28)) == lenet_params_by_hand((3, 8, 120, 84))
    assert [count_params(build_model(a, 10, 1, input_size=28)) for a in ("lenet5", "lenet5_half_conv")] == \
        [61_706, 35_820]
    for size in (28, 32):  # the 120-channel map (DAFL's feature) is 1x1 for both sizes
        m = build_model("lenet5", 10, 1, input_size=size)
        assert feature_shapes(m, ["stage3"], (1, size, size))["stage3"] == (120, 1, 1)


# -- the stage, in process ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "lenet5.pt"
    torch.save(build_model("lenet5", 10, 1, input_size=28).state_dict(), path)
    return path


def tiny(store, teacher_ckpt, *extra):
    return compose_dictconfig(
        "pipeline=data_free", "distill=dafl", "preset=none", "data=synthetic", "data.n_train=256", "data.n_test=64",
        "data.batch_size=64", "logger=csv", "callbacks.progress=none", "optimizer=adam", "trainer.max_epochs=2",
        "distill.dafl.batch_size=16", "distill.dafl.iters_per_epoch=3", "distill.dafl.latent_dim=8",
        "distill.dafl.teacher_tap=stage3", f"pipeline.teacher_checkpoint={teacher_ckpt}",
        f"paths.store_dir={store}", *extra)


def run(tmp_path, name, teacher_ckpt, *extra, store=None):
    from kdlab.pipeline.runner import run_pipeline

    return run_pipeline(tiny(store or tmp_path / f"store_{name}", teacher_ckpt, *extra), tmp_path / name)


def student_weights(results):
    return torch.load(results["stages"][-1]["checkpoint"], weights_only=True)


def test_the_training_split_is_never_read(tmp_path, teacher_ckpt, monkeypatch):
    from kdlab.data.base import TensorDataModule

    def refuse(self):
        raise AssertionError("the training split was read")

    calls = {"val": 0, "test": 0}
    for split in ("val", "test"):
        real = getattr(TensorDataModule, f"{split}_dataloader")

        def counted(self, real=real, split=split):
            calls[split] += 1
            return real(self)

        monkeypatch.setattr(TensorDataModule, f"{split}_dataloader", counted)
    monkeypatch.setattr(TensorDataModule, "train_dataloader", refuse)
    monkeypatch.setattr(TensorDataModule, "train_eval_dataloader", refuse)
    results = run(tmp_path, "run", teacher_ckpt)
    assert results["status"] == "completed"
    student = results["stages"][-1]
    assert student["data_free"] is True and student["sources"] == ["teacher"]
    assert calls["val"] >= 2 and calls["test"] >= 1  # reported on the real validation / test splits
    # test_acc is the last epoch's; the best-on-val epoch is labelled as such
    assert student["test_acc"] == student["test_acc_last"] == results["final"]["test_acc"]
    assert student["val_acc"] == student["val_curve"][-1]
    assert student["val_acc_best"] == max(student["val_curve"])
    assert 0.0 <= student["test_acc_best_val"] <= 1.0
    gen = build_generator("dafl", (1, 28, 28), latent_dim=8)
    assert student["extra_params"] == count_params(gen)  # the generator: trained, never exported
    assert set(student_weights(results)) == set(build_model("lenet5_half", 10, 1, input_size=28).state_dict())
    grids = sorted((tmp_path / "run" / "generated" / "student").glob("epoch_*.png"))
    assert [g.name for g in grids] == ["epoch_000.png", "epoch_001.png"]
    a, b = (np.asarray(Image.open(g)) for g in grids)
    assert not np.array_equal(a, b)  # the generator was trained between the two epochs


@pytest.mark.slow  # a long CLI run: in make test-slow (CI runs both)
def test_same_seed_same_student_and_resume_after_a_crash(tmp_path, teacher_ckpt, monkeypatch):
    from kdlab.modules.datafree import DataFreeModule

    first = run(tmp_path, "a", teacher_ckpt)
    again = run(tmp_path, "b", teacher_ckpt)
    w1, w2 = student_weights(first), student_weights(again)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert first["stages"][-1]["test_acc"] == again["stages"][-1]["test_acc"]
    assert first["stages"][-1]["store_key"] == again["stages"][-1]["store_key"]
    other = run(tmp_path, "seed1", teacher_ckpt, "seed=1")
    assert other["stages"][-1]["store_key"] != first["stages"][-1]["store_key"]
    assert not all(torch.equal(w1[k], v) for k, v in student_weights(other).items())
    # the stage is keyed by its teacher and its own config
    assert run(tmp_path, "ie", teacher_ckpt, "distill.dafl.ie=1.0")["stages"][-1]["store_key"] != \
        first["stages"][-1]["store_key"]

    # a crash as the second epoch starts (the first one's checkpoint written), then the same command again:
    # it resumes from that checkpoint and ends with the same student as the uninterrupted run
    real = DataFreeModule.on_train_epoch_start

    def crash(self):
        if self.current_epoch == 1:
            raise RuntimeError("simulated crash")
        real(self)

    store = tmp_path / "store_crash"
    monkeypatch.setattr(DataFreeModule, "on_train_epoch_start", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path, "crash1", teacher_ckpt, store=store)
    assert list(store.rglob("last.ckpt"))
    monkeypatch.setattr(DataFreeModule, "on_train_epoch_start", real)
    resumed = run(tmp_path, "crash2", teacher_ckpt, store=store)
    assert not resumed["stages"][-1]["cached"]
    w3 = student_weights(resumed)
    assert all(torch.equal(w1[k], w3[k]) for k in w1)
    assert [p.name for p in (tmp_path / "crash2" / "generated" / "student").glob("*.png")] == ["epoch_001.png"]


def test_noise_baseline_and_wandb_images(tmp_path, teacher_ckpt, monkeypatch):
    from pytorch_lightning.loggers import WandbLogger

    logged = []
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr(WandbLogger, "log_image", lambda self, key, images, **kw: logged.append((key, images)))
    results = run(tmp_path, "noise", teacher_ckpt, "distill.dafl.generator=noise", "logger=wandb",
                  f"logger.wandb.save_dir={tmp_path / 'wandb'}")
    student = results["stages"][-1]
    assert student["data_free"] is True and student["extra_params"] == 0
    grids = sorted((tmp_path / "noise" / "generated" / "student").glob("epoch_*.png"))
    assert len(grids) == 2
    a, b = (np.asarray(Image.open(g)) for g in grids)
    assert np.array_equal(a, b)  # fixed latent batch, nothing to train: the same noise each epoch
    assert [key for key, _ in logged] == ["train/generated"] * 2 and [im for _, im in logged] == [[str(g)] for g in grids]


def test_pipeline_data_free_needs_a_data_free_strategy():
    from omegaconf import OmegaConf

    from kdlab.pipeline.checks import validate_config

    cfg = OmegaConf.to_container(compose_dictconfig("pipeline=data_free", "distill=kd"), resolve=True)
    with pytest.raises(ConfigError, match="pipeline=data_free needs a data-free strategy"):
        validate_config(cfg)


# -- the recipe, end to end ------------------------------------------------------------------------------------
@pytest.mark.slow  # a long CLI run: in make test-slow (CI runs both)
@pytest.mark.skipif(not FASHION_MNIST_DIR.exists(), reason="Fashion-MNIST is not installed")
def test_recipe_end_to_end(tmp_path):
    r = run_kdlab(["+experiment=dafl_fashion_mnist", "data.subset=1000", "data.test_subset=200", "trainer.max_epochs=1",
                   "pipeline.per_stage.student.max_epochs=2", "distill.dafl.iters_per_epoch=2",
                   "distill.dafl.batch_size=8", "logger=csv", "callbacks.progress=plain"],
                  tmp_path / "out", tmp_path / "run", synth=False)
    assert r.returncode == 0, r.stderr[-3000:]
    results = read_results(tmp_path / "run")
    assert results["status"] == "completed" and results["experiment"] == "dafl_fashion_mnist"
    teacher, student = results["stages"]
    assert (teacher["arch"], student["arch"]) == ("lenet5", "lenet5_half")
    assert "data_free" not in teacher and student["data_free"] is True
    assert results["final"]["test_acc"] == student["test_acc"] == student["test_acc_last"]
    with open(student["csv_log"]) as f:
        header = next(csv.reader(f))
    assert {"train/loss", "train/loss_oh", "train/loss_a", "train/loss_ie", "train/loss_kd", "val/acc"} <= set(header)
    grids = sorted((tmp_path / "run" / "generated" / "student").glob("epoch_*.png"))
    assert len(grids) == 2
    width, height = Image.open(grids[-1]).size  # torchvision's make_grid: 8 x 8 images of 28 px, 2 px padding
    assert (width, height) == (GRID * (28 + 2) + 2, GRID * (28 + 2) + 2)
