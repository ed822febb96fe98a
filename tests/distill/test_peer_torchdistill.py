"""torchdistill as a peer: every method it implements, fed the same inputs as kdlab's strategy, gives the same loss,
the same gradients and the same parameters after SGD steps.

torchdistill (yoshitomo-matsubara/torchdistill, a locked development dependency) is an independent implementation:
its losses are looked up in its own registry (``torchdistill.losses.registry``: mid-level losses by key, combined by
the high-level ``WeightedSumLoss`` with ``CrossEntropyLoss`` through its ``SimpleLossWrapper``, as its YAML configs
do), and its inputs are taken by its own ``ForwardHookManager``, from a copy of the student with the same weights.
Methods: KD, logit standardization, DIST, AT, SP, PKT, RKD, CRD (its embeddings ``Normalizer4CRD`` and memory),
and, where torchdistill has the building blocks, FEED (Factor Transfer's translator ``Translator4FactorTransfer`` and
``FTLoss``) and ReviewKD (``AttentionBasedFusion`` and ``HierarchicalContextLoss``, at equal spatial sizes, which is
what torchdistill's fusion supports). DKD, DGKD and FitNet with a regressor are not in torchdistill: their tests
compute the losses by hand (test_logit_methods.py, test_feature_methods.py).

Precision: the models and torchdistill run in float64; kdlab's strategies compute their losses in float32 (they
cast features and logits with ``.float()``, for mixed precision), so the strategy-level comparisons hold to float32
rounding (relative 1e-5, in norm per tensor). kdlab's loss functions that keep their input's dtype are compared in
float64 too. CRD runs in float32 on both sides (kdlab's embeddings and memories are float32).

Where the two definitions differ, the test says so, configures both to one definition for the comparison, and
asserts the relation between the two:

- DIST: kdlab's Pearson correlation (the official DIST code's) divides by ``|a||b| + 1e-8``, torchdistill's by
  ``max(|a|, 1e-8) max(|b|, 1e-8)`` (``torch.nn.functional.cosine_similarity``). The comparison runs kdlab's with
  eps 0 (then both are ``<a, b> / (|a||b|)``); :func:`test_dist_pearson_differs_from_torchdistill_only_by_where_eps_goes`
  asserts the relation with kdlab's eps.
- SP: torchdistill's ``SPKDLoss`` normalizes the rows of the similarity matrix with ``normalize(G, 1)``, i.e. p = 1
  (L1 norm) where the SP paper, mdistiller and RepDistiller (``F.normalize(G)``: p = 2, dim = 1) use the L2 norm,
  as kdlab does. The comparison gives torchdistill's call the L2 norm; :func:`test_sp_torchdistill_normalizes_rows_in_l1`
  asserts what torchdistill computes as released.
- AT: torchdistill's is p = 2 without spatial pooling: kdlab's default p, and equal map sizes here.
"""
from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchdistill.core.forward_hook import ForwardHookManager
from torchdistill.losses import mid_level as td_mid_level
from torchdistill.losses.mid_level import DISTLoss
from torchdistill.losses.registry import get_high_level_loss, get_mid_level_loss
from torchdistill.models.wrapper import AttentionBasedFusion, Normalizer4CRD, Translator4FactorTransfer

from kdlab.distill import SourceOutput, StudentOutput, build_strategy
from kdlab.distill import crd as kd_crd
from kdlab.distill import dist as kd_dist
from kdlab.distill.at import at_loss
from kdlab.distill.base import StrategyContext
from kdlab.distill.dist import dist_terms
from kdlab.distill.pkt import pkt_loss
from kdlab.distill.reviewkd import hcl_loss
from kdlab.distill.rkd import rkd_losses
from kdlab.distill.sp import sp_loss
from kdlab.models import FeatureTaps, build_model, feature_shapes
from tests.helpers.methods import cfg_of, composed_distill

CPU = torch.device("cpu")
CLASSES, BATCH, SHAPE = 10, 8, (3, 16, 16)
N_TRAIN, NCE_K = 64, 16
LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 5e-4
STEPS = 2  # the second step moves by the momentum too


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def assert_rel(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5, what: str = "") -> None:
    """``|got - want| <= rel * |want|`` in the Euclidean norm over the tensor (relative 1e-5 per tensor)."""
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err, scale = (got - want).norm().item(), want.norm().item()
    assert err <= rel * max(scale, 1e-30), f"{what}: |diff| {err:.3e} > {rel:g} * |want| {scale:.3e}"


# -- torchdistill's side: configs as its YAML files write them ---------------------------------------------------
def td_criterion(terms: dict[str, tuple[dict, float]], ce_weight: float | None = 1.0) -> nn.Module:
    """torchdistill's ``WeightedSumLoss`` of mid-level losses (by registry key) and, with ``ce_weight``, the
    cross-entropy of the student's output through ``SimpleLossWrapper``."""
    sub_terms = {name: {"criterion": crit, "weight": w} for name, (crit, w) in terms.items()}
    if ce_weight is not None:
        sub_terms["ce"] = {"criterion": {"key": "CrossEntropyLoss", "kwargs": {"reduction": "mean"}},
                           "criterion_wrapper": {"key": "SimpleLossWrapper", "kwargs": {
                               "input": {"is_from_teacher": False, "module_path": ".", "io": "output"},
                               "target": {"uses_label": True}}},
                           "weight": ce_weight}
    return get_high_level_loss({"key": "WeightedSumLoss", "kwargs": {"sub_terms": sub_terms}})


def pair(student_path: str, teacher_path: str, io: str = "output") -> dict:
    return {"student_module_path": student_path, "student_module_io": io, "teacher_module_path": teacher_path,
            "teacher_module_io": io}


# -- one method: kdlab's config and taps, torchdistill's criterion, hooks and auxiliary modules --------------------
@dataclass
class Method:
    name: str
    kdlab: Callable[[], dict]  # kdlab's distill node (composed when the test runs)
    td_terms: Callable[[], dict]  # torchdistill's mid-level terms {name: (config or module, weight)}
    td_ce: float | None = 1.0
    s_paths: dict[str, str] = field(default_factory=dict)  # torchdistill hooks: path -> "input" | "output"
    t_paths: dict[str, str] = field(default_factory=dict)
    student_kwargs: dict = field(default_factory=dict)
    double_strategy: bool = True  # the strategy's own modules in float64 (CRD: float32, as kdlab runs it)
    #: (kdlab strategy, torchdistill's student io dict, teacher io dict) -> the auxiliary outputs added to the dicts
    aux: Callable | None = None
    #: the auxiliary modules on torchdistill's side, built from kdlab's strategy (same weights): {name: module}
    td_modules: Callable | None = None
    #: (monkeypatch) -> None: both sides set to one definition where they differ (the module docstring)
    same_definition: Callable | None = None


def kdlab_pearson_without_eps(monkeypatch) -> None:
    monkeypatch.setattr(kd_dist, "pearson_rows", functools.partial(kd_dist.pearson_rows, eps=0.0))


def torchdistill_sp_rows_in_l2(monkeypatch) -> None:
    """SPKDLoss's ``normalize(G, 1)`` read as the row normalization it means (dim 1, the L2 norm)."""
    monkeypatch.setattr(td_mid_level, "normalize", lambda x, dim=1: F.normalize(x, p=2.0, dim=dim))


def kd_cfg(**over) -> Callable[[], dict]:
    return lambda: {**composed_distill("kd"), **over}


def block_cfg(name: str, **block) -> Callable[[], dict]:
    return lambda: cfg_of(name, **block)


# resnet8 / resnet14 at 16 px: layer1 16 x 16, layer2 8 x 8, layer3 4 x 4 (64 channels), flatten: the embedding
LAYERS = {"stage1": "layer1", "stage2": "layer2", "stage3": "layer3", "prepool": "layer3"}


def feed_aux(strat, s_io, t_io, modules):
    s_io["translator"] = {"output": modules["translator"](s_io["layer3"]["output"])}


def crd_aux(strat, s_io, t_io, modules):
    s_io["normalizer"] = {"output": modules["embed_s"](s_io["fc"]["input"].float())}
    t_io["normalizer"] = {"output": modules["embed_t"](t_io["fc"]["input"].float())}
    s_io["empty"] = {"input": {"pos_idx": modules["index"], "contrast_idx": modules["contrast_idx"]}}


def crd_modules(strat) -> dict:
    head = strat.heads["teacher"]
    embed_s = Normalizer4CRD(copy.deepcopy(head.embed_s.linear))
    embed_t = Normalizer4CRD(copy.deepcopy(head.embed_t.linear))
    return {"embed_s": embed_s, "embed_t": embed_t}


REVIEW_SIZES = [1, 4, 8, 16]  # the levels deep to shallow: pooled, layer3, layer2, layer1 (resnet8 at 16 px)


def review_modules(strat) -> dict:
    """torchdistill's AttentionBasedFusion per level (shallow to deep), with the weights of kdlab's ABFs."""
    out = {}
    for i, abf in enumerate(strat.fusions["teacher"].abfs):
        fuse = abf.att_conv is not None
        td = AttentionBasedFusion(abf.conv1[0].in_channels, abf.conv1[0].out_channels, abf.conv2[0].out_channels,
                                  uses_attention=fuse).double()
        state = {k.replace("att_conv", "attention_conv"): v for k, v in abf.state_dict().items()}
        td.load_state_dict(state)
        out[f"abf{i}"] = td
    return out


def review_aux(strat, s_io, t_io, modules):
    """torchdistill's Student4KnowledgeReview.secondary_forward, deep to shallow, on the student's levels."""
    maps = [s_io["layer1"]["output"], s_io["layer2"]["output"], s_io["layer3"]["output"],
            s_io["fc"]["input"][:, :, None, None]]
    abfs = [modules[f"abf{i}"] for i in range(4)]
    out, res = abfs[3](maps[3])
    s_io["abf3"] = {"output": (out, res)}
    for i, size in zip((2, 1, 0), REVIEW_SIZES[1:]):
        out, res = abfs[i](maps[i], res, size)
        s_io[f"abf{i}"] = {"output": (out, res)}
    t_io["pooled4d"] = {"output": t_io["fc"]["input"][:, :, None, None]}


def hcl_terms(weight: float) -> dict:
    targets = ["layer1.0.preact", "layer2.0.preact", "layer3.0.preact", "pooled4d"]  # resnet14: 2 blocks a stage
    targets = [t.replace(".0.", ".1.") for t in targets]
    return {f"hcl{i}": ({"key": "HierarchicalContextLoss", "kwargs": {
        **pair(f"abf{i}", t), "reduction": "mean", "output_sizes": [4, 2, 1]}}, weight) for i, t in enumerate(targets)}


METHODS = {
    "kd": Method("kd", kd_cfg(temperature=4.0, lam=0.7), lambda: {
        "kd": ({"key": "KDLoss", "kwargs": {**pair(".", "."), "temperature": 4.0, "alpha": 0.3,
                                            "reduction": "batchmean"}}, 1.0)}, td_ce=None),
    "logit_standardization": Method("logit_standardization", kd_cfg(temperature=2.0, lam=0.9, logit_stand=True),
                                    lambda: {"kd": ({"key": "LogitStdKDLoss", "kwargs": {
                                        **pair(".", "."), "temperature": 2.0, "alpha": 0.1, "beta": 0.9,
                                        "reduction": "batchmean"}}, 1.0)}, td_ce=None),
    "dist": Method("dist", block_cfg("dist", beta=2.0, gamma=1.5, temperature=4.0), lambda: {
        "dist": ({"key": "DISTLoss", "kwargs": {**pair(".", "."), "beta": 2.0, "gamma": 1.5, "tau": 4.0}}, 1.0)},
        same_definition=kdlab_pearson_without_eps),
    "at": Method("at", block_cfg("at", feat_weight=1000.0, p=2.0, student_taps=["stage1", "stage2", "prepool"],
                                 source_taps=["stage1", "stage2", "prepool"]), lambda: {
        "at": ({"key": "ATLoss", "kwargs": {"mode": "code", "at_pairs": {
            f"pair{i}": {"student": {"io": "output", "path": p}, "teacher": {"io": "output", "path": p}, "weight": 1}
            for i, p in enumerate(("layer1", "layer2", "layer3"))}}}, 1000.0)},
        s_paths={"layer1": "output", "layer2": "output", "layer3": "output"},
        t_paths={"layer1": "output", "layer2": "output", "layer3": "output"}),
    "sp": Method("sp", block_cfg("sp", gamma=3000.0, student_tap="prepool", source_tap="prepool"), lambda: {
        "sp": ({"key": "SPKDLoss", "kwargs": {"student_output_path": "layer3", "teacher_output_path": "layer3",
                                              "reduction": "batchmean"}}, 3000.0)},
        s_paths={"layer3": "output"}, t_paths={"layer3": "output"}, same_definition=torchdistill_sp_rows_in_l2),
    "pkt": Method("pkt", block_cfg("pkt", feat_weight=30000.0, eps=1e-7), lambda: {
        "pkt": ({"key": "PKTLoss", "kwargs": {**pair("fc", "fc", "input"), "eps": 1e-7}}, 30000.0)},
        s_paths={"fc": "input"}, t_paths={"fc": "input"}),
    "rkd": Method("rkd", block_cfg("rkd", distance_weight=25.0, angle_weight=50.0), lambda: {
        "rkd": ({"key": "RKDLoss", "kwargs": {"student_output_path": "flatten", "teacher_output_path": "flatten",
                                              "dist_factor": 25.0, "angle_factor": 50.0, "reduction": "mean"}}, 1.0)},
        s_paths={"flatten": "output"}, t_paths={"flatten": "output"}),
    "crd": Method("crd", block_cfg("crd", feat_weight=0.8, feat_dim=32, nce_k=NCE_K, nce_t=0.07, nce_mom=0.5),
                  lambda: {"crd": ({"key": "CRDLoss", "kwargs": {
                      "student_norm_module_path": "normalizer", "student_empty_module_path": "empty",
                      "teacher_norm_module_path": "normalizer", "input_size": 32, "output_size": N_TRAIN,
                      "num_negative_samples": NCE_K, "num_samples": N_TRAIN, "temperature": 0.07, "momentum": 0.5,
                      "eps": 1e-7}}, 0.8)},
                  s_paths={"fc": "input"}, t_paths={"fc": "input"}, double_strategy=False, aux=crd_aux,
                  td_modules=crd_modules),
    "feed": Method("feed", block_cfg("feed", beta=500.0, reduce="sum", translator="factor_transfer"), lambda: {
        "feed": ({"key": "FTLoss", "kwargs": {"p": 1, "reduction": "mean", "paraphraser_path": "layer3",
                                              "translator_path": "translator"}}, 500.0)},
        s_paths={"layer3": "output"}, t_paths={"layer3": "output"}, student_kwargs={"width_mult": 0.5},
        aux=feed_aux, td_modules=lambda strat: {"translator": translator_copy(strat)}),
    "reviewkd": Method("reviewkd", block_cfg("reviewkd", feat_weight=5.0, warmup=0,
                                             student_taps=["stage1", "stage2", "stage3", "embedding"],
                                             source_taps=["preact1", "preact2", "preact3", "embedding"]),
                       lambda: hcl_terms(5.0),
                       s_paths={"layer1": "output", "layer2": "output", "layer3": "output", "fc": "input"},
                       t_paths={"layer1.1.preact": "output", "layer2.1.preact": "output",
                                "layer3.1.preact": "output", "fc": "input"},
                       aux=review_aux, td_modules=review_modules),
}


def translator_copy(strat) -> nn.Module:
    """torchdistill's Translator4FactorTransfer (no BN: Factor Transfer's translator) with kdlab's weights."""
    kd = strat.translators["teacher"]
    convs = [m for m in kd if isinstance(m, nn.Conv2d)]
    td = Translator4FactorTransfer(convs[0].in_channels, convs[-1].out_channels, uses_bn=False).double()
    td.load_state_dict(kd.state_dict())  # the same layout: conv, LeakyReLU(0.1), three times
    return td


# -- the two runs -------------------------------------------------------------------------------------------------
def models(method: Method):
    torch.manual_seed(0)
    teacher = build_model("resnet14", CLASSES, 3, input_size=16).double().eval()
    torch.manual_seed(1)
    student = build_model("resnet8", CLASSES, 3, input_size=16, **method.student_kwargs).double().train()
    return teacher, student


def kdlab_strategy(method: Method, teacher, student):
    from kdlab.distill.base import strategy_class

    cfg = method.kdlab()
    cls = strategy_class(cfg)
    s_taps, t_taps = cls.taps(cfg)
    ctx = StrategyContext("student", ["teacher"], CLASSES,
                          feature_shapes(student, s_taps, SHAPE) if s_taps else {},
                          {"teacher": feature_shapes(teacher, t_taps, SHAPE)} if t_taps else {},
                          num_train=N_TRAIN, max_epochs=1)
    strat = build_strategy(cfg, ctx)
    return (strat.double() if method.double_strategy else strat), s_taps, t_taps


def batches(steps: int):
    g = torch.Generator().manual_seed(2)
    for _ in range(steps):
        x = torch.randn(BATCH, *SHAPE, generator=g, dtype=torch.float64)
        y = torch.randint(0, CLASSES, (BATCH,), generator=g)
        index = torch.randperm(N_TRAIN, generator=g)[:BATCH]
        yield x, y, index


def kdlab_loss(strat, s_taps, t_taps, teacher, student, x, y, index):
    with torch.no_grad(), FeatureTaps(teacher, t_taps, detach=True) as tt:
        source = SourceOutput(teacher(x), dict(tt.features))
    with FeatureTaps(student, s_taps) as st:
        logits = student(x)
        terms, weights = strat.loss_terms(StudentOutput(logits, dict(st.features), index), {"teacher": source},
                                          y, 0.0)
    return sum(weights[k] * v for k, v in terms.items())


def td_loss(method, criterion, modules, teacher, student, x, y):
    def io(model, paths, grad):
        hooks = ForwardHookManager(CPU)
        for path, kind in paths.items():
            hooks.add_hook(model, path, requires_input=kind == "input", requires_output=kind == "output")
        with torch.set_grad_enabled(grad):
            out = model(x)
        d = hooks.pop_io_dict()
        hooks.clear()
        d["."] = {"output": out}
        return d

    s_io, t_io = io(student, method.s_paths, True), io(teacher, method.t_paths, False)
    if method.aux is not None:
        method.aux(None, s_io, t_io, modules)
    return criterion({"student": s_io, "teacher": t_io}, {}, y).sum()


def run_both(method: Method, monkeypatch, steps: int = STEPS):
    """Both sides from the same weights over ``steps`` SGD steps: the losses and gradients of the first step, the
    parameters (and CRD's memories) after the last."""
    if method.same_definition is not None:
        method.same_definition(monkeypatch)
    teacher, student = models(method)
    td_student = copy.deepcopy(student)
    strat, s_taps, t_taps = kdlab_strategy(method, teacher, student)
    modules = method.td_modules(strat) if method.td_modules else {}
    criterion = td_criterion(method.td_terms(), method.td_ce)
    drawn: list[torch.Tensor] = []
    if method.name == "crd":  # torchdistill is given kdlab's negatives (its own sampler draws from all samples)
        real = kd_crd.sample_negatives
        monkeypatch.setattr(kd_crd, "sample_negatives", lambda *a: drawn.append(real(*a)) or drawn[-1])
        crd_td = criterion.term_dict["crd"][0]
        head = strat.heads["teacher"]
        crd_td.memory_v1.copy_(head.memory_s)  # the student's memory (torchdistill: memory_v1)
        crd_td.memory_v2.copy_(head.memory_t)
    kd_params = [*student.parameters(), *strat.parameters()]
    td_params = [*td_student.parameters(), *[p for m in modules.values() for p in m.parameters()]]
    opt_kd = torch.optim.SGD(kd_params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    opt_td = torch.optim.SGD(td_params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    first = None
    for step, (x, y, index) in enumerate(batches(steps)):
        loss_kd = kdlab_loss(strat, s_taps, t_taps, teacher, student, x, y, index)
        if method.name == "crd":
            modules["index"] = index
            modules["contrast_idx"] = torch.cat([index[:, None], drawn[-1]], dim=1)
        loss_td = td_loss(method, criterion, modules, teacher, td_student, x, y)
        opt_kd.zero_grad()
        opt_td.zero_grad()
        loss_kd.backward()
        loss_td.backward()
        if step == 0:
            first = (loss_kd.item(), loss_td.item(), [p.grad.clone() for p in kd_params],
                     [p.grad.clone() for p in td_params])
        opt_kd.step()
        opt_td.step()
    return first, (student, strat, kd_params), (td_student, modules, td_params, criterion)


@pytest.mark.parametrize("name", list(METHODS))
def test_loss_gradient_and_sgd_steps_equal_torchdistill(name, monkeypatch):
    method = METHODS[name]
    first, (student, strat, kd_params), (td_student, _, td_params, criterion) = run_both(method, monkeypatch)
    loss_kd, loss_td, g_kd, g_td = first
    assert loss_kd == pytest.approx(loss_td, rel=1e-5) and loss_kd > 0
    assert len(g_kd) == len(g_td)
    for i, (a, b) in enumerate(zip(g_kd, g_td)):
        assert_rel(a, b, what=f"{name}: gradient of parameter {i}")
    n_student = len(list(student.parameters()))
    assert all(g.abs().sum() > 0 for g in g_kd[n_student:])  # the method's own parts (regressors, ABFs...) learn
    for (n_kd, p_kd), p_td in zip(student.named_parameters(), td_student.parameters()):
        assert_rel(p_kd, p_td, what=f"{name}: {n_kd} after {STEPS} SGD steps")
    for i, (a, b) in enumerate(zip(kd_params[n_student:], td_params[n_student:])):
        assert_rel(a, b, what=f"{name}: the method's parameter {i} after {STEPS} SGD steps")
    for a, b in zip(student.buffers(), td_student.buffers()):  # BN statistics: the same batches went through
        assert_rel(a.double(), b.double(), what=f"{name}: buffer")
    if name == "crd":  # the memories after the momentum updates, and the normalization constants
        head, td = strat.heads["teacher"], criterion.term_dict["crd"][0]
        assert_rel(head.memory_s, td.memory_v1, what="crd: student memory")
        assert_rel(head.memory_t, td.memory_v2, what="crd: teacher memory")
        assert head.z.tolist() == pytest.approx([td.params[2].item(), td.params[3].item()], rel=1e-5)


# -- the loss functions in float64 (value and gradient) where kdlab's keep their input's dtype ---------------------
def _grads(f, *xs):
    xs = [x.detach().clone().requires_grad_(True) for x in xs]
    value = f(*xs)
    value.backward()
    return value.detach(), [x.grad for x in xs]


def _feats(*shapes, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]


def _io(path, kind, x):
    return {path: {kind: x}}


@pytest.mark.parametrize("name", ["at", "sp", "pkt", "rkd_dist", "rkd_angle", "hcl"])
def test_feature_losses_in_float64_equal_torchdistill(name, monkeypatch):
    fs, ft = _feats((6, 5, 4, 4), (6, 7, 4, 4))
    es, et = _feats((6, 12), (6, 20), seed=4)
    if name == "at":
        crit = get_mid_level_loss({"key": "ATLoss", "kwargs": {"mode": "code", "at_pairs": {"p": {
            "student": {"io": "output", "path": "s"}, "teacher": {"io": "output", "path": "t"}, "weight": 1}}}})
        ours, theirs = (lambda a, b: at_loss(a, b, 2.0)), (lambda a, b: crit(_io("s", "output", a),
                                                                           _io("t", "output", b)))
        args = (fs, ft)
    elif name == "sp":
        torchdistill_sp_rows_in_l2(monkeypatch)
        crit = get_mid_level_loss({"key": "SPKDLoss", "kwargs": {"student_output_path": "s",
                                                                "teacher_output_path": "t", "reduction": "batchmean"}})
        ours, theirs, args = sp_loss, (lambda a, b: crit(_io("s", "output", a), _io("t", "output", b))), (fs, ft)
    elif name == "pkt":
        crit = get_mid_level_loss({"key": "PKTLoss", "kwargs": {**pair("s", "t", "input"), "eps": 1e-7}})
        ours = lambda a, b: pkt_loss(a, b, 1e-7)
        theirs, args = (lambda a, b: crit(_io("s", "input", a), _io("t", "input", b))), (es, et)
    elif name.startswith("rkd"):
        dist = name == "rkd_dist"
        crit = get_mid_level_loss({"key": "RKDLoss", "kwargs": {
            "student_output_path": "s", "teacher_output_path": "t", "dist_factor": 1.0 if dist else 0.0,
            "angle_factor": 0.0 if dist else 1.0, "reduction": "mean"}})
        ours = lambda a, b: rkd_losses(a, b)[0 if dist else 1]
        theirs, args = (lambda a, b: crit(_io("s", "output", a), _io("t", "output", b))), (es, et)
    else:  # ReviewKD's hierarchical context loss of one level (8 x 8: the 4, 2 and 1 pyramid levels)
        a, b = _feats((4, 6, 8, 8), (4, 6, 8, 8), seed=5)
        crit = get_mid_level_loss({"key": "HierarchicalContextLoss", "kwargs": {
            **pair("s", "t"), "reduction": "mean", "output_sizes": [4, 2, 1]}})
        ours = lambda s, t: hcl_loss([s], [t])
        theirs = lambda s, t: crit(_io("s", "output", (s, None)), _io("t", "output", t))
        args = (a, b)
    v_ours, g_ours = _grads(ours, *args)
    v_theirs, g_theirs = _grads(theirs, *args)
    assert v_ours.dtype == torch.float64 and v_ours.item() == pytest.approx(v_theirs.item(), rel=1e-5)
    assert_rel(g_ours[0], g_theirs[0], what=f"{name}: gradient of the student's input")


def test_dist_pearson_differs_from_torchdistill_only_by_where_eps_goes():
    """kdlab (the official DIST code): <a, b> / (|a||b| + 1e-8); torchdistill (torch's cosine_similarity):
    <a, b> / (max(|a|, 1e-8) max(|b|, 1e-8)). So kdlab's correlation is torchdistill's times |a||b| / (|a||b| +
    1e-8), per row (inter) and per column (intra) of the centred predictions: asserted here in float64, then the
    two losses agree to 1e-5 when no centred norm is tiny."""
    zs, zt = _feats((8, 10), (8, 10), seed=6)
    tau = 4.0
    inter, intra = dist_terms(zs, zt, tau)
    p_s, p_t = F.softmax(zs / tau, dim=1), F.softmax(zt / tau, dim=1)
    for ours, a, b in ((inter, p_s, p_t), (intra, p_s.t(), p_t.t())):
        r = DISTLoss.pearson_correlation(a, b, 1e-8)  # torchdistill's
        na, nb = (a - a.mean(1, keepdim=True)).norm(dim=1), (b - b.mean(1, keepdim=True)).norm(dim=1)
        expected = 1.0 - (r * (na * nb) / (na * nb + 1e-8)).mean()
        assert ours.item() == pytest.approx(expected.item(), rel=1e-12)
        assert (na * nb).min().item() > 1e-4  # so the eps terms move the loss by < 1e-4 relative: within 1e-5 here
    crit = get_mid_level_loss({"key": "DISTLoss", "kwargs": {**pair(".", "."), "beta": 1.0, "gamma": 1.0,
                                                             "tau": tau}})
    theirs = crit({".": {"output": zs}}, {".": {"output": zt}})
    assert (tau ** 2 * (inter + intra)).item() == pytest.approx(theirs.item(), rel=1e-5)


def test_sp_torchdistill_normalizes_rows_in_l1():
    """torchdistill 1.1.5's SPKDLoss as released: ``normalize(G, 1)`` is ``F.normalize(G, p=1)`` (rows to unit L1
    norm), so its loss is ||G_s / |G_s|_1 - G_t / |G_t|_1||^2 / b^2 (rows), not the SP paper's L2 rows (kdlab's)."""
    fs, ft = _feats((6, 5, 4, 4), (6, 7, 4, 4))
    crit = get_mid_level_loss({"key": "SPKDLoss", "kwargs": {"student_output_path": "s", "teacher_output_path": "t",
                                                            "reduction": "batchmean"}})

    def rows(f, p):
        a = f.flatten(1)
        g = a @ a.t()
        return g / g.norm(p=p, dim=1, keepdim=True)

    theirs = crit(_io("s", "output", fs), _io("t", "output", ft)).item()
    assert theirs == pytest.approx(((rows(fs, 1) - rows(ft, 1)) ** 2).sum().item() / 36, rel=1e-12)
    assert sp_loss(fs, ft).item() == pytest.approx(((rows(fs, 2) - rows(ft, 2)) ** 2).sum().item() / 36, rel=1e-12)
    assert abs(sp_loss(fs, ft).item() - theirs) > 1e-3 * theirs  # the two definitions do differ
