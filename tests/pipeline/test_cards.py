"""Reference cards (cards/<recipe>.yaml, kdlab/pipeline/cards.py): every paper recipe has one, and under
protocol=reference every field of it (for every named pair) resolves to the card's value, or to the value the card
names as a known deviation, with its reason. Where kdlab's default protocol differs from the reference run, the
difference is the protocol's own (split, precision, kept checkpoint) or the card says why."""
from __future__ import annotations

from functools import cache

import pytest

from kdlab import config_tree
from kdlab.errors import ConfigError
from kdlab.pipeline import build_stages
from kdlab.pipeline.cards import (
    MISSING,
    check_card,
    load_card,
    lr_schedule,
    recipes_with_cards,
    reference_report,
    resolve,
    same,
)
from tests.helpers.config import compose_config

#: fields the protocols themselves set: the default protocol differs there by design (docs/pipelines.md#protocols)
PROTOCOL_FIELDS = ("data.val_split", "trainer.precision")


def paper_recipes() -> list[str]:
    """Every paper-scale recipe: *_cifar10*, *_cifar100*, *_imagenet in conf/experiment/."""
    exp = config_tree.conf_path("experiment")
    names = {p.stem for pattern in ("*_cifar10*.yaml", "*_imagenet.yaml") for p in exp.glob(pattern)}
    return sorted(names)


def runs() -> list[tuple[str, str | None]]:
    """(recipe, pair) for every card and each of its named pairs."""
    out = []
    for recipe in recipes_with_cards():
        pairs = load_card(recipe).get("pairs") or {None: None}
        out += [(recipe, pair) for pair in pairs]
    return out


@cache
def composed(recipe: str, pair: str | None, protocol: str) -> dict:
    return compose_config(f"+experiment={recipe}", f"protocol={protocol}", *([f"pair={pair}"] if pair else []))


def test_every_paper_recipe_has_a_card_and_every_card_a_recipe():
    assert recipes_with_cards() == paper_recipes()


@pytest.mark.parametrize(("recipe", "pair"), runs(), ids=[f"{r}[{p}]" if p else r for r, p in runs()])
def test_the_recipe_under_protocol_reference_is_its_card(recipe, pair):
    card = load_card(recipe)
    cfg = composed(recipe, pair, "reference")
    checks = check_card(card, cfg, build_stages(cfg))
    assert checks, f"cards/{recipe}.yaml checks no field"
    bad = [f"{c.field}: card {c.expected!r}, recipe {c.actual!r}" for c in checks if not c.ok]
    assert not bad, "\n".join(bad)
    report = reference_report(cfg, build_stages(cfg))
    assert report["changed"] == [] and report["as_card"] == report["fields"] == len(checks)


@pytest.mark.parametrize("recipe", recipes_with_cards())
def test_a_card_names_its_recipes_pairs_and_cites_every_value(recipe):
    card = load_card(recipe)
    cfg = composed(recipe, None, "reference")
    assert set(card.get("pairs") or {}) == set(cfg.get("pairs") or {}), "the card's pairs are the recipe's"
    for entry in card["published"]:
        assert entry.get("source"), f"a published number without its source: {entry}"
    assert card["code"] or card["no_public_code"]


@pytest.mark.parametrize("recipe", recipes_with_cards())
def test_the_default_protocol_differs_only_where_the_card_says_why(recipe):
    """(The default pair: a pair sets the same values under both protocols.)"""
    card, pair = load_card(recipe), None
    held, ref = composed(recipe, pair, "heldout"), composed(recipe, pair, "reference")
    held_specs, ref_specs = build_stages(held), build_stages(ref)
    unexplained = []
    for check in check_card(card, ref, ref_specs):
        value = resolve(held, held_specs, check.field)
        if same(value, check.actual) or check.field in PROTOCOL_FIELDS or check.field.endswith(".keep"):
            continue
        if check.field not in (card.get("heldout") or {}):
            unexplained.append(f"{check.field}: heldout {value!r}, reference {check.actual!r}")
    assert not unexplained, "\n".join(unexplained)


def test_a_field_that_names_no_config_key_is_an_error(tmp_path, monkeypatch):
    path = tmp_path / "cards" / "kd_cifar100.yaml"
    path.parent.mkdir()
    text = config_tree.card_path("kd_cifar100").read_text()
    path.write_text(text.replace("  data.batch_size:", "  data.batch_sise:", 1))
    monkeypatch.setattr(config_tree, "CARDS_DIR", path.parent)
    cfg = composed("kd_cifar100", None, "reference")
    with pytest.raises(ConfigError, match=r"cards/kd_cifar100.yaml: field 'data.batch_sise' names no config key"):
        check_card(load_card("kd_cifar100"), cfg, build_stages(cfg))
    path.write_text(text.replace("  stages.student.optimizer.lr:", "  stages.pupil.optimizer.lr:", 1))
    with pytest.raises(ConfigError, match=r"stages.pupil.optimizer.lr' names no config key.*stages: teacher, student"):
        check_card(load_card("kd_cifar100"), cfg, build_stages(cfg))


@pytest.mark.parametrize(("edit", "message"), [
    (lambda t: t.replace("reported: {value: \"test_acc_best_on_test\"", "reported: {value: \"test_acc_best\""),
     "reported 'test_acc_best' is no field protocol=reference reports"),
    (lambda t: t.replace("source:", "sauce:", 1).replace("reported: {value", "reported: {value", 1),
     "needs a value and its source"),
    (lambda t: t.replace("recipe: kd_cifar100", "recipe: kd_cifar10"), "recipe 'kd_cifar10' is not 'kd_cifar100'"),
])
def test_a_malformed_card_is_one_config_error(tmp_path, monkeypatch, edit, message):
    path = tmp_path / "kd_cifar100.yaml"
    path.write_text(edit(config_tree.card_path("kd_cifar100").read_text()))
    monkeypatch.setattr(config_tree, "CARDS_DIR", tmp_path)
    with pytest.raises(ConfigError, match=message):
        load_card("kd_cifar100")


def test_a_recipe_without_a_card_is_refused_under_protocol_reference():
    cfg = compose_config("+experiment=kd_fashion_mnist", "protocol=reference")
    with pytest.raises(ConfigError, match="experiment 'kd_fashion_mnist' has no reference card"):
        reference_report(cfg, build_stages(cfg))
    assert reference_report(compose_config("+experiment=kd_fashion_mnist"), []) is None  # heldout: no card needed


def test_lr_schedule_is_the_epochs_the_lr_changes_at():
    """Computed by stepping the stage's own optimizer and scheduler; checked here against the schedules written out
    by hand: 240 epochs at milestones 0.625 / 0.75 / 0.875 decay after 150, 180, 210 epochs."""
    specs = {s.name: s for s in build_stages(composed("dkd_cifar100", None, "reference"))}
    got = lr_schedule(specs["student"])
    assert list(got) == [0, 150, 180, 210]
    assert [round(v, 12) for v in got.values()] == [0.05, 0.005, 0.0005, 0.00005]
    specs = {s.name: s for s in build_stages(composed("takd_cifar100_resnet", None, "reference"))}
    assert lr_schedule(specs["ta1"]) == pytest.approx({0: 0.01, 120: 0.001})
    specs = {s.name: s for s in build_stages(composed("dafl_cifar10", None, "reference"))}
    assert list(lr_schedule(specs["student"])) == [0, 800, 1600]


def test_resolve_reads_config_paths_stage_values_and_the_normalization():
    cfg = composed("dkd_cifar100", "resnet32x4-shufflev2", "reference")
    specs = build_stages(cfg)
    assert resolve(cfg, specs, "data.batch_size") == 64
    assert resolve(cfg, specs, "stages.student.arch") == "shufflev2"
    assert resolve(cfg, specs, "stages.student.optimizer.lr") == 0.01
    assert resolve(cfg, specs, "stages.teacher.optimizer.lr") == 0.05  # the student's lr alone
    assert resolve(cfg, specs, "stages.teacher.keep") == "last"
    assert resolve(cfg, specs, "normalization.std") == [0.2673, 0.2564, 0.2762]
    assert resolve(cfg, specs, "stages.nobody.arch") is MISSING
    assert resolve(cfg, specs, "data.nope") is MISSING


def test_same_compares_numbers_to_rounding_and_never_bools_as_numbers():
    assert same(240, 240.0) and same({0: 0.05, 150: 0.005}, {"0": 0.05, "150": 0.005000000000000001})
    assert not same(True, 1) and not same(0, False) and not same([1, 2], [1, 2, 3]) and same(None, None)


def test_docs_show_every_card_as_it_is():
    """docs/experiments.md's card tables are `python -m kdlab.cards --docs` of the cards as they are."""
    from kdlab.cards import BEGIN, DOCS, END, docs_markdown

    shown = DOCS.read_text(encoding="utf-8").split(BEGIN, 1)[1].split(END, 1)[0]
    assert shown == "\n" + docs_markdown(lambda r, p, proto, over: composed(r, p, proto)), \
        "docs/experiments.md is stale: python -m kdlab.cards --docs"


def test_the_reference_command_sets_the_authors_seeds():
    from kdlab.cards import command

    cmd = command(load_card("takd_cifar100_resnet"))
    assert cmd.endswith("protocol=reference ++pipeline.per_stage.ta1.seed=55 ++pipeline.per_stage.student.seed=31")
    cfg = compose_config(*cmd.split()[3:])  # the command composes, and sets those seeds
    assert {s.name: s.seed for s in build_stages(cfg)} == {"teacher": 0, "ta1": 55, "student": 31}
    assert command(load_card("dgkd_cifar100")).endswith("protocol=reference seed=20")
    assert command(load_card("dkd_cifar100")).endswith("protocol=reference")


def test_the_cards_command_line(capsys):
    from kdlab.cards import main

    assert main(["takd_cifar100_resnet", "--command"]) == 0
    assert capsys.readouterr().out.strip() == ("python -m kdlab +experiment=takd_cifar100_resnet protocol=reference "
                                               "++pipeline.per_stage.ta1.seed=55 ++pipeline.per_stage.student.seed=31")
    assert main([]) == 0
    out = capsys.readouterr().out
    assert len(out.strip().splitlines()) == len(recipes_with_cards()) and "dkd_cifar100" in out
    assert main(["kd_fashion_mnist"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kdlab.cards: error: experiment 'kd_fashion_mnist' has no reference card")
