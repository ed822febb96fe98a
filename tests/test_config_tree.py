"""The config tree by kind (kdlab/config_tree.py): conf/ holds what ``python -m kdlab`` composes and every file in
a group folder is a choice that composes; the keys every pipeline shares are not a pipeline; a study's own
parts live in a folder named after it; the studies themselves are outside the Hydra tree."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from kdlab.config_tree import CONF_DIR, STUDY_DIR, experiment_names
from kdlab.errors import ConfigError

#: an option that needs a partner in another group to be a run (the pair is what a user writes)
PARTNERS = {"pipeline=data_free": ["distill=dafl", "pipeline.chain=[plain4,plain2]"],
            "pipeline=feed_parallel": ["distill=feed"], "pipeline=feed_sequential": ["distill=feed"],
            "pipeline=single": ["distill=none"]}


@pytest.fixture(scope="module")
def check():
    from kdlab.cli.hydra_app import register_configs
    from kdlab.cli.main import check_command

    register_configs()
    return lambda *args: check_command(list(args), machine=False)


@pytest.mark.parametrize("group", ["pipeline", "preset", "logger", "hparams_search"])
def test_every_option_of_a_group_is_a_choice_that_composes(group, check, capsys):
    options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
    assert options
    for option in options:
        choice = f"{group}={option}"
        check(choice, *PARTNERS.get(choice, []))
    capsys.readouterr()


@pytest.mark.parametrize(("group", "known"), [("pipeline", "custom, data_free, dense"), ("distill", "at, crd, dafl")])
def test_the_keys_a_group_shares_are_not_one_of_its_options(group, known, check):
    """conf/<group>_base.yaml holds the keys every option of the group starts from; at the root of conf/ it
    is no option (pipeline=base, distill=base are unknown), and no file in the group folder is anything but
    an option (no shared folder inside it)."""
    assert (CONF_DIR / f"{group}_base.yaml").is_file()
    assert not [p for p in (CONF_DIR / group).iterdir() if p.is_dir() or p.stem == "base"]
    for path in (CONF_DIR / group).glob("*.yaml"):
        defaults = OmegaConf.load(path).get("defaults") or []
        assert f"/{group}_base@_here_" in defaults or not set(map(str, defaults)) - {"_self_"} - {
            p.stem for p in (CONF_DIR / group).glob("*.yaml")}, path.name  # or it extends another option
    with pytest.raises(ConfigError, match=rf"unknown {group} 'base'; known: {known}"):
        check(f"{group}=base")
    with pytest.raises(ConfigError, match=f"--config-name {group}_base: kdlab's config is conf/config.yaml"):
        check("--config-name", f"{group}_base")


def test_the_studies_are_not_hydra_configs(check):
    assert not (CONF_DIR / "study").exists()
    assert sorted(p.stem for p in STUDY_DIR.glob("*.yaml")) == ["capacity_gap", "converged", "fashion_mnist", "zskd"]
    with pytest.raises(ConfigError, match="study"):
        check("study=capacity_gap")


def test_a_studys_own_parts_live_in_its_folder():
    """Each folder of conf/experiment/ is named after a study, and each recipe in it is one that study sweeps
    and no other study does; nothing outside conf/experiment/<study>/ is one study's alone by that rule."""
    studies = {p.stem: OmegaConf.to_container(OmegaConf.load(p), resolve=True) for p in STUDY_DIR.glob("*.yaml")}
    swept = {name: {e for sw in s["sweeps"] for e in sw["experiments"]} for name, s in studies.items()}
    folders = sorted(p.name for p in (CONF_DIR / "experiment").iterdir() if p.is_dir())
    assert folders == ["capacity_gap", "converged", "fashion_mnist", "zskd"]
    for folder in folders:
        assert folder in studies, f"conf/experiment/{folder}/ is not a study's (no studies/{folder}.yaml)"
        parts = [n for n in experiment_names() if n.startswith(folder + "/")]
        assert parts
        for part in parts:
            assert part in swept[folder], f"{part} is in {folder}/ but {folder} does not sweep it"
            assert not any(part in s for name, s in swept.items() if name != folder), part
    assert "capacity_gap/gap_kd_fashion_mnist" in experiment_names() and "kd_fashion_mnist" in experiment_names()
