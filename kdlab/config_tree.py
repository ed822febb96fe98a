"""Where kdlab's checkout, its Hydra config tree (``conf/``) and the paper recipes' reference cards (``cards/``)
are: the one module that knows.

It sits at the bottom layer, beside ``errors`` and ``registry``, because the data layer reads the tree too
(``conf/data/*.yaml`` holds every data set's defaults), and nothing below the command line may import it.
"""
from __future__ import annotations

from pathlib import Path

#: the checkout: the folder that holds ``kdlab/`` and ``conf/``
ROOT = Path(__file__).resolve().parents[1]
#: the config tree ``python -m kdlab`` composes
CONF_DIR = ROOT / "conf"
#: the reference cards of the paper recipes (``cards/<recipe>.yaml``, kdlab/pipeline/cards.py): beside ``conf/``,
#: not in it, so that no card is a config Hydra could select
CARDS_DIR = ROOT / "cards"


def conf_path(*parts: str) -> Path:
    """A path inside the config tree, e.g. ``conf_path("study", "capacity_gap.yaml")``."""
    return CONF_DIR.joinpath(*parts)


def card_path(recipe: str) -> Path:
    """The reference card of a recipe (``conf/experiment/<recipe>.yaml``): ``cards/<recipe>.yaml``."""
    return CARDS_DIR / f"{recipe}.yaml"
