"""A method's keys are its own: a key set under ``distill`` (or for one stage) that the strategy it applies to
does not read is one line naming the key probably meant, before any data loads (kdlab.distill.base
``Strategy.accepted_keys`` / ``Strategy.unread``, kdlab.pipeline.checks ``validate_distill_keys``; the command
line, per-stage and sweep paths through the real CLI are in tests/cli/test_bad_inputs.py and
tests/cli/test_method_keys.py). Every strategy's own keys are accepted, every recipe, study sweep and preset
still composes and passes the check."""
from __future__ import annotations

import copy
import functools
import itertools

import pytest

from kdlab.distill import STRATEGIES
from kdlab.errors import ConfigError
from kdlab.pipeline.checks import validate_config, validate_distill_keys
from kdlab.pipeline.spec import build_stages
from tests.helpers.cli import ROOT
from tests.helpers.config import compose_config
from tests.helpers.methods import docs_hooks, learns_from_sources

NAMES = STRATEGIES.names()
CHOICE = docs_hooks().choices()  # strategy -> its distill= choice (ce: none)
#: every key some strategy reads
EVERY_KEY = sorted(set(itertools.chain.from_iterable(STRATEGIES.get(n).accepted_keys() for n in NAMES)))
#: (strategy, a key another strategy reads and it does not)
FOREIGN = [(n, k) for n in NAMES for k in EVERY_KEY if k not in STRATEGIES.get(n).accepted_keys()]
#: the key meant, for a few of them, as a user would expect it (the issue's examples and each method's hints)
MEANT = {
    ("dkd", "temperature"): "dkd.temperature", ("dist", "temperature"): "dist.temperature",
    ("dkd", "logit_stand"): "dkd.logit_stand", ("dkd", "ce_weight"): "dkd.ce_weight", ("dkd", "lam"): None,
    ("dist", "lam"): None, ("rkd", "lam"): None, ("at", "lam"): "at.feat_weight",
    ("fitnet", "lam"): "fitnet.feat_weight", ("pkt", "lam"): "pkt.feat_weight", ("sp", "lam"): "sp.gamma",
    ("reviewkd", "lam"): "reviewkd.feat_weight", ("crd", "lam"): "crd.kd_weight", ("speq", "temperature"): "speq.tau",
    ("speq", "lam"): "speq.weight", ("at", "temperature"): None, ("dafl", "temperature"): None,
    ("ce", "temperature"): None, ("kd", "ce_weight"): None, ("feed", "logit_stand"): None,
}


def pipeline_for(name: str) -> list[str]:
    """A pipeline the strategy runs on: DAFL's data-free one, one stage for SPEQ and labels only, else the default
    dense chain."""
    cls = STRATEGIES.get(name)
    if cls.data_free:
        return ["pipeline=data_free"]
    return [] if learns_from_sources(cls) else ["pipeline=single"]


def check(*overrides: str) -> None:
    """The key check of ``python -m kdlab <overrides>`` (composed, its stages built, no data)."""
    cfg = compose_config(*overrides)
    validate_distill_keys(cfg, build_stages(cfg))


@functools.cache
def _composed(name: str) -> tuple[dict, list]:
    cfg = compose_config(f"distill={CHOICE[name]}", *pipeline_for(name))
    return cfg, build_stages(cfg)


def with_key(name: str, key: str, value) -> tuple[dict, list]:
    """The composed config of ``distill=<name>`` (on a pipeline it runs on) with ``distill.<key>`` set (as
    ``+distill.<key>=...`` would), and its stages."""
    cfg, specs = _composed(name)
    cfg = copy.deepcopy(cfg)
    cfg["distill"][key] = value
    return cfg, specs


def rejected(*overrides: str) -> str:
    with pytest.raises(ConfigError) as e:
        check(*overrides)
    return str(e.value)


def expected_meant(name: str, key: str) -> str | None:
    """The rule: the strategy's hint for the key, else the key of that name in one of its blocks."""
    cls = STRATEGIES.get(name)
    if key in cls.hints:
        return cls.hints[key]
    return next((f"{b}.{key}" for b, d in cls.options.items() if isinstance(d, dict) and key in d), None)


@pytest.mark.parametrize("name", NAMES)
def test_its_own_keys_are_accepted(name):
    """The method's YAML holds exactly the keys it reads (tests/distill/test_every_method.py test_one_yaml), so
    its composed config passes, as does each of its keys set again."""
    cfg, specs = _composed(name)
    assert sorted(cfg["distill"]) == sorted(STRATEGIES.get(name).accepted_keys())
    validate_distill_keys(cfg, specs)
    for key in STRATEGIES.get(name).accepted_keys():
        validate_distill_keys(*with_key(name, key, copy.deepcopy(cfg["distill"][key])))


@pytest.mark.parametrize("name", NAMES)
def test_another_methods_key_is_rejected_naming_the_key_meant(name):
    foreign = [k for n, k in FOREIGN if n == name]
    assert foreign
    for key in foreign:
        meant = expected_meant(name, key)
        with pytest.raises(ConfigError) as e:
            validate_distill_keys(*with_key(name, key, 1))
        assert str(e.value) == f"distill.{key} is not read by {name}" + (f"; did you mean distill.{meant}?"
                                                                          if meant else "")


def test_the_key_meant_is_the_one_a_user_expects():
    assert len(FOREIGN) > 100 and set(MEANT) <= set(FOREIGN)
    for (name, key), meant in MEANT.items():
        assert STRATEGIES.get(name).meant(key) == meant, (name, key)


@pytest.mark.parametrize("name", NAMES)
def test_a_hint_names_a_key_of_the_method_for_a_key_it_does_not_read(name):
    cls = STRATEGIES.get(name)
    for key, target in cls.hints.items():
        block, _, leaf = target.rpartition(".")
        assert key not in cls.accepted_keys() and leaf in (cls.options[block] if block else cls.options), (key, target)


def test_a_typo_is_matched_to_the_methods_own_key():
    assert STRATEGIES.get("kd").unread("temprature") == "distill.temprature is not read by kd; did you mean " \
                                                         "distill.temperature?"
    assert STRATEGIES.get("dkd").meant("alpah") == "dkd.alpha"
    assert STRATEGIES.get("dkd").meant("zzz") is None
    assert rejected("distill=dkd", "+distill.alpah=2") == "distill.alpah is not read by dkd; did you mean " \
                                                           "distill.dkd.alpha?"


def test_the_issue_example_in_every_form():
    line = "distill.temperature is not read by dkd; did you mean distill.dkd.temperature?"
    assert rejected("distill=dkd", "+distill.temperature=2") == line
    assert rejected("distill=dkd", "++distill.temperature=2") == line
    with pytest.raises(ConfigError, match="^" + line.replace(".", r"\.").replace("?", r"\?") + "$"):
        validate_config(compose_config("distill=dkd", "+distill.temperature=2"))  # what preflight runs


# -- one stage's settings ---------------------------------------------------------------------------------
def test_a_stage_key_its_strategy_does_not_read():
    assert rejected("distill=dkd", "+pipeline.per_stage.student.distill.temperature=2") == (
        "pipeline.per_stage.student.distill.temperature is not read by dkd; did you mean "
        "pipeline.per_stage.student.distill.dkd.temperature?")
    # the teacher has no sources: it learns from the labels (ce), whatever the method
    assert rejected("distill=kd", "+pipeline.per_stage.teacher.distill.temperature=2") == (
        "pipeline.per_stage.teacher.distill.temperature is not read by ce (stage 'teacher' has no sources: it "
        "learns from the labels)")
    check("distill=kd", "+pipeline.per_stage.teacher.distill.label_smoothing=0.1")  # ce reads it
    check("distill=dkd", "+pipeline.per_stage.student.distill.dkd.alpha=2")


def test_a_key_read_by_one_stage_of_its_own_strategy_is_accepted():
    # dkd for the TA, kd for the student: the student reads distill.temperature
    check("distill=dkd", "+distill.temperature=2", "+pipeline.per_stage.student.distill.strategy=kd")
    assert "not read by dkd" in rejected("distill=dkd", "+distill.temperature=2",
                                         "+pipeline.per_stage.ta1.distill.strategy=dkd")


def test_a_custom_stage_key():
    cfg = compose_config("distill=dkd")
    cfg["pipeline"].update(topology="custom", stages=[
        {"name": "t", "model": "plain4", "sources": []},
        {"name": "s", "model": "plain2", "sources": ["t"], "distill": {"temperature": 2.0}}])
    with pytest.raises(ConfigError, match=r"^pipeline\.stages\[1\]\.distill\.temperature is not read by dkd; did "
                                          r"you mean pipeline\.stages\[1\]\.distill\.dkd\.temperature\?$"):
        validate_distill_keys(cfg, build_stages(cfg))


# -- keys a strategy reads only under a setting -----------------------------------------------------------
def test_a_key_read_only_under_a_setting():
    assert rejected("distill=feed", "distill.temperature=2") == \
        "distill.temperature=2 is not read: feed reads it only with distill.feed.logit_kd=true"
    check("distill=feed", "distill.temperature=2", "distill.feed.logit_kd=true")
    assert rejected("distill=crd", "distill.kl_reduction=mean_legacy") == \
        "distill.kl_reduction='mean_legacy' is not read: crd reads it only with distill.crd.kd_weight > 0"
    check("distill=crd", "distill.temperature=2", "distill.crd.kd_weight=1")
    # FEED's logit KD for the student alone: the student reads the temperature
    check("distill=feed", "distill.temperature=2", "+pipeline.per_stage.student.distill.feed.logit_kd=true")
    assert "only with pipeline.per_stage.student.distill.feed.logit_kd=true" in rejected(
        "distill=feed", "+pipeline.per_stage.student.distill.temperature=2")


def test_a_key_no_stage_reads():
    assert rejected("pipeline=single", "distill=kd", "distill.temperature=2") == (
        "distill.temperature=2 is not read: no stage of this pipeline reads it (a stage without sources learns "
        "from the labels)")
    assert "distill.logit_stand=True is not read" in rejected("pipeline=single", "distill=kd",
                                                              "distill.logit_stand=true")
    check("pipeline=single")  # the default method's keys at their defaults: nothing is set
    check("pipeline=single", "distill=kd", "distill.label_smoothing=0.1")  # the stage's ce reads it


# -- presets, recipes, studies ----------------------------------------------------------------------------
def test_a_preset_applies_to_every_method():
    """A preset sets no method keys (a method's own file does), so any method goes with it."""
    from omegaconf import OmegaConf

    presets = sorted((ROOT / "conf" / "preset").glob("*.yaml"))
    assert len(presets) >= 3
    for p in presets:
        assert "distill" not in OmegaConf.load(p), f"{p.name} sets method keys"
    check("distill=dkd")  # the default preset of the default data, fashion_mnist_cpu
    check("preset=fashion_mnist_gap", "distill=dkd")
    check("data=synthetic", "distill=at")  # synthetic_cpu


def recipes() -> dict[str, list[str]]:
    """{case: overrides}: every recipe and every study sweep (its first seed), as tests/pipeline/test_stage_keys.py
    composes them."""
    from omegaconf import OmegaConf

    from kdlab.config_tree import STUDY_DIR, experiment_names

    out = {f"experiment={name}": [f"+experiment={name}"] for name in experiment_names()}
    for p in sorted(STUDY_DIR.glob("*.yaml")):
        study = OmegaConf.to_container(OmegaConf.load(p), resolve=True)
        for i, sweep in enumerate(study["sweeps"]):
            extra = [*sweep.get("overrides", []), *study.get("overrides", [])]
            for e in sweep["experiments"]:
                out[f"study={p.stem}/{i}/{e}"] = [f"+experiment={e}", f"seed={study['seeds'][0]}", *extra]
    return out


#: the recipes that switch the method of the recipe whose settings they share, and the study sweep that sets a key
SWITCHERS = ["experiment=dafl_kd_fashion_mnist", "experiment=dafl_kd_cifar100", "experiment=feed_logitkd_fashion_mnist",
             "experiment=feed_alone_fashion_mnist", "experiment=feed_parallel_cifar100"]


@pytest.mark.parametrize("case", SWITCHERS)
def test_recipes_that_share_settings_pass(case):
    validate_config(compose_config(*recipes()[case]))


@pytest.mark.slow
def test_every_recipe_and_study_sweep_passes():
    """Every recipe and study sweep composes and passes the key check (and every check preflight runs)."""
    cases = recipes()
    assert len(cases) > 100 and set(SWITCHERS) <= set(cases)
    for case, overrides in cases.items():
        try:
            validate_config(compose_config(*[o for o in overrides if not o.startswith("logger=")]))
        except ConfigError as e:
            raise AssertionError(f"{case}: {e}") from e
