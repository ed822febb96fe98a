"""Stochastic teaching (DGKD): drop some sources' KD terms per mini-batch, like dropout on teachers.

The draw for a batch depends only on (seed, stage, global step), so a rerun -- or a resumed run -- drops
exactly the same sources. A dropped source is not run forward at all.
"""
from __future__ import annotations

import hashlib
from typing import Any

import torch

from kdlab.errors import ConfigError, warn

MODES = ("none", "drop_k", "bernoulli")
DEFAULTS = {"p": 0.75, "k": 1, "include_teacher": True, "min_keep": 1}
#: the options each mode reads (what a stage's store key hashes; the others are reported if set)
MODE_OPTIONS = {"none": (), "drop_k": ("k", "include_teacher", "min_keep"),
                "bernoulli": ("p", "include_teacher", "min_keep")}


def stochastic_config(st: dict[str, Any], stage: str = "") -> dict[str, Any] | None:
    """The mode and the options it reads, defaults filled in; None for mode ``none``.

    An option that the mode does not read (``p`` with ``drop_k``) is named in a warning when it differs
    from its default, instead of being ignored without a word."""
    mode = str(st.get("mode", "none"))
    if mode not in MODES:
        raise ConfigError(f"unknown distill.stochastic.mode {mode!r}; known: {', '.join(MODES)}")
    for key in sorted(set(DEFAULTS) - set(MODE_OPTIONS[mode])):
        if key in st and st[key] != DEFAULTS[key]:
            warn(f"distill.stochastic.{key}={st[key]!r} has no effect with mode {mode!r}"
                 + (f" (stage {stage})" if stage else "") + f"; {mode!r} reads: "
                 + (", ".join(MODE_OPTIONS[mode]) or "nothing"))
    if mode == "none":
        return None
    return {"mode": mode, **{k: st.get(k, DEFAULTS[k]) for k in MODE_OPTIONS[mode]}}


class SourceSelector:
    """Decides which sources teach in each batch.

    mode ``none``: all sources. ``drop_k``: exactly ``k`` eligible sources removed, chosen uniformly
    (the released DGKD code, k=1). ``bernoulli``: each eligible source kept with probability ``p``
    (the paper). ``include_teacher=False`` makes the first source (the teacher) never droppable;
    ``min_keep`` re-adds random dropped sources until at least that many teach. In ``bernoulli`` mode it
    must be >= 1: with 4 sources at p = 0.75 every source is dropped in 0.4 % of the batches, which under
    lambda = 1 leaves a loss with no gradient, and the DGKD paper's student always has a teacher.
    """

    def __init__(self, source_names: list[str], mode: str = "none", p: float = 0.75, k: int = 1,
                 include_teacher: bool = True, min_keep: int = 1, seed: int = 0, stage: str = ""):
        if mode not in MODES:
            raise ConfigError(f"unknown distill.stochastic.mode {mode!r}; known: {', '.join(MODES)}")
        n = len(source_names)
        self.names = list(source_names)
        self.mode, self.p, self.k = mode, float(p), int(k)
        self.include_teacher, self.min_keep = bool(include_teacher), int(min_keep)
        eligible = n if include_teacher else n - 1
        if mode == "bernoulli" and not 0.0 < self.p <= 1.0:
            raise ConfigError(f"distill.stochastic.p must be in (0, 1], got {p}")
        if mode == "drop_k":
            if self.k < 1:
                raise ConfigError(f"distill.stochastic.k must be >= 1, got {k}")
            if self.k >= n:
                raise ConfigError(f"distill.stochastic.k={k} drops every source of stage {stage!r}, "
                                  f"which has {n} source(s); k must be < {n}")
            if self.k > eligible:
                raise ConfigError(f"distill.stochastic.k={k} exceeds the {eligible} droppable source(s) of "
                                  f"stage {stage!r} (include_teacher=false)")
        low = 1 if mode == "bernoulli" else 0
        if mode != "none" and not low <= self.min_keep <= n:
            why = " (bernoulli mode must always keep a source)" if mode == "bernoulli" and self.min_keep < 1 else ""
            raise ConfigError(f"distill.stochastic.min_keep={min_keep} must be between {low} and the {n} "
                              f"source(s) of stage {stage!r}{why}")
        digest = hashlib.sha256(f"{seed}:{stage}".encode()).digest()
        self._base = int.from_bytes(digest[:7], "little")

    def _gen(self, step: int) -> torch.Generator:
        return torch.Generator().manual_seed(self._base + 1_000_003 * int(step))

    def keep_mask(self, step: int) -> list[bool]:
        """Which sources teach at this global step."""
        n = len(self.names)
        if self.mode == "none" or n == 0:
            return [True] * n
        g = self._gen(step)
        first = 0 if self.include_teacher else 1
        eligible = list(range(first, n))
        keep = [True] * n
        if self.mode == "drop_k":
            order = torch.randperm(len(eligible), generator=g).tolist()
            for j in order[: self.k]:
                keep[eligible[j]] = False
        else:  # bernoulli
            draws = torch.rand(len(eligible), generator=g).tolist()
            for j, u in zip(eligible, draws):
                keep[j] = u < self.p
        missing = self.min_keep - sum(keep)
        if missing > 0:
            dropped = [i for i in range(n) if not keep[i]]
            order = torch.randperm(len(dropped), generator=g).tolist()
            for j in order[:missing]:
                keep[dropped[j]] = True
        return keep

    def kept(self, step: int) -> list[str]:
        return [name for name, k in zip(self.names, self.keep_mask(step)) if k]
