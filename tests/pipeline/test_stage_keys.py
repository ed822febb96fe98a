"""Every recipe, every study sweep and every method on the default pipeline keeps its stages' store keys.

The store keys in ``stage_keys.json`` were computed by this file's ``compute`` from the configs of the commit
that wrote it; a change to the config tree or to the pipeline's code that moves a key (so that stored stages
would silently be retrained, or worse, a changed stage reused) fails here. A change meant to move keys (a
method fixed to the reference code, say) rewrites the file on purpose:

    .venv/bin/python -m tests.pipeline.test_stage_keys --write     # then review `git diff` of the JSON

The keys are computed as the runner computes them (tests.helpers.config.stage_keys), with the data's
fingerprint standing for the data config and the precision pinned (``trainer.precision=32-true``), so that
they do not depend on the machine (``precision: auto`` resolves per CPU).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from kdlab.config_tree import STUDY_DIR, experiment_names
from tests.helpers.cli import ROOT
from tests.helpers.config import compose_config, stage_keys

GOLDEN = Path(__file__).with_name("stage_keys.json")
PIN = ("trainer.precision=32-true",)


def cases() -> dict[str, list[str]]:
    """{case name: overrides}: the default run, every recipe, every study sweep (first seed), every method, and every
    recipe with a reference card under protocol=reference (its default pair)."""
    from omegaconf import OmegaConf

    out: dict[str, list[str]] = {"default": []}
    for name in experiment_names():  # a study's part: capacity_gap/gap_kd_fashion_mnist
        out[f"experiment={name}"] = [f"+experiment={name}"]
    for p in sorted(STUDY_DIR.glob("*.yaml")):
        study = OmegaConf.to_container(OmegaConf.load(p), resolve=True)
        for i, sweep in enumerate(study["sweeps"]):
            extra = [o for o in [*sweep.get("overrides", []), *study.get("overrides", [])] if not o.startswith("logger=")]
            for e in sweep["experiments"]:  # named by the recipe's stem, its name in the study's tables
                out[f"study={p.stem}/{i}/{e.rsplit('/', 1)[-1]}"] = [f"+experiment={e}", f"seed={study['seeds'][0]}",
                                                                     *extra]
    for p in sorted((ROOT / "cards").glob("*.yaml")):
        out[f"protocol=reference/experiment={p.stem}"] = [f"+experiment={p.stem}", "protocol=reference"]
    for p in sorted((ROOT / "conf" / "distill").glob("*.yaml")):
        if p.stem not in ("none", "dafl", "speq"):  # dafl / speq need their own pipelines (their recipes cover them)
            out[f"distill={p.stem}"] = [f"distill={p.stem}"]
    return out


def keys_of(overrides: list[str]) -> dict[str, str]:
    """The stage keys of ``python -m kdlab <overrides>``; a library teacher's weights (downloaded in a real run,
    never here) are stood for by their name, so its key and its students' keys still chain."""
    from kdlab.pipeline import assemble

    real = assemble.pretrained_sha256
    assemble.pretrained_sha256 = lambda arch, pretrained, in_channels: f"weights of {arch} ({pretrained})"
    try:
        return stage_keys(compose_config(*overrides, *PIN))
    finally:
        assemble.pretrained_sha256 = real


def compute() -> dict[str, dict[str, str]]:
    return {name: keys_of(over) for name, over in cases().items()}


GOLDEN_KEYS = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}


@pytest.mark.parametrize("name", sorted(set(GOLDEN_KEYS) | set(cases())))
def test_stage_keys_are_unchanged(name):
    """A case pinned in the golden file keeps its keys. A new case (a recipe or method added since) has nothing to
    keep yet: it is skipped, so that adding a method stays four files; ``--write`` pins it."""
    over = cases().get(name)
    if over is None:
        pytest.skip(f"{name} no longer exists (a recipe was removed or renamed: rewrite {GOLDEN.name})")
    if name not in GOLDEN_KEYS:
        pytest.skip(f"{name} is new: its keys are pinned by the next --write")
    assert keys_of(over) == GOLDEN_KEYS[name]


if __name__ == "__main__" and "--write" in sys.argv:
    GOLDEN.write_text(json.dumps(compute(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN} ({len(GOLDEN_KEYS)} -> {len(json.loads(GOLDEN.read_text()))} cases)")
