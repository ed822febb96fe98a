"""Honest comparisons: a stage is exactly what determines it.

One test (or a few) per defect that was observed on main before the fix: stochastic teaching that dropped
every source, data order seeded by the run instead of the stage, FEED ensembles that overlapped between
run seeds and a FEED student that started as teacher1, a lambda schedule that never reached lam_end, a KD
student retrained by a FEED key, a CPU preset applied to every data set, options ignored without a word.
"""
from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint

from kdlab.distill import SourceSelector, build_strategy
from kdlab.distill.base import StrategyContext
from kdlab.distill.stochastic import stochastic_config
from kdlab.errors import ConfigError
from kdlab.models import build_model
from kdlab.modules import DistillModule, SourceBank, SupervisedModule
from kdlab.pipeline import build_stages
from kdlab.pipeline.assemble import build_stage_model
from kdlab.pipeline.checks import validate_config
from kdlab.store.fileio import load_weights
from tests.helpers.cli import read_results, run_kdlab, trained
from tests.helpers.config import compose_config as composed
from tests.helpers.config import stage_keys


# -- 1. stochastic teaching always keeps a source ---------------------------------------------------------------
def test_bernoulli_keeps_at_least_one_source_by_default():
    sel = SourceSelector(["teacher", "ta1", "ta2", "ta3"], mode="bernoulli", p=0.75, seed=0, stage="student")
    kept = [sum(sel.keep_mask(step)) for step in range(20_000)]
    assert min(kept) >= 1
    # the draws themselves still drop sources: ~0.4 % of steps would have dropped all four
    assert kept.count(1) > 20_000 * 0.004
    assert composed()["distill"]["stochastic"]["min_keep"] == 1


def test_bernoulli_min_keep_zero_is_an_error():
    with pytest.raises(ConfigError, match=r"min_keep=0 must be between 1 and the 4 source\(s\).*always keep"):
        SourceSelector(["a", "b", "c", "d"], mode="bernoulli", p=0.75, min_keep=0, stage="student")
    with pytest.raises(ConfigError, match="min_keep=0"):
        validate_config(composed("distill.stochastic.mode=bernoulli", "distill.stochastic.min_keep=0"))


class _KeepNone:
    """A selector that drops every source (what bernoulli with min_keep 0 did in ~0.4 % of the steps)."""

    def kept(self, step):
        return []


def test_a_batch_with_no_source_under_lambda_one_still_backpropagates():
    torch.manual_seed(0)
    student = build_model("plain2", 10, in_channels=1, input_size=28)
    teacher = build_model("plain2", 10, in_channels=1, input_size=28)
    ctx = StrategyContext(stage="student", source_names=["teacher"], num_classes=10)
    strategy = build_strategy({"strategy": "dgkd", "lam": 1.0, "temperature": 4.0}, ctx)
    mod = DistillModule(student, 10, optimizer=lambda params: torch.optim.SGD(params, lr=0.1), scheduler=None,
                        sources=SourceBank({"teacher": teacher}), strategy=strategy, selector=_KeepNone())
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    loss = mod.training_step((x, y, torch.arange(8)), 0)
    assert loss.requires_grad and float(loss) == 0.0
    loss.backward()  # failed before: "element 0 of tensors does not require grad"


# -- 2. a stage's data order follows its own seed ----------------------------------------------------------------
@pytest.mark.slow  # minutes of CLI runs: make test-slow (CI runs it)
def test_a_pinned_stage_trains_the_same_whichever_run_trains_it(tmp_path):
    """The same stage (pinned seed 0) trained first by a seed-1 job in one store and by a seed-0 job in
    another: one key, identical weights (before, the data order followed the run's seed)."""
    args = ["pipeline=single", "model=plain2", "distill=none", "+pipeline.per_stage.student.seed=0"]
    a = run_kdlab(args + ["seed=1"], tmp_path / "a", tmp_path / "run_a")
    b = run_kdlab(args + ["seed=0"], tmp_path / "b", tmp_path / "run_b")
    assert a.returncode == 0 and b.returncode == 0, (a.stderr[-2000:], b.stderr[-2000:])
    sa, sb = read_results(tmp_path / "run_a")["stages"][0], read_results(tmp_path / "run_b")["stages"][0]
    assert sa["store_key"] == sb["store_key"]
    wa, wb = load_weights(sa["checkpoint"]), load_weights(sb["checkpoint"])
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert sa["test_acc"] == sb["test_acc"]


# -- 3, 4. FEED: independent ensembles per seed, a student of its own -------------------------------------------
def test_ensemble_and_generation_seeds_are_disjoint_between_runs():
    for recipe, members in (("feed_parallel_fashion_mnist", "teacher"), ("feed_sequential_fashion_mnist", "gen")):
        per_run = {s: build_stages(composed(f"+experiment={recipe}", f"seed={s}", "pipeline.ensemble=3"
                                            if members == "teacher" else "pipeline.generations=4"))
                   for s in (0, 1, 2)}
        member_seeds = {s: {x.seed for x in specs if x.name.startswith(members)} for s, specs in per_run.items()}
        assert all(len(v) == 3 for v in member_seeds.values())
        assert not (member_seeds[0] & member_seeds[1] or member_seeds[0] & member_seeds[2]
                    or member_seeds[1] & member_seeds[2])
        # no member has a run seed, so none is the student (or the student alone) of some run
        assert not set().union(*member_seeds.values()) & {0, 1, 2}
        assert [specs[-1].seed for specs in per_run.values()] == [0, 1, 2]
        keys = {s: set(stage_keys(composed(f"+experiment={recipe}", f"seed={s}")).values()) for s in (0, 1, 2)}
        assert not (keys[0] & keys[1] or keys[1] & keys[2] or keys[0] & keys[2])


def test_feed_student_does_not_start_as_teacher1(synthetic_dm):
    cfg = composed("+experiment=feed_parallel_fashion_mnist")
    dm = synthetic_dm(n_train=64, n_test=16, batch_size=16)
    specs = {s.name: s for s in build_stages(cfg)}
    initial = {}
    for name in ("teacher1", "student"):  # as train_stage builds them: seeded, then built
        pl.seed_everything(specs[name].seed, verbose=False)
        initial[name] = build_stage_model(specs[name], dm).state_dict()
    assert specs["teacher1"].model == specs["student"].model  # the same architecture...
    assert any(not torch.equal(initial["teacher1"][k], initial["student"][k])  # ...but not the same start
               for k, v in initial["student"].items() if v.is_floating_point())


# -- 5. the lambda schedule reaches lam_end at the last step, also after a resume ------------------------------
class _Recorder(SupervisedModule):
    def training_step(self, batch, batch_idx):
        self.seen.append(self.progress())
        return super().training_step(batch, batch_idx)


class _StopAfterFirstEpoch(Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        trainer.should_stop = True


def _recorder(dm):
    torch.manual_seed(0)
    mod = _Recorder(build_model("plain2", dm.num_classes, in_channels=dm.in_channels, input_size=dm.image_size),
                    dm.num_classes, optimizer=lambda params: torch.optim.SGD(params, lr=0.01), max_epochs=3)
    mod.seen = []
    return mod


def _trainer(tmp_path, **kw):
    return pl.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1,
                      default_root_dir=str(tmp_path), **kw)


def test_schedule_progress_runs_per_step_to_one_and_survives_a_resume(tmp_path, synthetic_dm):
    dm = synthetic_dm(n_train=200, n_test=20, batch_size=32)
    steps = 3 * len(dm.train_dataloader())  # 3 epochs of 6 batches (180 training images)
    whole = _recorder(dm)
    _trainer(tmp_path / "whole").fit(whole, datamodule=dm)
    assert len(whole.seen) == steps
    assert whole.seen[0] == 0.0 and whole.seen[-1] == 1.0
    assert whole.seen == sorted(whole.seen) and len(set(whole.seen)) == steps  # moves every step
    lam = build_strategy({"strategy": "kd", "lam": 0.9, "lam_end": 0.1, "lam_schedule": "linear"},
                         StrategyContext("student", ["teacher"], 10)).lam_at
    assert lam(whole.seen[-1]) == pytest.approx(0.1) and lam(whole.seen[0]) == pytest.approx(0.9)

    # interrupted after its first epoch, then resumed from the checkpoint: the same progress, step by step
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ck"), save_last=True, save_top_k=0)
    first = _recorder(dm)
    _trainer(tmp_path / "first", callbacks=[ckpt, _StopAfterFirstEpoch()]).fit(first, datamodule=dm)
    rest = _recorder(dm)
    _trainer(tmp_path / "rest").fit(rest, datamodule=dm, ckpt_path=str(tmp_path / "ck" / "last.ckpt"),
                                    weights_only=False)
    assert first.seen + rest.seen == pytest.approx(whole.seen)
    assert rest.seen[-1] == 1.0


# -- 7. a strategy owns its keys: the store key hashes only what it reads ---------------------------------------
MIXED = ["preset=none", "data=synthetic", "pipeline=direct", "pipeline.chain=[plain4,plain2]", "distill=feed",
         "+pipeline.per_stage.student.distill.strategy=kd"]


def test_a_feed_key_never_retrains_a_kd_student():
    base = stage_keys(composed(*MIXED))
    assert base == stage_keys(composed(*MIXED, "distill.feed.beta=200", "distill.feed.reduce=mean"))
    assert base["student"] != stage_keys(composed(*MIXED, "distill.temperature=2"))["student"]
    # a KD run with a FEED key added on the command line: the same stages
    kd = ["preset=none", "data=synthetic", "pipeline=direct", "pipeline.chain=[plain4,plain2]", "distill=kd"]
    assert stage_keys(composed(*kd)) == stage_keys(composed(*kd, "+distill.feed.beta=200"))
    # DGKD's own key counts for DGKD
    dgkd = kd[:-1] + ["distill=dgkd"]
    assert stage_keys(composed(*dgkd))["student"] != stage_keys(composed(*dgkd, "distill.ce_weight=paper"))["student"]


def test_feed_without_logit_kd_does_not_hash_the_temperature():
    feed = ["+experiment=feed_parallel_fashion_mnist"]
    assert stage_keys(composed(*feed)) == stage_keys(composed(*feed, "distill.temperature=2", "distill.lam=0.9"))
    with_kd = [*feed, "distill.feed.logit_kd=true"]
    assert stage_keys(composed(*with_kd))["student"] != \
        stage_keys(composed(*with_kd, "distill.temperature=2"))["student"]


def test_each_stage_holds_exactly_its_strategy_keys():
    specs = build_stages(composed())  # the default DGKD chain
    assert specs[0].distill == {"strategy": "ce", "label_smoothing": 0.0}  # sourceless: the ce strategy
    assert sorted(specs[-1].distill) == sorted(["strategy", "temperature", "lam", "lam_schedule", "lam_end",
                                                "lam_milestones", "kl_reduction", "label_smoothing",
                                                "ce_weight"])
    kd = build_stages(composed("+experiment=kd_fashion_mnist"))[-1].distill
    assert "ce_weight" not in kd and "feed" not in kd and "cache" not in kd


def test_strategy_checks_run_from_the_strategy_before_any_data():
    with pytest.raises(ConfigError, match="unknown distill.ce_weight 'both'; known: paper, code"):
        validate_config(composed("distill.ce_weight=both"))
    with pytest.raises(ConfigError, match="unknown distill.feed.reduce 'max'; known: sum, mean"):
        validate_config(composed("+experiment=feed_parallel_fashion_mnist", "distill.feed.reduce=max"))
    with pytest.raises(ConfigError, match=r"distill.lam \(lambda\) must be in \[0, 1\], got 2"):
        validate_config(composed("distill.lam=2"))


@pytest.mark.slow  # minutes of CLI runs: make test-slow (CI runs it)
def test_cli_feed_beta_leaves_a_kd_student_cached(tmp_path):
    args = MIXED[1:] + ["data.n_train=320", "data.n_test=64", "trainer.max_epochs=1"]
    first = run_kdlab(args, tmp_path / "out", tmp_path / "r1")
    assert first.returncode == 0, first.stderr[-2000:]
    again = run_kdlab(args + ["distill.feed.beta=200"], tmp_path / "out", tmp_path / "r2")
    assert again.returncode == 0, again.stderr[-2000:]
    assert trained(read_results(tmp_path / "r1")) == ["teacher", "student"]
    assert trained(read_results(tmp_path / "r2")) == []


# -- 9. a preset applies to its data set only; the run says what it resolved ------------------------------------
def test_the_cpu_preset_follows_the_data_set():
    fm = composed()
    assert fm["preset_name"] == "fashion_mnist_cpu" and fm["data"]["subset"] == 20000
    c100 = composed("data=cifar100")
    assert c100["preset_name"] is None and c100["data"]["subset"] is None  # the full data set
    assert c100["trainer"]["max_epochs"] == composed("preset=none")["trainer"]["max_epochs"]
    syn = composed("data=synthetic")
    assert syn["preset_name"] == "synthetic_cpu" and syn["data"]["subset"] is None
    validate_config(syn)


@pytest.mark.slow  # minutes of CLI runs: make test-slow (CI runs it)
def test_cli_data_synthetic_runs_and_prints_what_it_resolved(tmp_path):
    r = run_kdlab(["data=synthetic", "data.n_train=640", "data.n_test=128"], tmp_path / "out", tmp_path / "run",
                  synth=False)
    assert r.returncode == 0, r.stderr[-2000:]
    res = read_results(tmp_path / "run")
    assert res["status"] == "completed" and len(res["stages"]) == 5
    assert ("data synthetic: 576 train / 64 val / 128 test images (preset synthetic_cpu), batch 64; 5 stage(s) "
            "(teacher, ta1, ta2, ta3, student): epochs 2, lr 0.01") in r.stdout + r.stderr


@pytest.mark.slow  # minutes of CLI runs: make test-slow (CI runs it)
def test_cli_cifar100_runs_on_the_full_data_set(tmp_path):
    from tests.helpers.data import write_cifar100

    write_cifar100(tmp_path / "data", n_train=60, n_test=20)
    r = run_kdlab(["data=cifar100", f"data.root={tmp_path / 'data'}", "pipeline=single", "model=plain2",
                   "distill=none", "trainer.max_epochs=1", "data.batch_size=16", "logger=csv"],
                  tmp_path / "out", tmp_path / "run", synth=False)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "data cifar100: 54 train / 6 val / 20 test images (preset none)" in r.stdout + r.stderr


# -- 10 (second part). an option the mode does not read is named ------------------------------------------------
def test_an_option_the_stochastic_mode_ignores_is_named(capsys):
    assert stochastic_config({"mode": "drop_k", "k": 1, "p": 0.0}, "student") == \
        {"mode": "drop_k", "k": 1, "include_teacher": True, "min_keep": 1}
    err = capsys.readouterr().err
    assert "distill.stochastic.p=0.0 has no effect with mode 'drop_k' (stage student)" in err
    stochastic_config({"mode": "drop_k", "k": 1, "p": 0.75}, "student")  # the default: nothing to say
    assert "no effect" not in capsys.readouterr().err


@pytest.mark.slow  # a long CLI run: in make test-slow (CI runs both)
def test_cli_warns_about_an_ignored_stochastic_option(tmp_path):
    r = run_kdlab(["+experiment=dgkd_synthetic_test", "distill.stochastic.p=0", "trainer.max_epochs=1"],
                  tmp_path / "out", tmp_path / "run")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "kdlab: warning: distill.stochastic.p=0 has no effect with mode 'drop_k' (stage student); 'drop_k' " \
           "reads: k, include_teacher, min_keep" in r.stderr
