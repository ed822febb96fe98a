"""Every recipe in conf/experiment/ composes, validates and builds its stages (no data, nothing trained).

The test enumerates the directory (and a study's folder of parts, ``conf/experiment/<study>/``), so a new
``conf/experiment/<name>.yaml`` is covered without editing this file. For each recipe: ``+experiment=<name>``
composes and resolves as the CLI composes it,
``kdlab.pipeline.checks.validate_config`` accepts it (everything checkable without data), and the stage list is
well-formed: registered zoo models, sources that are earlier stages, the student last (unless the recipe
has one stage), and the data set the file name promises (``*_fashion_mnist`` -> fashion_mnist,
``*_cifar100`` -> cifar100, ``*_cifar10_*`` -> cifar10, ...).
"""
from __future__ import annotations

import re

import pytest

from kdlab.config_tree import experiment_names
from kdlab.models import list_models
from kdlab.pipeline import build_stages
from kdlab.pipeline.checks import validate_config

RECIPES = experiment_names()
DATASETS = ("cifar10", "cifar100", "fashion_mnist", "imagefolder", "synthetic")


def named_dataset(recipe: str) -> str | None:
    """The data set a recipe's file name names as a whole ``_``-separated word (cifar10 is not cifar100)."""
    named = [d for d in DATASETS if re.search(rf"(^|_){d}(_|$)", recipe)]
    assert len(named) <= 1, f"{recipe}: the name names several data sets: {named}"
    return named[0] if named else None


def test_the_recipe_directory_is_enumerated():
    assert len(RECIPES) >= 20, RECIPES  # conf/experiment holds the recipes (the glob did not miss them)
    assert named_dataset("dgkd_cifar10_resnet") == "cifar10" and named_dataset("kd_cifar100") == "cifar100"
    assert named_dataset("feed_alone_fashion_mnist") == "fashion_mnist" and named_dataset("my_recipe") is None


@pytest.mark.parametrize("path", RECIPES)
def test_recipe_composes_validates_and_builds(path, compose):
    name = path.rsplit("/", 1)[-1]  # a study's part: capacity_gap/gap_kd_fashion_mnist
    cfg = compose(f"+experiment={path}")
    assert cfg["experiment_name"] == name
    assert isinstance(cfg["method"], str) and cfg["method"], cfg.get("method")

    specs = validate_config(cfg)
    assert [s.name for s in build_stages(cfg)] == [s.name for s in specs]
    names = [s.name for s in specs]
    assert len(set(names)) == len(names), names
    assert names[-1] == "student" or len(names) == 1, names  # the recipe's result: its last stage
    zoo = set(list_models())
    for i, spec in enumerate(specs):
        # zoo models, or library models (timm/<name>, torchvision/<name>: built by their library)
        assert spec.arch in zoo or "/" in spec.arch, \
            f"{name}: stage {spec.name} uses {spec.arch!r}, not a registered zoo model"
        assert set(spec.sources) <= set(names[:i]), (spec.name, spec.sources)  # sources are trained before
        assert spec.max_epochs >= 1, (spec.name, spec.max_epochs)
    if len(specs) > 1:
        assert specs[-1].sources, f"{name}: the student of a multi-stage recipe learns from no source"

    data = cfg["data"]["name"]
    assert data in DATASETS, data
    expected = named_dataset(name)
    if expected is not None:
        assert data == expected, f"{name}: data {data!r}, the file name says {expected!r}"
