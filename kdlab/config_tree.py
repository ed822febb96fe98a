"""Where kdlab's checkout, its Hydra config tree (``conf/``), its studies (``studies/``) and the paper
recipes' reference cards (``cards/``) are: the one module that knows.

``conf/`` is what ``python -m kdlab`` composes, and only that: every file in a group folder is a choice
(``pipeline=dense``, ``+experiment=dgkd_cifar100``; a study's own parts in a folder of their own,
``+experiment=capacity_gap/gap_kd_fashion_mnist``); the keys every pipeline shares are
``conf/pipeline_base.yaml``, at the root, where no group can select them. ``studies/`` holds the definitions
``python -m kdlab.study`` reads (kdlab/study/config.py), and ``cards/`` the reference cards
(kdlab/pipeline/cards.py); neither is a kdlab config.

It sits at the bottom layer, beside ``errors`` and ``registry``, because the data layer reads the tree too
(``conf/data/*.yaml`` holds every data set's defaults), and nothing below the command line may import it.
"""
from __future__ import annotations

from pathlib import Path

#: the checkout: the folder that holds ``kdlab/`` and ``conf/``
ROOT = Path(__file__).resolve().parents[1]
#: the config tree ``python -m kdlab`` composes
CONF_DIR = ROOT / "conf"
#: the studies ``python -m kdlab.study`` runs (``studies/<name>.yaml``)
STUDY_DIR = ROOT / "studies"
#: the reference cards of the paper recipes (``cards/<recipe>.yaml``, kdlab/pipeline/cards.py): beside ``conf/``,
#: not in it, so that no card is a config Hydra could select
CARDS_DIR = ROOT / "cards"


def conf_path(*parts: str) -> Path:
    """A path inside the config tree, e.g. ``conf_path("experiment", "kd_fashion_mnist.yaml")``."""
    return CONF_DIR.joinpath(*parts)


def experiment_names() -> list[str]:
    """Every recipe ``+experiment=`` selects: its path under ``conf/experiment/`` without ``.yaml``."""
    folder = CONF_DIR / "experiment"
    return sorted(p.relative_to(folder).with_suffix("").as_posix() for p in folder.rglob("*.yaml"))
def card_path(recipe: str) -> Path:
    """The reference card of a recipe (``conf/experiment/<recipe>.yaml``): ``cards/<recipe>.yaml``."""
    return CARDS_DIR / f"{recipe}.yaml"
