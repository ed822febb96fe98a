"""A results study's definition (``studies/<NAME>.yaml``, checked) and the commands it runs: each sweep a
Hydra multirun of kdlab's own command over some experiments and seeds,

    python -m kdlab -m +experiment=A,B seed=0,1,2 [the sweep's overrides] [the study's] [yours]

and, for every row of its tables, the command that reproduces that row on its own."""
from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path

from omegaconf import OmegaConf

from kdlab.config_tree import ROOT, STUDY_DIR, experiment_names
from kdlab.errors import ConfigError


def known_studies() -> list[str]:
    return sorted(p.stem for p in STUDY_DIR.glob("*.yaml"))


def load_study(name: str) -> dict:
    """The study's config, checked: every sweep names known experiments and a part."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else STUDY_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown study {name!r}; known: {', '.join(known_studies()) or '(none)'}")
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(cfg, dict) or not cfg.get("sweeps"):
        raise ConfigError(f"study {path} has no 'sweeps' list")
    known = experiment_names()
    parts = cfg.setdefault("parts", {})
    for i, sw in enumerate(cfg["sweeps"]):
        if not isinstance(sw, dict) or not sw.get("experiments") or not sw.get("part"):
            raise ConfigError(f"study {name}: sweep {i} needs 'part' and a non-empty 'experiments' list")
        for e in sw["experiments"]:
            if e not in known:
                raise ConfigError(f"study {name}: unknown experiment {e!r}; known: {', '.join(known)}")
        parts.setdefault(sw["part"], {"title": sw["part"]})
    pub = cfg.get("published")
    if pub is not None:  # a paper's table: every row a published figure, its experiment one the study runs
        if not isinstance(pub, dict) or pub.get("part") not in parts or not isinstance(pub.get("rows"), list):
            raise ConfigError(f"study {name}: 'published' needs 'part' (one of {', '.join(parts)}) and a 'rows' list")
        ran = {e.rsplit("/", 1)[-1] for sw in cfg["sweeps"] if sw["part"] == pub["part"] for e in sw["experiments"]}
        for row in pub["rows"]:
            if not isinstance(row, dict) or "label" not in row or not isinstance(row.get("published"), (int, float)):
                raise ConfigError(f"study {name}: published row {row!r} needs 'label' and a number 'published'")
            if row.get("experiment") is None and not row.get("kdlab"):
                raise ConfigError(f"study {name}: published row {row['label']!r} names no 'experiment'; say why "
                                  f"kdlab has none in 'kdlab'")
            if row.get("experiment") is not None and row["experiment"] not in ran:
                raise ConfigError(f"study {name}: published row {row['label']!r} names experiment "
                                  f"{row['experiment']!r}, which part {pub['part']} does not run; it runs "
                                  f"{', '.join(sorted(ran))}")
    curves = cfg.get("curves")
    if curves is not None:  # the convergence figure (kdlab/study/curves.py): experiments the study runs
        ran = {e.rsplit("/", 1)[-1] for sw in cfg["sweeps"] for e in sw["experiments"]}
        if not isinstance(curves, dict) or not isinstance(curves.get("experiments"), list):
            raise ConfigError(f"study {name}: 'curves' needs an 'experiments' list")
        for e in curves["experiments"]:
            if e not in ran:
                raise ConfigError(f"study {name}: curves experiment {e!r} is not run by the study; it runs "
                                  f"{', '.join(sorted(ran))}")
    cfg.setdefault("seeds", [0, 1, 2])
    cfg.setdefault("overrides", [])
    cfg.setdefault("by", "experiment")
    cfg.setdefault("last_k", 3)
    cfg.setdefault("docs_dir", "docs/results")
    cfg.setdefault("readme_marker", "results")
    return cfg


def docs_dir(study: dict) -> Path:
    """Where ``--docs`` writes the study's tables: its ``docs_dir`` (default docs/results), under the repo."""
    return ROOT / str(study["docs_dir"])


def sweep_args(study: dict, sweep: dict, seeds: Sequence[int], extra: Sequence[str]) -> list[str]:
    """kdlab's own multirun arguments for one sweep (without the output directory)."""
    return ["-m", "+experiment=" + ",".join(sweep["experiments"]), "seed=" + ",".join(map(str, seeds)),
            *sweep.get("overrides", []), *study["overrides"], *extra]


def command_line(args: Sequence[str]) -> str:
    return "python -m kdlab " + " ".join(shlex.quote(a) for a in args)


def experiment_command(study: dict, sweep: dict, experiment: str, seeds: Sequence[int],
                       extra: Sequence[str]) -> str:
    """The command that reproduces one experiment's row on its own."""
    one = {**sweep, "experiments": [experiment]}
    return command_line(sweep_args(study, one, seeds, extra))


def row_name(args: Sequence[str], experiment: str) -> str:
    """An experiment's name in the tables: the ``experiment_name=`` a sweep's arguments set, else its own, the
    recipe's file stem (a study's part ``capacity_gap/gap_kd_fashion_mnist`` is ``gap_kd_fashion_mnist``: every
    recipe's experiment_name is its stem, tests/pipeline/test_recipes.py)."""
    names = [str(a).split("=", 1)[1] for a in args if str(a).startswith("experiment_name=")]
    return names[-1] if names else experiment.rsplit("/", 1)[-1]
