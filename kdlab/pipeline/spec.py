"""Stage specs: one stage's settings, from its node of the stage graph (:mod:`kdlab.pipeline.topology`), the
run's config and its own overrides.

    pipeline.per_stage {stage name: {distill: {...}, optimizer: {...}, scheduler: {...}, max_epochs, model,
                        seed_offset, seed, augment}}  overrides for one stage (``seed`` fixes the stage's seed, e.g.
                        one teacher shared by a sweep over seeds: +pipeline.per_stage.teacher.seed=0;
                        ``augment`` its training augmentation, e.g. a teacher trained with crop_flip teaching
                        students trained without, whose sources can then be cached:
                        +pipeline.per_stage.teacher.augment=crop_flip)

:func:`build_stages` = :func:`kdlab.pipeline.topology.stage_graph` (who the stages are and who teaches whom), then
:func:`stage_spec` for each stage (what it trains with).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from kdlab.distill.base import STRATEGIES, Strategy, strategy_class
from kdlab.distill.stochastic import stochastic_config
from kdlab.errors import ConfigError
from kdlab.models.quant import quant_config
from kdlab.pipeline.lr_scaling import scaled_optimizer
from kdlab.pipeline.topology import StageNode, stage_graph

MODEL_DEFAULTS = {"on_the_fly": False, "on_the_fly_n": None, "on_the_fly_mode": "row", "kwargs": {}}
#: the per-stage settings a custom stage may carry inline in its entry of ``pipeline.stages``
INLINE_SETTINGS = ("distill", "optimizer", "scheduler", "max_epochs", "augment")


@dataclass
class StageSpec:
    name: str
    role: str
    model: dict[str, Any]
    sources: list[str]
    #: the keys its strategy reads, ``strategy`` always among them (:func:`stage_distill`)
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

    @property
    def imported(self) -> bool:
        """Imported as it is (``pipeline.teacher_checkpoint`` or ``model.pretrained``): evaluated, never trained."""
        return bool(self.checkpoint) or self.pretrained is not None

    @property
    def strategy_cls(self) -> type[Strategy]:
        """The stage's strategy class: the one way the pipeline looks it up (``ce`` for a stage without sources)."""
        return STRATEGIES.get(self.distill["strategy"])


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


def build_stages(cfg: dict[str, Any]) -> list[StageSpec]:
    """The resolved run config (a plain dict) turned into the ordered stage specs."""
    p = cfg["pipeline"]
    nodes = stage_graph(p, int(cfg.get("seed", 0)))
    overrides = stage_overrides(p, [node.name for node in nodes])
    specs: list[StageSpec] = []
    for node in nodes:  # a stage's sources come before it: their architectures are known
        archs = {s.name: s.arch for s in specs}
        specs.append(stage_spec(node, cfg, overrides.get(node.name) or {}, [archs[s] for s in node.sources]))
    return specs


def stage_overrides(p: dict[str, Any], names: list[str]) -> dict[str, dict[str, Any]]:
    """Each stage's own settings: ``pipeline.per_stage.<name>``, a custom stage's inline settings merged over
    them. A name that is not a stage is an error listing the stages."""
    per_stage = dict(p.get("per_stage") or {})
    if str(p.get("topology", "dense")) == "custom":
        for e in p.get("stages") or []:
            if e.get("name"):
                inline = {k: v for k, v in e.items() if k in INLINE_SETTINGS}
                per_stage[e["name"]] = deep_merge(per_stage.get(e["name"], {}), inline)
    for unknown in sorted(set(per_stage) - set(names)):
        raise ConfigError(f"pipeline.per_stage names unknown stage {unknown!r}; stages: {', '.join(names)}")
    return per_stage


def stage_spec(node: StageNode, cfg: dict[str, Any], over: dict[str, Any],
               source_archs: list[str] | None = None) -> StageSpec:
    """One stage's spec: its graph node, the run's settings (``cfg``) and its own (``over``,
    :func:`stage_overrides`) merged over them; ``source_archs``: the architectures of its sources."""
    run_distill = cfg.get("distill") or {}
    stochastic = stage_stochastic(node, run_distill, over.get("distill"))
    model = with_released_teacher(stage_model(node, over.get("model")), cfg, node.name)
    distill = stage_distill(node, run_distill, over.get("distill"), str(model["arch"]), list(source_archs or []))
    # optimizer.lr_scaling: the lr for this run's global batch (kdlab/pipeline/lr_scaling.py), hashed as such
    optimizer, scaling = scaled_optimizer(deep_merge(dict(cfg["optimizer"]), over.get("optimizer")), cfg)
    seed = int(over["seed"]) if over.get("seed") is not None else node.seed + int(over.get("seed_offset", 0))
    return StageSpec(
        name=node.name, role=node.role, model=model, sources=list(node.sources),
        distill=distill, optimizer=optimizer, extra={"lr_scaling": scaling} if scaling else {},
        scheduler=deep_merge(dict(cfg["scheduler"]), over.get("scheduler")),
        max_epochs=int(over.get("max_epochs", cfg["trainer"].get("max_epochs", 1))), seed=seed,
        stochastic=stochastic, checkpoint=node.checkpoint,
        augment=None if over.get("augment") is None else str(over["augment"]),
    )


def stage_distill(node: StageNode, run: dict[str, Any], over: dict[str, Any] | None, arch: str = "",
                  source_archs: list[str] | None = None) -> dict[str, Any]:
    """The stage's distill block: the run's ``distill`` with ``per_stage.<name>.distill`` merged over it, reduced to
    the keys its strategy reads (``own_config``: what its store key hashes), its feature points left null set to
    the reference layers of the student's (``arch``) and its sources' (``source_archs``) families. A stage without
    sources learns from labels (``ce``) unless its strategy teaches it with its own network (SPEQ)."""
    merged = deep_merge({k: v for k, v in run.items() if k not in ("stochastic", "cache")}, over)
    merged.pop("stochastic", None)  # the stage's stochastic teaching: stage_stochastic
    merged.pop("cache", None)  # the run's: kdlab/pipeline/source_cache.py
    # here the stage's distill settings are whole, as given: the place to check them against its strategy
    cls = strategy_class(merged)
    self_taught = getattr(cls, "self_distill", False)  # SPEQ
    if self_taught and node.sources:
        raise ConfigError(f"distill.strategy={merged.get('strategy')} teaches a stage with its own "
                          f"network, but stage {node.name!r} has sources ({', '.join(node.sources)}); use "
                          f"pipeline=single (or a stage without sources)")
    if not node.sources and not self_taught:  # a stage without sources learns from labels: ``ce``
        merged, cls = {**merged, "strategy": "ce"}, STRATEGIES.get("ce")
    if node.sources:  # feature points left null: the reference layers of the student's and sources' families
        merged = cls.with_model_taps(merged, arch, list(source_archs or []))
    return cls.own_config(merged)


def stage_stochastic(node: StageNode, run: dict[str, Any], over: dict[str, Any] | None) -> dict[str, Any] | None:
    """The stage's stochastic teaching (``distill.stochastic`` with ``per_stage.<name>.distill.stochastic`` merged
    over it, defaults filled in), or None: every source teaches every batch (no sources, mode ``none``, or a stage
    that ``distill.stochastic.stages`` does not name by its name or role; default: the student)."""
    stochastic = dict(run.get("stochastic") or {"mode": "none"})
    applies = list(stochastic.pop("stages", None) or ["student"])
    if not node.sources or (node.name not in applies and node.role not in applies):
        return None
    merged = deep_merge(stochastic, (over or {}).get("stochastic"))
    merged.pop("stages", None)
    return stochastic_config(merged, node.name)


def stage_model(node: StageNode, over: dict[str, Any] | None) -> dict[str, Any]:
    """The stage's model: its graph entry with ``per_stage.<name>.model`` merged over it, checked."""
    name = node.name
    model = with_quant(deep_merge(model_spec(node.model), over), f"model.quant (stage {name})")
    model = with_library_options(model, f"model (stage {name})")
    if model.get("pretrained") is not None:
        if node.sources:
            raise ConfigError(f"stage {name!r}: model.pretrained imports a stage as it is (evaluated, never "
                              f"trained), but it has sources ({', '.join(node.sources)}); only a stage without "
                              f"sources (a teacher) can be pretrained")
        if model.get("on_the_fly") or model.get("quant"):
            raise ConfigError(f"stage {name!r}: model.pretrained imports the weights as they are; on_the_fly "
                              f"and model.quant change the model, so they cannot apply to a pretrained stage")
        if node.checkpoint:
            raise ConfigError(f"stage {name!r} has both pipeline.teacher_checkpoint and model.pretrained; "
                              f"give one")
    return model
