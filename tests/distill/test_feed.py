"""FEED (feature-level ensemble distillation): translators, the loss against a hand computation, gradients
(translators train, teachers do not), the exported student, parallel and sequential wiring from the real
YAML, shared teachers with the baselines, and the CLI end to end on synthetic data.

Feature taps returning the right shapes on every zoo model (28x28 and 32x32, through forward hooks) are
tested in tests/models/test_zoo.py (test_taps_every_model, test_resnet_stage_shapes_and_dotted_names); here FEED
builds and back-propagates on every zoo model.
"""
from __future__ import annotations

import copy
import functools

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from kdlab.distill import SourceOutput, StudentOutput, build_strategy
from kdlab.distill.base import StrategyContext
from kdlab.distill.feed import FEED, Translator
from kdlab.errors import ConfigError
from kdlab.models import FeatureTaps, build_model, count_params, feature_shapes, list_models
from kdlab.modules import DistillModule, SourceBank
from kdlab.pipeline import build_stages
from kdlab.pipeline.checks import validate_config
from kdlab.pipeline.topology import member_seed
from kdlab.pipeline.train import _state_from_lightning
from kdlab.store.fileio import load_weights
from tests.helpers.cli import read_results, run_kdlab, trained
from tests.helpers.config import compose_config as composed
from tests.helpers.config import stage_keys, wiring


def feed_cfg(**feed) -> dict:
    return {"strategy": "feed", "temperature": 4.0, "lam": 0.5, "kl_reduction": "batchmean",
            "feed": {"beta": 500.0, "reduce": "sum", "student_tap": "prepool", "source_tap": "prepool",
                     "logit_kd": False, **feed}}


def make_feed(student_shape, source_shapes: dict, **feed) -> FEED:
    ctx = StrategyContext("student", list(source_shapes), 10, {"prepool": tuple(student_shape)},
                          {n: {"prepool": tuple(s)} for n, s in source_shapes.items()})
    return build_strategy(feed_cfg(**feed), ctx)


# -- hand computations from plain tensor ops ------------------------------------------------------------------
def hand_translate(tr: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    convs = [m for m in tr if isinstance(m, nn.Conv2d)]
    for c in convs:
        x = F.conv2d(x, c.weight, c.bias, padding=1)
        x = torch.where(x > 0, x, 0.1 * x)  # LeakyReLU(0.1)
    return x


def hand_l1(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    s, t = s.reshape(s.shape[0], -1), t.reshape(t.shape[0], -1)
    s = s / s.pow(2).sum(1, keepdim=True).sqrt()
    t = t / t.pow(2).sum(1, keepdim=True).sqrt()
    return (s - t).abs().sum() / s.numel()


def hand_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logp = logits - logits.exp().sum(1, keepdim=True).log()
    return -logp[torch.arange(len(y)), y].mean()


def hand_kd(zs: torch.Tensor, zt: torch.Tensor, T: float) -> torch.Tensor:
    ps = (zs / T).softmax(1)
    pt = (zt / T).softmax(1)
    return T * T * (pt * (pt.log() - ps.log())).sum() / zs.shape[0]


# the widths of the translator's convolutions (in, out) for a student map of c_in and a source map of c_out
# channels: Factor Transfer's Translator (Models/FeatureProjection.py: conv0 in->in, conv1 in->planes, conv2
# planes->planes) and kdlab's earlier one (in->out, then out->out twice)
WIDTHS = {"factor_transfer": lambda i, o: [(i, i), (i, o), (o, o)],
          "project_first": lambda i, o: [(i, o), (o, o), (o, o)]}


@pytest.mark.parametrize("kind", ["factor_transfer", "project_first", None])
def test_translators_three_3x3_convs_with_leaky_relu_per_teacher(kind):
    block = {} if kind is None else {"translator": kind}
    strat = make_feed((16, 7, 7), {"teacher1": (32, 7, 7), "teacher2": (64, 4, 4)}, **block)
    widths = WIDTHS[kind or "factor_transfer"]  # the default is Factor Transfer's
    assert list(strat.translators) == ["teacher1", "teacher2"]
    for name, c_out in (("teacher1", 32), ("teacher2", 64)):
        tr = strat.translators[name]
        assert isinstance(tr, Translator) and len(tr) == 6
        convs, acts = list(tr)[0::2], list(tr)[1::2]
        assert [(c.in_channels, c.out_channels) for c in convs] == widths(16, c_out)
        assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) and c.stride == (1, 1) for c in convs)
        assert all(c.bias is not None for c in convs)  # as Factor Transfer's (bias=True)
        assert all(isinstance(a, nn.LeakyReLU) and a.negative_slope == 0.1 for a in acts)
    by_hand = sum(ci * co * 9 + co for c in (32, 64) for ci, co in widths(16, c))
    assert strat.extra_parameters() == by_hand == sum(p.numel() for p in strat.translators.parameters())
    assert (strat.student_taps(), strat.source_taps()) == (["prepool"], ["prepool"])
    assert FEED.taps(feed_cfg(student_tap="stage2", source_tap="stage3")) == (["stage2"], ["stage3"])


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_feed_loss_equals_hand_computation(reduce):
    torch.manual_seed(0)
    # teacher1 has the student's spatial size; teacher2's 4x4 map is matched by average pooling (8x8 -> 4x4)
    strat = make_feed((8, 8, 8), {"teacher1": (12, 8, 8), "teacher2": (6, 4, 4)}, reduce=reduce, beta=250.0)
    b = 3
    f_s = torch.randn(b, 8, 8, 8)
    logits, y = torch.randn(b, 10), torch.tensor([1, 4, 9])
    t1, t2 = torch.rand(b, 12, 8, 8), torch.rand(b, 6, 4, 4)
    sources = {"teacher1": SourceOutput(torch.randn(b, 10), {"prepool": t1}),
               "teacher2": SourceOutput(torch.randn(b, 10), {"prepool": t2})}
    terms, weights = strat.loss_terms(StudentOutput(logits, {"prepool": f_s}), sources, y, 0.0)

    s1 = hand_translate(strat.translators["teacher1"], f_s)
    s2 = hand_translate(strat.translators["teacher2"], f_s).reshape(b, 6, 4, 2, 4, 2).mean((3, 5))  # 2x2 pooling
    per_teacher = [hand_l1(s1, t1), hand_l1(s2, t2)]
    expected = per_teacher[0] + per_teacher[1] if reduce == "sum" else (per_teacher[0] + per_teacher[1]) / 2
    assert set(terms) == {"ce", "feed"} and weights == {"ce": 1.0, "feed": 250.0}
    assert terms["feed"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert terms["ce"].item() == pytest.approx(hand_ce(logits, y).item(), rel=1e-6)
    total = sum(weights[k] * v for k, v in terms.items())
    assert total.item() == pytest.approx((hand_ce(logits, y) + 250.0 * expected).item(), rel=1e-5)


def test_feed_with_logit_kd_equals_hand_computation():
    torch.manual_seed(1)
    strat = make_feed((4, 4, 4), {"a": (4, 4, 4), "b": (4, 4, 4)}, logit_kd=True)
    b = 5
    f_s, logits, y = torch.randn(b, 4, 4, 4), torch.randn(b, 10), torch.randint(0, 10, (b,))
    src = {n: SourceOutput(torch.randn(b, 10), {"prepool": torch.rand(b, 4, 4, 4)}) for n in ("a", "b")}
    terms, weights = strat.loss_terms(StudentOutput(logits, {"prepool": f_s}), src, y, 0.0)
    kd = (hand_kd(logits, src["a"].logits, 4.0) + hand_kd(logits, src["b"].logits, 4.0)) / 2  # averaged
    feat = sum(hand_l1(hand_translate(strat.translators[n], f_s), src[n].features["prepool"]) for n in src)
    assert weights == {"ce": 0.5, "kd": 0.5, "feed": 500.0}
    assert terms["kd"].item() == pytest.approx(kd.item(), rel=1e-5)
    assert terms["feed"].item() == pytest.approx(feat.item(), rel=1e-5)
    assert terms["ce"].item() == pytest.approx(hand_ce(logits, y).item(), rel=1e-6)


def test_feed_loss_is_scale_invariant_and_zero_on_a_match():
    # normalization: a translated feature equal to the teacher's up to a positive factor costs nothing
    strat = make_feed((6, 5, 5), {"t": (6, 5, 5)})
    strat.translators["t"] = nn.Identity()
    f_s = torch.rand(2, 6, 5, 5)
    terms, _ = strat.loss_terms(StudentOutput(torch.randn(2, 10), {"prepool": f_s}),
                                {"t": SourceOutput(torch.randn(2, 10), {"prepool": 7.0 * f_s})},
                                torch.tensor([0, 1]), 0.0)
    assert terms["feed"].item() == pytest.approx(0.0, abs=1e-6)


def test_student_smaller_than_teacher_map_is_upsampled():
    strat = make_feed((4, 4, 4), {"t": (4, 8, 8)})
    f_s, t = torch.randn(2, 4, 4, 4), torch.rand(2, 4, 8, 8)
    terms, _ = strat.loss_terms(StudentOutput(torch.randn(2, 10), {"prepool": f_s}),
                                {"t": SourceOutput(torch.randn(2, 10), {"prepool": t})}, torch.tensor([0, 1]), 0.0)
    up = F.interpolate(hand_translate(strat.translators["t"], f_s), size=(8, 8), mode="bilinear",
                       align_corners=False)
    assert terms["feed"].item() == pytest.approx(hand_l1(up, t).item(), rel=1e-5)


def test_bad_feed_settings_are_config_errors():
    with pytest.raises(ConfigError, match="unknown distill.feed.reduce 'max'; known: sum, mean"):
        make_feed((4, 4, 4), {"t": (4, 4, 4)}, reduce="max")
    with pytest.raises(ConfigError, match="beta must be >= 0"):
        make_feed((4, 4, 4), {"t": (4, 4, 4)}, beta=-1.0)
    with pytest.raises(ConfigError, match="FEED needs 4-d feature maps"):
        make_feed((64,), {"t": (4, 4, 4)})  # e.g. the `embedding` point: a vector, not a map
    with pytest.raises(ConfigError, match="unknown distill.feed.translator 'wide'; known: factor_transfer, "
                                          "project_first"):
        make_feed((4, 4, 4), {"t": (4, 4, 4)}, translator="wide")


# -- real zoo models --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list_models())
def test_feed_on_every_zoo_model(name):
    """Every zoo model (and its 1xN twin) as a FEED student of a resnet8, through hook taps."""
    torch.manual_seed(0)
    teacher = build_model("resnet8", 10, in_channels=1, input_size=28).eval()
    for student in (build_model(name, 10, in_channels=1, input_size=28),
                    build_model(name, 10, in_channels=1, input_size=28, on_the_fly=True)):
        shape = (1, 28, 28)
        s_shape = feature_shapes(student, "prepool", shape)
        strat = build_strategy(feed_cfg(), StrategyContext("student", ["t"], 10, s_shape,
                                                           {"t": feature_shapes(teacher, "prepool", shape)}))
        assert strat.translators["t"][0].in_channels == s_shape["prepool"][0]
        assert strat.translators["t"][-2].out_channels == 64
        x, y = torch.randn(2, 1, 28, 28), torch.tensor([3, 5])
        with torch.no_grad(), FeatureTaps(teacher, "prepool") as t_taps:
            src = SourceOutput(teacher(x), dict(t_taps.features))
        with FeatureTaps(student, "prepool") as s_taps:
            logits = student(x)
            terms, weights = strat.loss_terms(StudentOutput(logits, dict(s_taps.features)), {"t": src}, y, 0.0)
        sum(weights[k] * v for k, v in terms.items()).backward()
        assert terms["feed"].item() > 0
        assert all(p.grad is not None for p in strat.translators.parameters())


@pytest.fixture(scope="module")
def dm(synthetic_dm):
    return synthetic_dm(n_train=256, n_test=64, augment="none", batch_size=32, seed=0)


def feed_module(n_teachers=2, **feed):
    torch.manual_seed(0)
    teachers = {f"teacher{i + 1}": build_model("resnet8", 10, in_channels=1, input_size=28)
                for i in range(n_teachers)}
    student = build_model("resnet8", 10, in_channels=1, input_size=28)
    shape = (1, 28, 28)
    ctx = StrategyContext("student", list(teachers), 10, feature_shapes(student, "prepool", shape),
                          {n: feature_shapes(m, "prepool", shape) for n, m in teachers.items()})
    strat = build_strategy(feed_cfg(**feed), ctx)
    bank = SourceBank(teachers, strat.source_taps())
    mod = DistillModule(student, 10, functools.partial(torch.optim.SGD, lr=0.05), None, sources=bank,
                        strategy=strat, max_epochs=1, stage="student")
    return mod, teachers


def test_translators_get_gradients_teachers_do_not(dm):
    mod, teachers = feed_module(logit_kd=True)
    x, y, idx = next(iter(dm.train_dataloader()))
    outs = mod.bank.outputs(mod.bank.names, x, idx)
    assert all(not o.features["prepool"].requires_grad and not o.logits.requires_grad for o in outs.values())
    mod.train()
    _, terms, weights = mod.compute_terms(x, y, idx)
    assert set(terms) == {"ce", "kd", "feed"} and terms["feed"].item() > 0
    sum(weights[k] * v for k, v in terms.items()).backward()
    for name in teachers:
        grads = [p.grad for p in mod.strategy.translators[name].parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in grads), name
    assert all(p.grad is not None for p in mod.model.parameters() if p.requires_grad)
    for m in teachers.values():
        assert all(p.grad is None and not p.requires_grad for p in m.parameters())
    # the optimizer trains the translators with the student, and nothing of the teachers
    opt_params = {id(p) for p in mod.trainable_parameters()}
    assert {id(p) for p in mod.strategy.parameters()} <= opt_params
    assert not opt_params & {id(p) for m in teachers.values() for p in m.parameters()}
    assert mod.extra_parameters() == sum(p.numel() for p in mod.strategy.translators.parameters()) == \
        2 * (64 * 64 * 9 + 64) * 3


def test_fit_moves_translators_not_teachers_and_exports_only_the_student(dm):
    mod, teachers = feed_module()
    before_t = {n: copy.deepcopy(m.state_dict()) for n, m in teachers.items()}
    before_tr = copy.deepcopy(mod.strategy.state_dict())
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu", num_sanity_val_steps=0)
    trainer.fit(mod, datamodule=dm)
    for n, m in teachers.items():
        assert not m.training
        assert all(torch.equal(v, before_t[n][k]) for k, v in m.state_dict().items()), n
    assert any(not torch.equal(v, before_tr[k]) for k, v in mod.strategy.state_dict().items())
    assert mod.bank.forward_calls == {"teacher1": 3, "teacher2": 3}
    # the Lightning checkpoint holds the translators (to resume), the export does not
    full = mod.state_dict()
    assert any(k.startswith("strategy.translators.") for k in full)
    exported = _state_from_lightning({"state_dict": full})
    bare = build_model("resnet8", 10, in_channels=1, input_size=28)
    assert set(exported) == set(bare.state_dict())
    bare.load_state_dict(exported, strict=True)


# -- wiring from the real YAML ----------------------------------------------------------------------------------
def test_parallel_feed_k_teacher_stages_with_distinct_seeds():
    cfg = composed("+experiment=feed_parallel_fashion_mnist", "pipeline.ensemble=3", "seed=5")
    specs = build_stages(cfg)
    assert [(s.name, s.role, s.seed) for s in specs] == [
        ("teacher1", "teacher", member_seed(5, "ensemble", 1)), ("teacher2", "teacher", member_seed(5, "ensemble", 2)),
        ("teacher3", "teacher", member_seed(5, "ensemble", 3)), ("student", "student", 5)]
    assert wiring(cfg) == {"teacher1": [], "teacher2": [], "teacher3": [],
                           "student": ["teacher1", "teacher2", "teacher3"]}
    assert all(s.model == specs[-1].model for s in specs)  # one architecture
    assert [s.distill["strategy"] for s in specs] == ["ce", "ce", "ce", "feed"]
    assert specs[-1].distill["feed"]["beta"] == 500.0 and specs[-1].distill["feed"]["student_tap"] == "prepool"
    keys = stage_keys(cfg)
    assert len(set(keys.values())) == 4  # different seeds: different stages in the store
    # independent seeds share no teacher (seed + k would make seed 6's teacher1 seed 5's teacher2)
    keys6 = stage_keys(composed("+experiment=feed_parallel_fashion_mnist", "pipeline.ensemble=3", "seed=6"))
    assert not set(keys6.values()) & set(keys.values())
    validate_config(cfg)


def test_sequential_generations_wiring():
    cfg = composed("+experiment=feed_sequential_fashion_mnist", "pipeline.generations=4", "seed=3",
                   "distill.feed.logit_kd=true")
    specs = build_stages(cfg)
    assert [(s.name, s.role, s.seed) for s in specs] == [
        ("gen1", "teacher", member_seed(3, "generation", 1)), ("gen2", "ta", member_seed(3, "generation", 2)),
        ("gen3", "ta", member_seed(3, "generation", 3)), ("student", "student", 3)]
    assert wiring(cfg) == {"gen1": [], "gen2": ["gen1"], "gen3": ["gen2"], "student": ["gen3"]}
    assert all(s.model == specs[0].model and s.model["arch"] == "resnet8" for s in specs)
    assert specs[0].distill["strategy"] == "ce"
    assert all(s.distill["strategy"] == "feed" and s.distill["feed"]["logit_kd"] for s in specs[1:])
    assert len(set(stage_keys(cfg).values())) == 4
    validate_config(cfg)
    # dense generations: every earlier generation teaches (one translator each)
    dense = composed("+experiment=feed_sequential_fashion_mnist", "pipeline.topology=dense")
    assert wiring(dense) == {"gen1": [], "gen2": ["gen1"], "student": ["gen1", "gen2"]}
    with pytest.raises(ConfigError, match="generations must be >= 2"):
        build_stages(composed("+experiment=feed_sequential_fashion_mnist", "pipeline.generations=1"))


def test_baselines_reuse_the_same_teachers():
    feed = stage_keys(composed("+experiment=feed_parallel_fashion_mnist"))
    logit_cfg = composed("+experiment=feed_logitkd_fashion_mnist")
    logit = stage_keys(logit_cfg)
    assert build_stages(logit_cfg)[-1].distill["strategy"] == "kd" and logit_cfg["method"] == "feed_logitkd"
    assert (logit["teacher1"], logit["teacher2"]) == (feed["teacher1"], feed["teacher2"])
    assert logit["student"] != feed["student"]
    # the student alone is the FEED student's twin (same seed: same initial weights and data order), not one of
    # the teachers, which have seeds of their own
    alone = build_stages(composed("+experiment=feed_alone_fashion_mnist"))
    feed_specs = build_stages(composed("+experiment=feed_parallel_fashion_mnist"))
    assert alone[-1].seed == feed_specs[-1].seed != feed_specs[0].seed
    assert stage_keys(composed("+experiment=feed_alone_fashion_mnist"))["student"] not in feed.values()
    # on the command line: distill=kd on the FEED recipe is the same baseline
    cli = stage_keys(composed("+experiment=feed_parallel_fashion_mnist", "distill=kd", "method=feed_logitkd"))
    assert cli == logit


def test_cifar100_recipes():
    par = composed("+experiment=feed_parallel_cifar100")
    seq = composed("+experiment=feed_sequential_cifar100", "distill.feed.beta=200")
    for cfg in (par, seq):
        specs = build_stages(cfg)
        assert cfg["data"]["name"] == "cifar100" and cfg["data"]["augment"] == "crop_flip"
        assert cfg["data"]["subset"] is None  # preset none
        s = specs[-1]
        assert s.model["arch"] == "resnet56" and s.max_epochs == 200 and s.distill["strategy"] == "feed"
        assert s.optimizer["lr"] == 0.1 and s.scheduler["milestones"] == [0.5, 0.75]
        assert "multistep" in s.scheduler["_target_"]
        validate_config(cfg)
    assert [s.name for s in build_stages(par)] == ["teacher1", "teacher2", "teacher3", "student"]
    assert [s.name for s in build_stages(seq)] == ["gen1", "gen2", "student"]
    assert build_stages(seq)[-1].distill["feed"]["beta"] == 200.0
    assert build_stages(par)[-1].distill["feed"]["beta"] == 500.0


# -- end to end -------------------------------------------------------------------------------------------------
TINY = ["data.subset=null", "data.test_subset=null", "data.n_train=192", "data.n_test=64", "trainer.max_epochs=1"]


def _translator_params(c_s: int, c_t: int) -> int:
    return c_s * c_t * 9 + c_t + 2 * (c_t * c_t * 9 + c_t)


@pytest.mark.slow  # a long CLI run: in make test-slow (CI runs both)
def test_cli_parallel_feed_with_logit_kd(tmp_path):
    run = tmp_path / "feed"
    r = run_kdlab(["+experiment=feed_parallel_fashion_mnist", *TINY, "distill.feed.logit_kd=true"],
                  tmp_path / "out", run)
    assert r.returncode == 0, r.stderr[-3000:]
    res = read_results(run)
    assert res["status"] == "completed" and res["method"] == "feed_parallel"
    assert [(s["name"], s["sources"]) for s in res["stages"]] == [
        ("teacher1", []), ("teacher2", []), ("student", ["teacher1", "teacher2"])]
    assert trained(res) == ["teacher1", "teacher2", "student"]
    assert res["stages"][0]["store_key"] != res["stages"][1]["store_key"]
    student = res["stages"][-1]
    arch_params = count_params(build_model("resnet8", 10, 1, input_size=28))
    assert student["params"] == arch_params
    assert student["extra_params"] == 2 * _translator_params(64, 64)  # two translators, counted apart
    assert [s["extra_params"] for s in res["stages"][:2]] == [0, 0]
    # the saved student is exactly the architecture: strict load, no translator keys, same parameter count
    state = load_weights(student["checkpoint"], "student")
    assert not any("translator" in k or k.startswith(("strategy", "model.")) for k in state)
    bare = build_model("resnet8", 10, 1, input_size=28)
    bare.load_state_dict(state, strict=True)
    assert sum(v.numel() for k, v in state.items() if k in dict(bare.named_parameters())) == arch_params
    # logged: the loss terms per step, and the extra parameters in the stage's hparams
    log_dir = run / "csv" / "student"
    header = (log_dir / "metrics.csv").read_text().splitlines()[0]
    for metric in ("train/loss_ce", "train/loss_feed", "train/loss_kd", "val/acc", "test/acc"):
        assert metric in header, metric
    hparams = (log_dir / "hparams.yaml").read_text()
    assert f"extra_params: {student['extra_params']}" in hparams and f"params: {arch_params}" in hparams


@pytest.mark.slow  # minutes of CLI runs: make test-slow (CI runs it)
def test_cli_sequential_feed(tmp_path):
    run = tmp_path / "seq"
    r = run_kdlab(["+experiment=feed_sequential_fashion_mnist", *TINY], tmp_path / "out", run)
    assert r.returncode == 0, r.stderr[-3000:]
    res = read_results(run)
    assert res["status"] == "completed" and res["method"] == "feed_sequential"
    assert [(s["name"], s["role"], s["sources"]) for s in res["stages"]] == [
        ("gen1", "teacher", []), ("gen2", "ta", ["gen1"]), ("student", "student", ["gen2"])]
    assert len({s["store_key"] for s in res["stages"]}) == 3
    assert [s["extra_params"] for s in res["stages"]] == [0, _translator_params(64, 64), _translator_params(64, 64)]
    for s in res["stages"]:
        build_model("resnet8", 10, 1, input_size=28).load_state_dict(load_weights(s["checkpoint"], s["name"]))
    assert res["final"]["stage"] == "student"


@pytest.mark.slow
def test_cli_baselines_reuse_the_feed_teachers(tmp_path):
    """Parallel FEED, then logit KD from the same teachers: the teachers train once. The student alone is the
    FEED student's twin (same seed), trained from labels; sequential FEED has generations of its own."""
    out = tmp_path / "out"
    r = run_kdlab(["+experiment=feed_parallel_fashion_mnist", *TINY], out, tmp_path / "feed")
    assert r.returncode == 0, r.stderr[-3000:]
    feed = read_results(tmp_path / "feed")
    r = run_kdlab(["+experiment=feed_logitkd_fashion_mnist", *TINY], out, tmp_path / "logit")
    assert r.returncode == 0, r.stderr[-3000:]
    logit = read_results(tmp_path / "logit")
    assert trained(logit) == ["student"] and logit["method"] == "feed_logitkd"
    assert [s["store_key"] for s in logit["stages"][:2]] == [s["store_key"] for s in feed["stages"][:2]]
    assert logit["stages"][-1]["extra_params"] == 0
    header = (tmp_path / "logit" / "csv" / "student" / "metrics.csv").read_text().splitlines()[0]
    assert "train/loss_kd" in header and "train/loss_feed" not in header
    r = run_kdlab(["+experiment=feed_alone_fashion_mnist", *TINY], out, tmp_path / "alone")
    assert r.returncode == 0, r.stderr[-3000:]
    alone = read_results(tmp_path / "alone")
    assert trained(alone) == ["student"]
    assert alone["stages"][0]["store_key"] not in {s["store_key"] for s in feed["stages"]}
    r = run_kdlab(["+experiment=feed_sequential_fashion_mnist", *TINY], out, tmp_path / "seq")
    assert r.returncode == 0, r.stderr[-3000:]
    seq = read_results(tmp_path / "seq")
    assert trained(seq) == ["gen1", "gen2", "student"]
    assert not {s["store_key"] for s in seq["stages"]} & {s["store_key"] for s in feed["stages"]}
