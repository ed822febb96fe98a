"""Stage specs: a pipeline config turned into an ordered list of stages.

    pipeline.chain     [plain10, plain8, ...]  models, largest first (a name or {arch, on_the_fly, ...})
    pipeline.topology  single | direct | sequential | dense | ensemble | custom
    pipeline.names     optional stage names (default teacher, ta1..taN, student)
    pipeline.roles     optional roles (default teacher / ta / student)
    pipeline.stages    custom graphs: [{name, model, sources: [names], role, distill, ...}]
    pipeline.ensemble  K: the first chain model as K teachers -> the student
    pipeline.generations G: G generations of the first chain model (names gen1..genG-1, student), each taught
                         by the previous one (topology sequential; dense: by all)
                       Ensemble teachers and earlier generations get seeds of their own (member_seed), so
                       no two run seeds share a member and none starts from the student's initial weights;
                       the student has the run's seed, like the same student trained alone.
    pipeline.per_stage {stage name: {distill: {...}, optimizer: {...}, scheduler: {...}, max_epochs, model,
                        seed_offset, seed, augment}}  overrides for one stage (``seed`` fixes the stage's seed, e.g.
                        one teacher shared by a sweep over seeds: +pipeline.per_stage.teacher.seed=0;
                        ``augment`` its training augmentation, e.g. a teacher trained with crop_flip teaching
                        students trained without, whose sources can then be cached:
                        +pipeline.per_stage.teacher.augment=crop_flip)
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from kdlab.data.loader import derive_seed
from kdlab.distill.base import strategy_class
from kdlab.distill.stochastic import stochastic_config
from kdlab.errors import ConfigError
from kdlab.models.quant import quant_config
from kdlab.pipeline.lr_scaling import scaled_optimizer
from kdlab.pipeline.topology import TOPOLOGIES

MODEL_DEFAULTS = {"on_the_fly": False, "on_the_fly_n": None, "on_the_fly_mode": "row", "kwargs": {}}
ROLES = ("teacher", "ta", "pacemaker", "student")


@dataclass
class StageSpec:
    name: str
    role: str
    model: dict[str, Any]
    sources: list[str]
    distill: dict[str, Any]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    max_epochs: int
    seed: int
    stochastic: dict[str, Any] | None = None
    checkpoint: str | None = None
    #: the stage's training augmentation (``pipeline.per_stage.<name>.augment``); None: the data's own
    augment: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def arch(self) -> str:
        return str(self.model["arch"])

    @property
    def pretrained(self) -> Any:
        """``model.pretrained`` (true or a weights file) of an imported library stage, else None."""
        return self.model.get("pretrained")


def model_spec(entry: Any) -> dict[str, Any]:
    """Normalize a chain entry (a zoo name or a mapping with ``arch``) to a full model spec."""
    if isinstance(entry, str):
        spec = {"arch": entry}
    elif isinstance(entry, dict) and "arch" in entry:
        spec = dict(entry)
    else:
        raise ConfigError(f"a chain entry must be a model name or a mapping with 'arch', got {entry!r}")
    out = {**copy.deepcopy(MODEL_DEFAULTS), **spec}
    out["kwargs"] = dict(out.get("kwargs") or {})
    return with_library_options(with_quant(out))


def with_quant(model: dict[str, Any], where: str = "model.quant") -> dict[str, Any]:
    """``model`` with its ``quant`` block checked and defaults filled in, or dropped when nothing is quantized
    (so a float stage's store key is what it was before quantization existed)."""
    out = dict(model)
    q = quant_config(out.pop("quant", None), where)
    if q is not None:
        out["quant"] = q
    return out


def with_library_options(model: dict[str, Any], where: str = "model") -> dict[str, Any]:
    """``model`` with ``pretrained`` and ``preprocess`` checked and kept only where they are set (``pretrained``
    true or a path, ``preprocess`` other than ``auto``), so a float zoo stage's store key stays what it was;
    the ``name`` of a ``model=timm`` / ``model=torchvision`` node is dropped (``arch`` already holds it)."""
    from kdlab.models.library import is_library_arch, preprocess_setting

    out = dict(model)
    if is_library_arch(out.get("arch")):
        out.pop("name", None)
    pretrained = out.pop("pretrained", None)
    if pretrained is True or (isinstance(pretrained, str) and pretrained.strip()):
        out["pretrained"] = pretrained
    elif pretrained not in (None, False, ""):
        raise ConfigError(f"{where}.pretrained must be true (the library's weights), a weights file path, released "
                          f"(a zoo teacher's published CIFAR-100 weights) or null, got {pretrained!r}")
    preprocess = preprocess_setting(out.pop("preprocess", None), f"{where}.preprocess")
    if preprocess != "auto":
        out["preprocess"] = preprocess
    return out


def with_released_teacher(model: dict[str, Any], cfg: dict[str, Any], stage: str) -> dict[str, Any]:
    """``model`` with ``pretrained: released`` as the released CIFAR-100 teacher's file of its architecture under
    ``paths.teachers_dir`` (:mod:`kdlab.models.released`); a released teacher's file named for another
    architecture is a ConfigError."""
    from kdlab.models.library import is_library_arch
    from kdlab.models.released import check_released_file, released_teacher_file

    pretrained = model.get("pretrained")
    if not isinstance(pretrained, str) or is_library_arch(model.get("arch")):
        return model
    arch = str(model["arch"])
    if pretrained == "released":
        teachers_dir = (cfg.get("paths") or {}).get("teachers_dir")
        return {**model, "pretrained": released_teacher_file(arch, teachers_dir, stage)}
    check_released_file(arch, pretrained, stage)
    return model


def deep_merge(base: dict[str, Any], override: dict[str, Any] | None) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in (override or {}).items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def member_seed(seed: int, kind: str, k: int) -> int:
    """The seed of the k-th member (1-based) of an ensemble or a generation chain of run ``seed``.

    ``seed + k`` would make teacher 2 of run 0 teacher 1 of run 1 (shared stages, an understated spread
    over seeds); a hash of (kind, seed, k) gives every run its own members. Below 2**31, as
    ``pl.seed_everything`` needs."""
    return derive_seed("pipeline-member", kind, int(seed), int(k)) % (2**31)


def default_names(n: int, topology: str, generations: bool = False) -> list[str]:
    if n == 1:
        return ["student"]
    if topology == "ensemble":
        return [f"teacher{i + 1}" for i in range(n - 1)] + ["student"]
    if generations:  # sequential FEED: gen1 (trained from labels), gen2, ..., and the last one, the student
        return [f"gen{i + 1}" for i in range(n - 1)] + ["student"]
    return ["teacher"] + [f"ta{i}" for i in range(1, n - 1)] + ["student"]


def default_role(name: str, index: int, n: int, topology: str) -> str:
    if index == n - 1:
        return "student"
    if index == 0 or topology == "ensemble":
        return "teacher"
    return "pacemaker" if name.startswith("pacemaker") else "ta"


def build_stages(cfg: dict[str, Any]) -> list[StageSpec]:
    """Turn the resolved run config (a plain dict) into the ordered stage specs."""
    p = cfg["pipeline"]
    topology = str(p.get("topology", "dense"))
    TOPOLOGIES.get(topology)  # unknown -> ConfigError listing the known ones
    seed = int(cfg.get("seed", 0))
    distill = dict(cfg.get("distill") or {})
    stochastic = dict(distill.pop("stochastic", None) or {"mode": "none"})
    stochastic_stages = list(stochastic.pop("stages", None) or ["student"])
    distill.pop("cache", None)
    per_stage = dict(p.get("per_stage") or {})
    kinds = p.get("pacemakers")  # pipeline=pacemaker picks chain[1] from pacemakers by pipeline.pacemaker
    if isinstance(kinds, dict) and p.get("pacemaker") is not None and p["pacemaker"] not in kinds:
        raise ConfigError(f"unknown pipeline.pacemaker {p['pacemaker']!r}; known: {', '.join(sorted(kinds))}")

    if topology == "custom":
        entries = list(p.get("stages") or [])
        if not entries:
            raise ConfigError("pipeline.topology=custom needs pipeline.stages: [{name, model, sources}, ...]")
        names = [str(e.get("name", "")) for e in entries]
        models = [model_spec(e.get("model")) for e in entries]
        sources = [list(e.get("sources") or []) for e in entries]
        roles = [e.get("role") for e in entries]
        seeds = [seed + int(e.get("seed_offset", 0)) for e in entries]
        for e in entries:  # per-stage settings may sit inline in a custom stage
            if e.get("name"):
                per_stage[e["name"]] = deep_merge(per_stage.get(e["name"], {}),
                                                  {k: v for k, v in e.items()
                                                   if k in ("distill", "optimizer", "scheduler", "max_epochs", "augment")})
    else:
        chain = list(p.get("chain") or [])
        k = p.get("ensemble")
        g = p.get("generations")
        if k is not None and topology == "ensemble":
            if not chain:
                raise ConfigError("pipeline.ensemble needs pipeline.chain=[teacher_arch, student_arch]")
            if int(k) < 1:
                raise ConfigError(f"pipeline.ensemble must be >= 1 teachers, got {k}")
            chain = [chain[0]] * int(k) + [chain[-1]]
            seeds = [member_seed(seed, "ensemble", i + 1) for i in range(int(k))] + [seed]
        elif g is not None:
            if int(g) < 2:
                raise ConfigError(f"pipeline.generations must be >= 2, got {g}")
            if not chain:
                raise ConfigError("pipeline.generations needs pipeline.chain=[arch]")
            chain = [chain[0]] * int(g)
            seeds = [member_seed(seed, "generation", i + 1) for i in range(int(g) - 1)] + [seed]
        else:
            seeds = [seed] * len(chain)
        n = len(chain)
        if topology == "single":
            if n != 1:
                raise ConfigError(f"pipeline.topology=single trains one model; got pipeline.chain={chain}")
        elif n < 2:
            raise ConfigError(f"pipeline.chain needs at least 2 models (teacher and student) for "
                              f"topology={topology}, got {chain}")
        names = [str(x) for x in (p.get("names") or default_names(n, topology, generations=g is not None
                                                                          and topology != "ensemble"))]
        if len(names) != n:
            raise ConfigError(f"pipeline.names has {len(names)} names for a chain of {n} models")
        models = [model_spec(e) for e in chain]
        sources = [[names[j] for j in src] for src in TOPOLOGIES.get(topology)(n)]
        roles = list(p.get("roles") or [None] * n)

    n = len(names)
    if len(set(names)) != n or any(not x for x in names):
        raise ConfigError(f"stage names must be unique and non-empty, got {names}")
    for unknown in sorted(set(per_stage) - set(names)):
        raise ConfigError(f"pipeline.per_stage names unknown stage {unknown!r}; stages: {', '.join(names)}")
    specs: list[StageSpec] = []
    seen: set[str] = set()
    for i, name in enumerate(names):
        for s in sources[i]:
            if s not in seen:
                raise ConfigError(f"stage {name!r} is taught by {s!r}, which is not an earlier stage; "
                                  f"earlier stages: {', '.join(sorted(seen)) or 'none'}")
        role = roles[i] or default_role(name, i, n, topology)
        if role not in ROLES:
            raise ConfigError(f"unknown stage role {role!r} for stage {name!r}; known: {', '.join(ROLES)}")
        over = dict(per_stage.get(name) or {})
        stage_distill = deep_merge(distill, over.get("distill"))
        stage_stochastic = None
        if sources[i] and (name in stochastic_stages or role in stochastic_stages):
            stage_stochastic = deep_merge(stochastic, (over.get("distill") or {}).get("stochastic"))
            stage_stochastic.pop("stages", None)
            stage_stochastic = stochastic_config(stage_stochastic, name)  # None for mode none
        stage_distill.pop("stochastic", None)
        stage_distill.pop("cache", None)
        self_taught = getattr(strategy_class(stage_distill), "self_distill", False)  # SPEQ
        if self_taught and sources[i]:
            raise ConfigError(f"distill.strategy={stage_distill.get('strategy')} teaches a stage with its own "
                              f"network, but stage {name!r} has sources ({', '.join(sources[i])}); use "
                              f"pipeline=single (or a stage without sources)")
        if not sources[i] and not self_taught:  # a stage without sources learns from labels: ``ce``
            stage_distill = {**stage_distill, "strategy": "ce"}
        model = with_quant(deep_merge(models[i], over.get("model")), f"model.quant (stage {name})")
        model = with_library_options(model, f"model (stage {name})")
        model = with_released_teacher(model, cfg, name)
        if sources[i]:  # feature points left null: the reference layers of the student's and sources' families
            by_name = {s.name: s for s in specs}
            stage_distill = strategy_class(stage_distill).with_model_taps(
                stage_distill, str(model["arch"]), [by_name[s].arch for s in sources[i]])
        # the keys its strategy reads and nothing else: what the stage's store key hashes
        stage_distill = strategy_class(stage_distill).own_config(stage_distill)
        checkpoint = p.get("teacher_checkpoint") if i == 0 and topology != "custom" else None
        if model.get("pretrained") is not None:
            if sources[i]:
                raise ConfigError(f"stage {name!r}: model.pretrained imports a stage as it is (evaluated, never "
                                  f"trained), but it has sources ({', '.join(sources[i])}); only a stage without "
                                  f"sources (a teacher) can be pretrained")
            if model.get("on_the_fly") or model.get("quant"):
                raise ConfigError(f"stage {name!r}: model.pretrained imports the weights as they are; on_the_fly "
                                  f"and model.quant change the model, so they cannot apply to a pretrained stage")
            if checkpoint:
                raise ConfigError(f"stage {name!r} has both pipeline.teacher_checkpoint and model.pretrained; "
                                  f"give one")
        max_epochs = int(over.get("max_epochs", cfg["trainer"].get("max_epochs", 1)))
        # optimizer.lr_scaling: the lr for this run's global batch (kdlab/pipeline/lr_scaling.py), hashed as such
        optimizer, scaling = scaled_optimizer(deep_merge(dict(cfg["optimizer"]), over.get("optimizer")), cfg)
        specs.append(StageSpec(
            name=name, role=role, model=model, sources=list(sources[i]), distill=stage_distill,
            optimizer=optimizer, extra={"lr_scaling": scaling} if scaling else {},
            scheduler=deep_merge(dict(cfg["scheduler"]), over.get("scheduler")),
            max_epochs=max_epochs,
            seed=int(over["seed"]) if over.get("seed") is not None else seeds[i] + int(over.get("seed_offset", 0)),
            stochastic=stage_stochastic,
            checkpoint=checkpoint,
            augment=None if over.get("augment") is None else str(over["augment"]),
        ))
        seen.add(name)
    return specs
