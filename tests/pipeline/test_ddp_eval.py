"""DDP evaluation counts every val/test sample exactly once (issue: "DDP evaluation counts some samples twice").

Training shards are padded (by wrapping, as DistributedSampler does) so that every rank takes the same number
of steps; evaluation shards are not: rank r takes idx[r::world_size]. The Lightning runs below use 2 CPU
processes (ddp_spawn, gloo) on 7 samples, with batch sizes that give the ranks different numbers of batches.
"""
from __future__ import annotations

import functools
import json
import os
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.multiprocessing as mp
from torch import nn
from torchmetrics import SumMetric

from kdlab.data import build_datamodule
from kdlab.data.augment import Normalizer
from kdlab.data.base import DATASETS
from kdlab.data.config import resolve_data_cfg
from kdlab.data.datasets import SyntheticDataModule
from kdlab.data.loader import EpochSampler, EvalShardSampler, TensorLoader
from kdlab.errors import DataError
from kdlab.modules import SupervisedModule

os.environ.setdefault("OMP_NUM_THREADS", "1")  # read by the spawned ranks at import

N = 7
# 70 training images -> val_split 0.1 gives 7 validation images; 7 test images. batch_size_eval=3: the
# unpadded shards hold 4 and 3 samples, so rank 0 runs 2 eval batches and rank 1 only 1.
SYNTH = {"name": "synthetic", "n_train": 70, "n_test": N, "val_split": 0.1, "num_classes": 3, "image_size": 8,
         "augment": "none", "batch_size_eval": 3}


# ---- unit: samplers and loaders -------------------------------------------------------------------
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("shuffle", [False, True])
def test_eval_shards_partition_the_split(world, shuffle):
    shards = [EpochSampler(N, shuffle, seed=1, rank=r, world_size=world, pad=False) for r in range(world)]
    parts = [s.order(3).tolist() for s in shards]
    assert [len(p) for p in parts] == [len(s) for s in shards] == [len(range(r, N, world)) for r in range(world)]
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert sorted(i for p in parts for i in p) == list(range(N))  # disjoint, and every sample exactly once
    assert [list(s) for s in shards] == [s.order(0).tolist() for s in shards]  # iter() takes epoch 0


@pytest.mark.parametrize("world", [2, 3])
def test_training_shards_stay_padded_to_equal_length(world):
    shards = [EpochSampler(N, True, seed=1, rank=r, world_size=world) for r in range(world)]
    parts = [s.order(3) for s in shards]
    total = -(-N // world) * world
    assert all(len(p) == len(s) == total // world for p, s in zip(parts, shards))
    assert set(torch.cat(parts).tolist()) == set(range(N)) and len(torch.cat(parts)) == total


def test_an_empty_eval_shard_is_an_error_not_a_hang():
    with pytest.raises(DataError, match="2 evaluation sample"):
        EpochSampler(2, False, rank=0, world_size=3, pad=False)
    assert len(EpochSampler(2, False, rank=2, world_size=3)) == 1  # training: padded, as before


@pytest.mark.parametrize("world", [2, 3])
def test_tensor_loader_eval_shards(world):
    images = torch.arange(N, dtype=torch.uint8).view(N, 1, 1, 1).expand(N, 1, 2, 2).contiguous()
    labels = torch.arange(N)
    norm = Normalizer([0.0], [1 / 255])
    loaders = [TensorLoader(images, labels, 2, norm, rank=r, world_size=world, even_shards=False)
               for r in range(world)]
    seen = [torch.cat([i for _, _, i in ld]) for ld in loaders]
    assert sorted(torch.cat(seen).tolist()) == list(range(N))
    assert [len(ld) for ld in loaders] == [-(-len(range(r, N, world)) // 2) for r in range(world)]
    padded = [TensorLoader(images, labels, 2, norm, rank=r, world_size=world) for r in range(world)]
    assert len({len(ld.sampler) for ld in padded}) == 1  # even_shards (the default) keeps equal shards


@pytest.mark.parametrize("world", [2, 3])
def test_datamodule_pads_training_only(world):
    dm = build_datamodule(SYNTH, 4, 0)
    assert (dm.val_size, dm.test_size) == (N, N)
    got = {"val": [], "test": [], "train": []}
    for r in range(world):
        dm.trainer = SimpleNamespace(global_rank=r, world_size=world)
        got["val"] += torch.cat([i for _, _, i in dm.val_dataloader()]).tolist()
        got["test"] += torch.cat([i for _, _, i in dm.test_dataloader()]).tolist()
        got["train"].append(len(dm.train_dataloader().sampler))
        assert len(dm.train_eval_dataloader().sampler) == dm.train_size  # never sharded
    assert sorted(got["val"]) == sorted(got["test"]) == list(range(N))
    assert got["train"] == [-(-dm.train_size // world)] * world


def test_eval_shard_sampler_is_kept_by_lightning():
    # Lightning (use_distributed_sampler=True) replaces or wraps (with padding) any sampler of a DataLoader
    # that is not a DistributedSampler; EvalShardSampler is one, so it is left as it is.
    from torch.utils.data import DistributedSampler

    shards = [EvalShardSampler(N, r, 2) for r in range(2)]
    assert all(isinstance(s, DistributedSampler) for s in shards)
    assert [list(s) for s in shards] == [[0, 2, 4, 6], [1, 3, 5]] and [len(s) for s in shards] == [4, 3]


# ---- 2-process Lightning evaluation -------------------------------------------------------------------
class CountingModule(SupervisedModule):
    """Also sums, across ranks, how many val/test samples were evaluated and sum(2**idx) (= 2**N - 1 when
    each of the N samples was seen exactly once, given N of them)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = nn.ModuleDict({f"{s}_{k}": SumMetric() for s in ("val", "test") for k in ("n", "ids")})

    def _count(self, split: str, batch) -> None:
        _, y, idx = batch
        self.seen[f"{split}_n"](torch.tensor(float(len(y))))
        self.seen[f"{split}_ids"]((2.0 ** idx.double()).sum())
        for k in ("n", "ids"):
            self.log(f"{split}/{k}", self.seen[f"{split}_{k}"], on_step=False, on_epoch=True, batch_size=len(y))

    def validation_step(self, batch, batch_idx):
        super().validation_step(batch, batch_idx)
        self._count("val", batch)

    def test_step(self, batch, batch_idx):
        super().test_step(batch, batch_idx)
        self._count("test", batch)


class PaddedEvalSynthetic(SyntheticDataModule):
    """The old behaviour, as a control: evaluation shards padded like the training ones."""

    def _loader(self, *args, **kwargs):
        loader = super()._loader(*args, **kwargs)
        loader.sampler.pad = True
        return loader


def _model(dm) -> nn.Module:
    torch.manual_seed(0)
    d = dm.in_channels * dm.image_size**2
    # BatchNorm: its buffers are what DDP broadcasts at the first forward of an evaluation
    return nn.Sequential(nn.Flatten(), nn.Linear(d, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, dm.num_classes))


def _module(dm) -> CountingModule:
    return CountingModule(_model(dm), dm.num_classes, functools.partial(torch.optim.SGD, lr=0.05))


def _trainer() -> pl.Trainer:
    # the ranks are started by the test (LOCAL_RANK etc. set), so Lightning's ddp launches nothing itself
    return pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, limit_train_batches=2,
                      num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False)


def _single_process_acc(module, dm, split: str) -> float:
    images, labels = getattr(dm, f"{split}_images"), getattr(dm, f"{split}_labels")
    module.eval()
    with torch.no_grad():
        pred = module.model(dm.normalizer(images)).argmax(1)
    return float((pred == labels).double().mean())


def _floats(metrics) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()}


def _rank_main(rank: int, port: int, root: str, out: str) -> None:
    """One rank: fit (with validation), test and validate on the synthetic data, then the padded control
    and an imagefolder test, each through a 2-process Lightning DDP Trainer (gloo)."""
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", NODE_RANK="0",
                      RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    res: dict = {}
    dm = build_datamodule(SYNTH, 4, 0)
    module = _module(dm)
    trainer = _trainer()
    trainer.fit(module, datamodule=dm)  # DDP-wrapped validation, rank 0 with 2 batches, rank 1 with 1
    res["fit"] = _floats(trainer.callback_metrics)
    # after fit every rank holds the same weights: the accuracy of one process on the same 7 samples
    res["acc"] = {split: _single_process_acc(module, dm, split) for split in ("val", "test")}
    res["test"] = _trainer().test(module, datamodule=dm, verbose=False)[0]
    # the test pass's outputs (kdlab/modules/fidelity.py::split_outputs): every rank holds the whole split in order
    held = [None, None]
    torch.distributed.all_gather_object(held, {k: v.float().tolist() for k, v in module.test_outputs.items()})
    module.eval()
    with torch.no_grad():
        single = module.model(dm.normalizer(dm.test_images))
    res["test_outputs"] = {"ranks": held, "logits": single.tolist(), "labels": dm.test_labels.tolist()}
    res["validate"] = _trainer().validate(module, datamodule=dm, verbose=False)[0]

    padded = PaddedEvalSynthetic(resolve_data_cfg(SYNTH, DATASETS.names()), batch_size=4, seed=0)
    padded.setup()
    res["padded_test"] = _trainer().test(module, datamodule=padded, verbose=False)[0]

    cfg = {"name": "imagefolder", "root": root, "image_size": 4, "num_workers": 0, "batch_size_eval": 3,
           "augment": "none"}
    folder = build_datamodule(cfg, 2, 0)
    res["imagefolder_test"] = _trainer().test(_module(folder), datamodule=folder, verbose=False)[0]
    res["imagefolder_size"] = folder.test_size
    if rank == 0:
        with open(out, "w") as f:
            json.dump(res, f)
    # Without this, 1 run in 3-5 ended with "terminate called without an active exception" (SIGABRT) in a rank at
    # interpreter exit, after its results were written: gloo's threads still running when the process group was
    # destroyed during finalization. PyTorch asks programs to destroy it before they exit.
    torch.distributed.destroy_process_group()


def _write_imagefolder(root: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, per_class in (("train", {"a": 3, "b": 3}), ("test", {"a": 3, "b": 4})):
        for cls, n in per_class.items():
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(root / split / cls / f"{i}.png")


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory) -> dict:
    """Runs _rank_main on 2 spawned processes once (about 20-30 s); a hang fails instead of blocking."""
    tmp = tmp_path_factory.mktemp("ddp_eval")
    _write_imagefolder(tmp / "folder")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp / "results.json"
    ctx = mp.start_processes(_rank_main, args=(port, str(tmp / "folder"), str(out)), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + 300
    while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail("DDP evaluation hung (ranks with different numbers of batches?)")
    return json.loads(out.read_text())


def _check(results: dict, split: str, acc: float) -> None:
    assert results[f"{split}/n"] == N, results
    assert results[f"{split}/ids"] == 2**N - 1, results
    assert results[f"{split}/acc"] == pytest.approx(acc, abs=1e-6), results


def test_ddp_fit_validate_and_test_count_every_sample_once(ddp_results):
    acc = ddp_results["acc"]
    assert all(0 < a * N < N for a in acc.values()), acc  # neither all right nor all wrong: a duplicate shows
    _check(ddp_results["fit"], "val", acc["val"])
    _check(ddp_results["validate"], "val", acc["val"])
    _check(ddp_results["test"], "test", acc["test"])


def test_ddp_padded_eval_control_counts_a_sample_twice(ddp_results):
    """The checks above fail on the old (padded) evaluation shards: sample 0 is counted twice."""
    res = ddp_results["padded_test"]
    assert (res["test/n"], res["test/ids"]) == (N + 1, 2**N - 1 + 1), res
    assert res["test/acc"] != pytest.approx(ddp_results["acc"]["test"], abs=1e-6), res


def test_ddp_imagefolder_eval_counts_every_sample_once(ddp_results):
    assert ddp_results["imagefolder_size"] == N
    res = ddp_results["imagefolder_test"]
    assert (res["test/n"], res["test/ids"]) == (N, 2**N - 1), res


def test_ddp_test_outputs_hold_the_whole_split_in_order_on_every_rank(ddp_results):
    got = ddp_results["test_outputs"]
    want = torch.tensor(got["logits"]).half().float()  # kept in fp16
    for rank in got["ranks"]:
        assert len(rank["logits"]) == N and rank["labels"] == [float(y) for y in got["labels"]]
        torch.testing.assert_close(torch.tensor(rank["logits"]), want, rtol=1e-3, atol=1e-3)
