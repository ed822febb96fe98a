"""kdlab.data: readers on archives written here in the real on-disk formats, splits, the batched
augmentation, the in-memory loader, ImageFolder, synthetic data, fingerprints and error messages."""
from __future__ import annotations

import gzip
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import kdlab.data.datasets as data_sets
from kdlab.data import (
    DATA_DEFAULTS,
    DATASETS,
    Normalizer,
    TensorLoader,
    build_datamodule,
    crop_flip,
    random_crop_flip_params,
)
from kdlab.errors import ConfigError, DataError
from tests.helpers.data import dump_py2, write_cifar10, write_cifar100, write_fmnist, write_idx, write_pngs

torch.set_num_threads(1)

REAL_FMNIST = Path("/usr/share/datasets/fashion-mnist")


# ---- writers of the real formats -----------------------------------------------------------------


@pytest.fixture
def no_system_fmnist(monkeypatch):
    monkeypatch.setattr(data_sets, "SYSTEM_FASHION_MNIST_DIRS", [])


def check_roundtrip(dm, written) -> None:
    x, y = written["train"]
    assert torch.equal(dm.train_images, torch.from_numpy(x[dm.train_index]))
    assert torch.equal(dm.train_labels, torch.from_numpy(y[dm.train_index]).long())
    assert torch.equal(dm.val_images, torch.from_numpy(x[dm.val_index]))
    assert torch.equal(dm.val_labels, torch.from_numpy(y[dm.val_index]).long())
    tx, ty = written["test"]
    assert torch.equal(dm.test_images, torch.from_numpy(tx))
    assert torch.equal(dm.test_labels, torch.from_numpy(ty).long())
    assert sorted(np.concatenate([dm.train_index, dm.val_index]).tolist()) == list(range(len(x)))


# ---- readers ---------------------------------------------------------------------------------------


def test_cifar100_roundtrip_and_matches_torchvision(tmp_path, monkeypatch):
    written = write_cifar100(tmp_path)
    dm = build_datamodule({"name": "cifar100", "root": str(tmp_path), "val_split": 0.2}, 16, 0)
    check_roundtrip(dm, written)
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (100, 3, 32)
    assert (dm.train_size, dm.val_size, dm.test_size) == (48, 12, 20)
    assert dm.classes[:2] == ["fine0", "fine1"]
    assert dm.train_images.dtype == torch.uint8 and dm.train_labels.dtype == torch.int64
    # torchvision reads the same archive (its md5 check aside) into the same pixels, HWC
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    tv = tv_cifar.CIFAR100(str(tmp_path), train=True, download=False)
    assert np.array_equal(tv.data.transpose(0, 3, 1, 2), written["train"][0])
    assert tv.targets == written["train"][1].tolist()


def test_cifar10_roundtrip_with_bytes_keys(tmp_path):
    written = write_cifar10(tmp_path)
    dm = build_datamodule({"name": "cifar10", "root": str(tmp_path)}, 8, 0)
    check_roundtrip(dm, written)
    assert (dm.num_classes, dm.train_size + dm.val_size, dm.test_size) == (10, 50, 10)
    assert dm.classes == [f"c{i}" for i in range(10)]
    assert dm.mean == pytest.approx((0.4914, 0.4822, 0.4465))
    # root may also point at the batches folder itself
    dm2 = build_datamodule({"name": "cifar10", "root": str(tmp_path / "cifar-10-batches-py")}, 8, 0)
    assert dm2.fingerprint() == dm.fingerprint()


def test_cifar_corrupt_files_are_data_errors(tmp_path):
    write_cifar100(tmp_path)
    train = tmp_path / "cifar-100-python" / "train"
    dump_py2({b"data": np.zeros((4, 3000), np.uint8), b"fine_labels": [0] * 4}, train)
    with pytest.raises(DataError, match=r"shape \(4, 3000\).*3072"):
        build_datamodule({"name": "cifar100", "root": str(tmp_path)}, 8, 0)
    dump_py2({b"data": np.zeros((4, 3072), np.uint8), b"fine_labels": [0] * 3}, train)
    with pytest.raises(DataError, match="4 images but 3 labels"):
        build_datamodule({"name": "cifar100", "root": str(tmp_path)}, 8, 0)
    dump_py2({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0] * 4}, train)
    with pytest.raises(DataError, match="fine_labels"):
        build_datamodule({"name": "cifar100", "root": str(tmp_path)}, 8, 0)
    dump_py2({b"data": np.zeros((0, 3072), np.uint8), b"fine_labels": []}, train)
    with pytest.raises(DataError, match="empty"):
        build_datamodule({"name": "cifar100", "root": str(tmp_path)}, 8, 0)
    with open(train, "wb") as f:  # a pickle that would run code is refused, not executed
        pickle.dump(shutil.rmtree, f)
    with pytest.raises(DataError, match="refusing to unpickle"):
        build_datamodule({"name": "cifar100", "root": str(tmp_path)}, 8, 0)


def test_cifar_missing_names_paths_and_download(tmp_path):
    with pytest.raises(DataError) as e:
        build_datamodule({"name": "cifar10", "root": str(tmp_path)}, 8, 0)
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "cifar-10-batches-py") in msg and "data.download=true" in msg


def test_cifar_tar_archive_is_extracted(tmp_path):
    import tarfile

    src = tmp_path / "src"
    written = write_cifar100(src)
    root = tmp_path / "root"
    root.mkdir()
    with tarfile.open(root / "cifar-100-python.tar.gz", "w:gz") as tar:
        tar.add(src / "cifar-100-python", arcname="cifar-100-python")
    dm = build_datamodule({"name": "cifar100", "root": str(root)}, 8, 0)
    check_roundtrip(dm, written)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_idx_roundtrip(tmp_path, gz, no_system_fmnist):
    written = write_fmnist(tmp_path, gz=gz)
    dm = build_datamodule({"name": "fashion_mnist", "root": str(tmp_path), "val_split": 0.25}, 8, 0)
    check_roundtrip(dm, written)
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (10, 1, 28)
    assert (dm.train_size, dm.val_size, dm.test_size) == (30, 10, 12)


def test_fashion_mnist_bad_idx(tmp_path, no_system_fmnist):
    write_fmnist(tmp_path)
    raw = tmp_path / "FashionMNIST" / "raw"
    write_idx(raw / "train-labels-idx1-ubyte.gz", np.zeros(39, np.uint8))
    with pytest.raises(DataError, match="40 images but .* 39 labels"):
        build_datamodule({"name": "fashion_mnist", "root": str(tmp_path)}, 8, 0)
    (raw / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x03" + b"\x00" * 10))
    with pytest.raises(DataError, match="truncated|header"):
        build_datamodule({"name": "fashion_mnist", "root": str(tmp_path)}, 8, 0)


def test_fashion_mnist_missing(tmp_path, no_system_fmnist):
    with pytest.raises(DataError) as e:
        build_datamodule({"name": "fashion_mnist", "root": str(tmp_path)}, 8, 0)
    msg = str(e.value)
    assert msg.startswith("fashion_mnist not found; tried: ") and "\n" not in msg
    assert str(tmp_path / "FashionMNIST" / "raw") in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "data.download=true" in msg


@pytest.mark.skipif(not REAL_FMNIST.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist(tmp_path):
    dm = build_datamodule({"name": "fashion_mnist", "root": str(tmp_path)}, 128, 0)
    assert dm.train_size + dm.val_size == 60000 and dm.test_size == 10000
    assert dm.val_size == 6000
    assert tuple(dm.train_images.shape[1:]) == (1, 28, 28)
    # stratified split: 600 validation images per class
    assert torch.bincount(dm.val_labels, minlength=10).tolist() == [600] * 10
    x = dm.train_images[:5000].double() / 255
    assert x.mean().item() == pytest.approx(dm.mean[0], abs=0.01)
    assert x.std().item() == pytest.approx(dm.std[0], abs=0.01)


# ---- augmentation ----------------------------------------------------------------------------------


def test_crop_matches_manual_crop_of_padded_image():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16, 3, 8, 10), dtype=torch.uint8, generator=g)
    pad = 3
    (oy, ox), _ = random_crop_flip_params(16, pad, crop=True, flip=False, generator=g)
    assert oy.min() >= 0 and oy.max() <= 2 * pad and ox.min() >= 0 and ox.max() <= 2 * pad
    out = crop_flip(x, pad, (oy, ox))
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    for i in range(16):
        assert torch.equal(out[i], padded[i, :, oy[i] : oy[i] + 8, ox[i] : ox[i] + 10])
    # extreme offsets stay inside the padded image; (pad, pad) is the identity
    ends = torch.tensor([0, 2 * pad] * 8)
    assert crop_flip(x, pad, (ends, ends.flip(0))).shape == x.shape
    centre = torch.full((16,), pad)
    assert torch.equal(crop_flip(x, pad, (centre, centre)), x)


def test_flip_flips_exactly_masked_samples():
    x = torch.randn(12, 2, 5, 7)
    mask = torch.tensor([True, False] * 6)
    out = crop_flip(x, 0, None, mask)
    assert torch.equal(out[mask], x[mask].flip(3)) and torch.equal(out[~mask], x[~mask])
    # combined crop + flip == flip of the crop
    oy, ox = torch.randint(0, 5, (12,)), torch.randint(0, 5, (12,))
    both = crop_flip(x, 2, (oy, ox), mask)
    crop = crop_flip(x, 2, (oy, ox))
    assert torch.equal(both[mask], crop[mask].flip(3)) and torch.equal(both[~mask], crop[~mask])


def test_normalization_gives_zero_mean_unit_std():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (256, 3, 8, 8), dtype=torch.uint8, generator=g)
    xf = x.double() / 255
    mean, std = xf.mean(dim=(0, 2, 3)).tolist(), xf.std(dim=(0, 2, 3)).tolist()
    out = Normalizer(mean, std)(x)
    assert out.dtype == torch.float32
    assert torch.allclose(out.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(out.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-4)


def test_loader_batches_are_crops_and_flips_of_the_samples():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(1, 256, (10, 1, 6, 6), dtype=torch.uint8, generator=g)
    labels = torch.arange(10)
    loader = TensorLoader(images, labels, 4, Normalizer([0.0], [1 / 255]), augment="crop_flip", pad=2,
                          shuffle=True, seed=3)
    padded = torch.nn.functional.pad(images.float(), (2, 2, 2, 2))
    seen, flips = [], 0
    for x, y, idx in loader:
        assert x.dtype == torch.float32 and y.dtype == torch.int64 and idx.dtype == torch.int64
        assert torch.equal(y, labels[idx])
        for xi, i in zip(x, idx):
            cands = [(padded[i, :, a : a + 6, b : b + 6], f) for a in range(5) for b in range(5) for f in (0, 1)]
            hits = [f for c, f in cands if torch.equal(c.flip(2) if f else c, xi)]
            assert hits, "batch sample is no crop/flip of its image"
            flips += min(hits)
        seen += idx.tolist()
    assert sorted(seen) == list(range(10)) and len(loader) == 3


# ---- splits, subsets, loader order -------------------------------------------------------------------


def synth(**kw):
    return build_datamodule({"name": "synthetic", "n_train": 200, "n_test": 50, **kw}, 32, 0)


def test_val_split_disjoint_sized_and_seeded():
    a = synth(val_split=0.15)
    assert (a.train_size, a.val_size, a.test_size) == (170, 30, 50)
    assert not set(a.train_index) & set(a.val_index)
    assert sorted([*a.train_index, *a.val_index]) == list(range(200))
    assert torch.bincount(a.val_labels, minlength=10).tolist() == [3] * 10  # stratified
    b = synth(val_split=0.15)
    assert np.array_equal(a.val_index, b.val_index) and torch.equal(a.val_images, b.val_images)
    run_seed = build_datamodule({"name": "synthetic", "n_train": 200, "n_test": 50, "val_split": 0.15}, 8, 7)
    assert np.array_equal(a.val_index, run_seed.val_index)  # the run seed does not move the split
    c = synth(val_split=0.15, split_seed=1)
    assert not np.array_equal(a.val_index, c.val_index)


def test_val_split_zero_holds_out_nothing():
    """data.val_split=0 (protocol=reference): every training image trains, in order, and the split is none."""
    dm = synth(val_split=0)
    assert (dm.train_size, dm.val_size, dm.test_size) == (200, 0, 50)
    assert dm.train_index.tolist() == list(range(200)) and dm.val_index.size == 0
    held = synth(val_split=0.1)
    every = torch.empty(200, 1, 28, 28, dtype=torch.uint8)
    every[held.train_index], every[held.val_index] = held.train_images, held.val_images
    assert torch.equal(dm.train_images, every)  # the same images, none held out
    assert dm.fingerprint() != held.fingerprint()  # another split: another data identity (store key)
    assert synth(val_split=0).fingerprint() == dm.fingerprint()
    with pytest.raises(ConfigError, match=r"data.val_split must be a fraction in \[0, 0.9\]"):
        synth(val_split=-0.1)


def test_subset_and_bad_values():
    dm = synth(subset=100, val_split=0.1, test_subset=20)
    assert (dm.train_size, dm.val_size, dm.test_size) == (90, 10, 20)
    assert torch.bincount(torch.cat([dm.train_labels, dm.val_labels]), minlength=10).tolist() == [10] * 10
    full = synth()
    every = torch.empty(200, 1, 28, 28, dtype=torch.uint8)
    every[full.train_index], every[full.val_index] = full.train_images, full.val_images
    assert torch.equal(dm.train_images, every[dm.train_index])
    assert torch.equal(dm.val_images, every[dm.val_index])
    with pytest.raises(ConfigError, match="subset=500.*200"):
        synth(subset=500)
    for bad in (0.95, -0.1, 1.0, "a"):  # 0 is no validation split (test_val_split_zero_holds_out_nothing)
        with pytest.raises(ConfigError, match="val_split"):
            synth(val_split=bad)
    with pytest.raises(ConfigError, match="test_subset=51.*50"):
        synth(test_subset=51)
    with pytest.raises(ConfigError, match="augment.*crop_flip"):
        synth(augment="rotate")
    with pytest.raises(ConfigError, match="unknown dataset 'imagenet'; known: cifar10, cifar100"):
        build_datamodule({"name": "imagenet"}, 8, 0)
    with pytest.raises(ConfigError, match="val_spilt"):
        synth(val_spilt=0.2)


def test_loader_shuffles_per_epoch_and_reruns_identically():
    def epochs(seed, n=3):
        dm = build_datamodule({"name": "synthetic", "n_train": 100, "n_test": 20}, 16, seed)
        loader = dm.train_dataloader()
        return [(torch.cat([b[2] for b in batches]), torch.cat([b[0] for b in batches]))
                for batches in (list(loader) for _ in range(n))]

    a, b, other = epochs(0), epochs(0), epochs(1)
    assert not torch.equal(a[0][0], a[1][0]) and not torch.equal(a[1][0], a[2][0])
    for (ia, xa), (ib, xb) in zip(a, b):
        assert torch.equal(ia, ib) and torch.equal(xa, xb)
    assert not torch.equal(a[0][0], other[0][0])
    assert sorted(a[0][0].tolist()) == list(range(90))
    # set_epoch (what Lightning calls) replays a given epoch
    dm = build_datamodule({"name": "synthetic", "n_train": 100, "n_test": 20}, 16, 0)
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(2)
    assert torch.equal(torch.cat([b[2] for b in loader]), a[2][0])


def test_sampler_shards_cover_the_split():
    from kdlab.data import EpochSampler

    shards = [EpochSampler(11, shuffle=True, seed=0, rank=r, world_size=3) for r in range(3)]
    parts = [s.order(4) for s in shards]
    assert all(len(p) == len(s) == 4 for p, s in zip(parts, shards))
    assert set(torch.cat(parts).tolist()) == set(range(11))
    full = EpochSampler(11, True, 0).order(4)
    padded = torch.cat([full, full[:1]])  # wrapped to a multiple of the world size, as DistributedSampler
    assert all(torch.equal(p, padded[r::3]) for r, p in enumerate(parts))


def test_eval_loaders_in_order_unaugmented():
    dm = synth()
    xs, idx = zip(*[(x, i) for x, _, i in dm.train_eval_dataloader()])
    assert torch.equal(torch.cat(idx), torch.arange(dm.train_size))
    assert torch.equal(torch.cat(xs), dm.normalizer(dm.train_images))
    assert len(dm.train_eval_dataloader()) == -(-dm.train_size // 64)  # batch_size_eval = 2 * 32
    assert torch.equal(torch.cat([i for _, _, i in dm.val_dataloader()]), torch.arange(dm.val_size))
    x, y, _ = next(iter(dm.test_dataloader()))
    assert x.shape == (50, 1, 28, 28) and torch.equal(y, dm.test_labels[:50])


# ---- synthetic, fingerprint, datamodule contract --------------------------------------------------------


def test_synthetic_is_seeded_and_shaped():
    a = synth(channels=3, image_size=32, num_classes=5)
    assert (a.num_classes, a.in_channels, a.image_size) == (5, 3, 32)
    assert a.train_images.shape == (180, 3, 32, 32) and len(a.mean) == 3
    assert torch.equal(a.train_images, synth(channels=3, image_size=32, num_classes=5).train_images)
    assert not torch.equal(a.train_images, synth(channels=3, image_size=32, num_classes=5, data_seed=1).train_images)
    assert a.train_images.float().std() > 20  # not blank
    assert set(DATA_DEFAULTS) == set(DATASETS.names())


def test_fingerprint_tracks_data_identity_not_location(tmp_path, no_system_fmnist):
    write_fmnist(tmp_path / "a")
    cfg = {"name": "fashion_mnist", "root": str(tmp_path / "a")}
    fp = build_datamodule(cfg, 8, 0).fingerprint()
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert build_datamodule(cfg, 64, 5).fingerprint() == fp  # batch size and run seed do not matter
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert build_datamodule({**cfg, "root": str(tmp_path / "b")}, 8, 0).fingerprint() == fp
    for change in ({"augment": "none"}, {"split_seed": 1}, {"subset": 30}, {"val_split": 0.2}, {"pad": 2}):
        assert build_datamodule({**cfg, **change}, 8, 0).fingerprint() != fp, change
    # content: one changed pixel changes it
    raw = tmp_path / "b" / "FashionMNIST" / "raw"
    images = np.zeros((40, 28, 28), np.uint8)
    write_idx(raw / "train-images-idx3-ubyte.gz", images)
    assert build_datamodule({**cfg, "root": str(tmp_path / "b")}, 8, 0).fingerprint() != fp


def test_datamodule_contract():
    dm = synth(augment="none")
    assert dm.deterministic_train and not synth().deterministic_train
    assert dm.train_size == len(dm.train_images) == 180
    assert dm.to_device("cpu") is dm and dm.train_images.device.type == "cpu"
    summary = dm.summary()
    assert summary["train_size"] == 180 and summary["fingerprint"] == dm.fingerprint()
    # a flip-only loader changes samples only by mirroring
    flip = synth(augment="flip")
    x, _, idx = next(iter(flip.train_dataloader()))
    ref = flip.normalizer(flip.train_images[idx])
    same = (x == ref).flatten(1).all(1)
    mirrored = (x == ref.flip(3)).flatten(1).all(1)
    assert bool((same | mirrored).all()) and 0 < int(mirrored.sum()) < len(x)


def test_lightning_drives_the_loader_epochs():
    import pytorch_lightning as pl

    dm = build_datamodule({"name": "synthetic", "n_train": 40, "n_test": 10, "image_size": 8}, 16, 0)
    seen: list[list[int]] = []

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(64, 10)

        def on_train_epoch_start(self):
            seen.append([])

        def training_step(self, batch, _):
            x, y, idx = batch
            seen[-1].extend(idx.tolist())
            return torch.nn.functional.cross_entropy(self.lin(x.flatten(1)), y)

        def validation_step(self, batch, _):
            x, y, _ = batch
            self.log("val/loss", torch.nn.functional.cross_entropy(self.lin(x.flatten(1)), y))

        def test_step(self, batch, _):
            self.validation_step(batch, _)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = pl.Trainer(max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(Tiny(), datamodule=dm)
    trainer.test(Tiny(), datamodule=dm, verbose=False)
    sampler = dm.train_dataloader().sampler
    assert seen == [sampler.order(e).tolist() for e in range(3)]


# ---- a stage's view of the data (for_stage) -------------------------------------------------------------------


def epoch_batches(dm, epoch=0):
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)
    return list(loader)


def same_batches(a, b) -> bool:
    return len(a) == len(b) and all(len(x) == len(y) and all(torch.equal(u, v) for u, v in zip(x, y))
                                    for x, y in zip(a, b))


def test_a_stage_view_trains_as_a_module_of_its_own_seed_and_augmentation():
    """Two stages (seeds 5 and 9, the second with crop_flip) each get the batches a data module built with their
    settings gives, share the loaded tensors, and leave the run's data module (seed 0, no augmentation) as it was."""
    data = {"name": "synthetic", "n_train": 100, "n_test": 20, "augment": "none"}
    dm = build_datamodule(data, 16, 0)
    before, fingerprint = epoch_batches(dm, 1), dm.fingerprint()
    teacher, student = dm.for_stage(seed=5), dm.for_stage(seed=9, augment="crop_flip")
    for view, seed, augment in ((teacher, 5, "none"), (student, 9, "crop_flip")):
        own = build_datamodule({**data, "augment": augment}, 16, seed)  # what the stage's settings alone give
        assert same_batches(epoch_batches(view, 1), epoch_batches(own, 1))
        assert view.fingerprint() == own.fingerprint()  # the store key's data: its augmentation's, as before
        assert view.train_images is dm.train_images and view.normalizer is dm.normalizer  # loaded once, shared
    assert not same_batches(epoch_batches(teacher, 1), epoch_batches(student, 1))
    assert teacher.fingerprint() == fingerprint != student.fingerprint()
    assert (dm.seed, dm.augment, dm.train_views) == (0, "none", False)  # the run's data module is unchanged
    assert same_batches(epoch_batches(dm, 1), before) and dm.fingerprint() == fingerprint
    assert dm.for_stage().seed == 0 and dm.for_stage().augment == "none"  # None: the module's own settings
    with pytest.raises(ConfigError, match="unknown data.augment 'rotate'"):
        dm.for_stage(augment="rotate")


def test_a_stage_view_with_views_reports_them_and_moves_the_shared_tensors():
    dm = build_datamodule({"name": "synthetic", "n_train": 100, "n_test": 20, "augment": "flip"}, 16, 3)
    viewed = dm.for_stage(views=True)
    plain, with_views = epoch_batches(dm), epoch_batches(viewed)
    assert all(len(b) == 3 for b in plain) and all(len(b) == 4 for b in with_views)  # (x, y, idx[, view])
    assert same_batches(plain, [b[:3] for b in with_views]) and not dm.train_views
    viewed.to_device("meta")  # what Lightning's on_fit_start does with the stage's data: the shared splits move
    assert dm.train_images.device.type == "meta" and dm.for_stage().test_labels.device.type == "meta"


def test_an_imagefolder_stage_view_shuffles_and_seeds_its_workers_by_its_seed(tmp_path):
    write_pngs(tmp_path, "train", {"cat": 6, "dog": 4})
    write_pngs(tmp_path, "test", {"cat": 2, "dog": 3})
    cfg = {"name": "imagefolder", "root": str(tmp_path), "image_size": 12, "val_split": 0.2, "num_workers": 0}
    dm = build_datamodule(cfg, 4, 0)
    view = dm.for_stage(seed=7, augment="none")
    loader, own = view.train_dataloader(), build_datamodule({**cfg, "augment": "none"}, 4, 7).train_dataloader()
    assert (loader.sampler.seed, loader.generator.initial_seed()) == (own.sampler.seed, own.generator.initial_seed())
    assert loader.sampler.seed == 7 and view.fingerprint() == build_datamodule({**cfg, "augment": "none"}, 4, 7
                                                                                 ).fingerprint()
    assert view.train_samples is dm.train_samples and (dm.seed, dm.augment) == (0, "crop_flip")
    assert dm.train_dataloader().sampler.seed == 0


# ---- imagefolder -------------------------------------------------------------------------------------


def test_imagefolder(tmp_path):
    write_pngs(tmp_path, "train", {"cat": 6, "dog": 4})
    write_pngs(tmp_path, "test", {"cat": 2, "dog": 3})
    cfg = {"name": "imagefolder", "root": str(tmp_path), "image_size": 12, "val_split": 0.2, "num_workers": 0}
    dm = build_datamodule(cfg, 4, 0)
    assert (dm.num_classes, dm.in_channels, dm.image_size, dm.classes) == (2, 3, 12, ["cat", "dog"])
    assert (dm.train_size, dm.val_size, dm.test_size) == (8, 2, 5)
    x, y, idx = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 12, 12) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert idx.dtype == torch.int64 and len(set(idx.tolist())) == 4
    got = torch.cat([i for _, _, i in dm.train_eval_dataloader()])
    assert torch.equal(got, torch.arange(8))
    ys = torch.cat([y for _, y, _ in dm.test_dataloader()])
    assert ys.tolist() == [0, 0, 1, 1, 1]
    fp = dm.fingerprint()
    assert build_datamodule({**cfg, "image_size": 12}, 8, 3).fingerprint() == fp
    gray = build_datamodule({**cfg, "channels": 1, "augment": "none"}, 4, 0)
    assert next(iter(gray.train_dataloader()))[0].shape == (4, 1, 12, 12)
    # a val/ folder is used as is when test/ exists too
    write_pngs(tmp_path, "val", {"dog": 1})
    assert build_datamodule(cfg, 4, 0).val_size == 1


def test_imagefolder_errors(tmp_path):
    cfg = {"name": "imagefolder", "root": str(tmp_path), "image_size": 8, "num_workers": 0}
    with pytest.raises(DataError, match="imagefolder not found; tried: .*train"):
        build_datamodule(cfg, 4, 0)
    write_pngs(tmp_path, "train", {"a": 3, "b": 3})
    write_pngs(tmp_path, "test", {"a": 1, "zebra": 1})
    with pytest.raises(DataError, match="zebra"):
        build_datamodule(cfg, 4, 0)


def test_synthetic_defaults_are_learnable_but_not_trivial():
    torch.manual_seed(0)
    dm = build_datamodule({"name": "synthetic"}, 64, 0)
    assert (dm.train_size, dm.val_size, dm.test_size, dm.num_classes) == (1800, 200, 500, 10)
    nn = torch.nn
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def accuracy() -> float:
        model.eval()
        with torch.no_grad():
            hits = sum((model(x).argmax(1) == y).sum().item() for x, y, _ in dm.test_dataloader())
        model.train()
        return hits / dm.test_size

    train, accs = dm.train_dataloader(), []
    for _ in range(4):
        for x, y, _ in train:
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        accs.append(accuracy())
    assert accs[0] < 0.95, accs  # not solved at once
    assert max(accs[2:]) > 0.8, accs  # but learned within a few epochs
