"""DistillModule: frozen sources (eval mode, no gradients), dropped sources not run, cached == live."""
from __future__ import annotations

import copy
import functools

import pytest
import pytorch_lightning as pl
import torch

from kdlab.distill import SourceSelector
from kdlab.distill.base import StrategyContext, build_strategy
from kdlab.models import build_model
from kdlab.modules import DistillModule, SourceBank, SupervisedModule


@pytest.fixture(scope="module")
def dm(synthetic_dm):
    return synthetic_dm(n_train=320, n_test=64, augment="none", batch_size=32, seed=0)


def sources(n=3):
    torch.manual_seed(0)
    return {name: build_model(arch, num_classes=10, in_channels=1, input_size=28)
            for name, arch in zip(["teacher", "ta1", "ta2"][:n], ["plain4", "plain4", "plain2"])}


def module(srcs, selector=None, cache=None, strategy="dgkd"):
    torch.manual_seed(1)
    student = build_model("plain2", num_classes=10, in_channels=1, input_size=28)
    strat = build_strategy({"strategy": strategy, "temperature": 4.0, "lam": 0.7},
                           StrategyContext("student", list(srcs), 10))
    return DistillModule(student, 10, functools.partial(torch.optim.SGD, lr=0.05), None,
                         sources=SourceBank(srcs, cache=cache), strategy=strat, selector=selector, max_epochs=1,
                         stage="student")


def fit(mod, dm, batches=6):
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=batches, limit_val_batches=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu", num_sanity_val_steps=0)
    trainer.fit(mod, datamodule=dm)
    return trainer


def test_sources_get_no_gradient_and_stay_in_eval_mode(dm):
    srcs = sources()
    before = {n: copy.deepcopy(m.state_dict()) for n, m in srcs.items()}
    mod = module(srcs)
    fit(mod, dm)
    for name, m in srcs.items():
        assert not m.training and all(not sub.training for sub in m.modules())
        assert all(p.grad is None and not p.requires_grad for p in m.parameters())
        for k, v in m.state_dict().items():  # BN running stats did not move either
            assert torch.equal(v, before[name][k]), (name, k)
    # sources are not part of the student's checkpoint
    assert not any(k.startswith("bank") or "teacher" in k for k in mod.state_dict())
    # the student did learn something (its weights changed)
    assert mod.bank.forward_calls["teacher"] == 6


def test_dropped_sources_are_not_run(dm):
    srcs = sources()
    calls = {n: 0 for n in srcs}
    for name, m in srcs.items():
        m.register_forward_hook(lambda *_, n=name: calls.__setitem__(n, calls[n] + 1))
    sel = SourceSelector(list(srcs), mode="drop_k", k=1, seed=5, stage="student")
    mod = module(srcs, selector=sel)
    fit(mod, dm, batches=8)
    expected = {n: sum(sel.keep_mask(step)[i] for step in range(8)) for i, n in enumerate(srcs)}
    assert calls == expected
    assert sum(calls.values()) == 8 * 2  # three sources, one dropped per batch


def test_cached_and_live_sources_give_the_same_losses(dm):
    srcs = sources(2)
    x, y, idx = next(iter(dm.train_dataloader()))
    with torch.no_grad():
        full = {}
        for name, m in srcs.items():
            m.eval()
            outs = torch.cat([m(xb) for xb, _, _ in dm.train_eval_dataloader()])
            full[name] = {"logits": outs.half(), "features": {}}
    live = module(srcs)
    cached = module(srcs, cache=full)
    _, t_live, w_live = live.compute_terms(x, y, idx)
    _, t_cached, w_cached = cached.compute_terms(x, y, idx)
    assert w_live == w_cached
    for k in t_live:
        assert t_cached[k].item() == pytest.approx(t_live[k].item(), rel=2e-3, abs=1e-4), k
    assert cached.bank.forward_calls == {n: 0 for n in srcs}  # the cache answered; no forward pass
    assert live.bank.forward_calls == {n: 1 for n in srcs}


def test_sources_in_channels_last_give_the_default_formats_outputs(dm):
    """speed.sources_channels_last: frozen sources run in channels_last (a faster inference on CPUs) and
    hand the strategies the same logits and tapped features, in the default memory format."""
    from kdlab.pipeline.runtime import inference_format, sources_channels_last

    x = next(iter(dm.train_dataloader()))[0]
    taps = ["stage1", "prepool"]
    plain = SourceBank(sources(2), taps=taps).outputs(["teacher", "ta1"], x, None, train=False)
    cl_bank = SourceBank(sources(2), taps=taps, channels_last=True).to(torch.device("cpu"))
    conv = next(m for m in cl_bank.models["teacher"].modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    fast = cl_bank.outputs(["teacher", "ta1"], x, None, train=False)
    for name in ("teacher", "ta1"):
        torch.testing.assert_close(fast[name].logits, plain[name].logits, rtol=1e-5, atol=1e-5)
        for tap in taps:
            assert fast[name].features[tap].is_contiguous()
            torch.testing.assert_close(fast[name].features[tap], plain[name].features[tap], rtol=1e-5, atol=1e-5)
    # the rule: a CPU always under auto; CUDA only under mixed precision; explicit values win
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert sources_channels_last({}, cpu) is True
    assert sources_channels_last({"speed": {"sources_channels_last": False}}, cpu) is False
    assert sources_channels_last({"trainer": {"precision": "32-true"}}, cuda) is False
    assert sources_channels_last({"trainer": {"precision": "bf16-mixed"}}, cuda) is True
    assert sources_channels_last({"speed": {"sources_channels_last": "true"}, "trainer": {"precision": "32-true"}},
                                 cuda) is True
    # a model evaluated in channels_last goes back to the default format (what the store saves)
    model = sources(1)["teacher"]
    with inference_format(model, True) as fmt:
        assert fmt(x).is_contiguous(memory_format=torch.channels_last)
    assert all(p.is_contiguous() for p in model.parameters())


def test_supervised_module_learns(synthetic_dm):
    dm = synthetic_dm(n_train=1200, n_test=200, augment="none", batch_size=32, seed=0)
    torch.manual_seed(0)
    mod = SupervisedModule(build_model("plain4", num_classes=10, in_channels=1, input_size=28), 10,
                           functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9), None, max_epochs=3)
    trainer = pl.Trainer(max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=0)
    trainer.fit(mod, datamodule=dm)
    assert len(mod.val_curve) == 3
    assert max(mod.val_curve) > 0.5  # 10 classes: chance is 0.1


def test_auto_precision_is_bf16_on_a_bf16_gpu_and_fp32_on_every_cpu(monkeypatch):
    """auto: bf16-mixed on a CUDA GPU with bf16, fp32 on any CPU (whatever bf16 hardware it has: one configuration,
    the same numbers, on every x86 CPU), fp32 on a GPU without bf16; an explicit precision wins."""
    from kdlab.pipeline import runtime

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert runtime.resolve_precision("bf16-mixed", cpu) == "bf16-mixed"  # explicit wins
    assert runtime.resolve_precision("auto", cpu) == "32-true"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert runtime.resolve_precision("auto", cuda) == "bf16-mixed"
    assert runtime.resolve_precision("auto", cpu) == "32-true"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert runtime.resolve_precision("auto", cuda) == "32-true"
