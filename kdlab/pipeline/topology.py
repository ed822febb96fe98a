"""The stage graph: ``pipeline.*`` expanded into the ordered stages of a run and who teaches whom.

    pipeline.chain       [plain10, plain8, ...]  models, largest first (a name or {arch, on_the_fly, ...})
    pipeline.topology    single | direct | sequential | dense | ensemble | custom
    pipeline.names       optional stage names (default teacher, ta1..taN, student)
    pipeline.roles       optional roles (default teacher / ta / pacemaker / student)
    pipeline.stages      custom graphs: [{name, model, sources: [names], role, seed_offset, distill, ...}]
    pipeline.ensemble    K: the first chain model as K teachers -> the student
    pipeline.generations G: G generations of the first chain model (names gen1..genG-1, student), each taught
                         by the previous one (topology sequential; dense: by all)
    pipeline.teacher_checkpoint  a trained teacher for the first stage of a chain

:func:`stage_graph` knows nothing but these keys and the run's seed: a stage's own settings (distill,
optimizer, epochs, ``per_stage``) are :func:`kdlab.pipeline.spec.stage_spec`'s. The ``TOPOLOGIES`` registry
maps a chain of n models (largest first) to the sources of every stage, as lists of earlier indices.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kdlab.data.loader import derive_seed
from kdlab.errors import ConfigError
from kdlab.registry import Registry

TOPOLOGIES = Registry("topology")
ROLES = ("teacher", "ta", "pacemaker", "student")


@TOPOLOGIES.register("single")
def single(n: int) -> list[list[int]]:
    """One model trained from labels (the "trained alone" baseline)."""
    return [[] for _ in range(n)]


@TOPOLOGIES.register("direct")
def direct(n: int) -> list[list[int]]:
    """Hinton KD: every later stage is taught by the teacher alone."""
    return [[]] + [[0] for _ in range(1, n)]


@TOPOLOGIES.register("sequential")
def sequential(n: int) -> list[list[int]]:
    """TAKD (and sequential FEED / pacemaker-only): each stage is taught by its predecessor."""
    return [[]] + [[i - 1] for i in range(1, n)]


@TOPOLOGIES.register("dense")
def dense(n: int) -> list[list[int]]:
    """DGKD: each stage is taught by every earlier stage."""
    return [list(range(i)) for i in range(n)]


@TOPOLOGIES.register("ensemble")
def ensemble(n: int) -> list[list[int]]:
    """Parallel FEED: n - 1 independent teachers, all teaching the last stage."""
    return [[] for _ in range(n - 1)] + [list(range(n - 1))]


@TOPOLOGIES.register("custom")
def custom(n: int) -> list[list[int]]:  # sources come from pipeline.stages
    return [[] for _ in range(n)]


@dataclass
class StageNode:
    """One stage of the graph, before its own settings."""

    name: str
    role: str
    #: the chain entry (or a custom stage's ``model``) as given: a zoo name or a mapping with ``arch``
    model: Any
    sources: list[str]
    #: the seed the graph gives it: the run's; an ensemble member's or an earlier generation's
    #: (:func:`member_seed`); a custom stage's ``seed + seed_offset``. ``per_stage`` may still move it.
    seed: int
    #: ``pipeline.teacher_checkpoint`` on the first stage of a chain
    checkpoint: str | None = None


def member_seed(seed: int, kind: str, k: int) -> int:
    """The seed of the k-th member (1-based) of an ensemble or a generation chain of run ``seed``.

    ``seed + k`` would make teacher 2 of run 0 teacher 1 of run 1 (shared stages, an understated spread
    over seeds); a hash of (kind, seed, k) gives every run its own members, and none starts from the
    student's initial weights (the student has the run's seed, like the same student trained alone).
    Below 2**31, as ``pl.seed_everything`` needs."""
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


def stage_graph(p: dict[str, Any], seed: int) -> list[StageNode]:
    """The ``pipeline`` node ``p`` expanded into the ordered stages of a run of seed ``seed``: each stage's
    name, role, model entry, sources and seed; names unique, sources earlier, roles known."""
    topology = str(p.get("topology", "dense"))
    TOPOLOGIES.get(topology)  # unknown -> ConfigError listing the known ones
    kinds = p.get("pacemakers")  # pipeline=pacemaker picks chain[1] from pacemakers by pipeline.pacemaker
    if isinstance(kinds, dict) and p.get("pacemaker") is not None and p["pacemaker"] not in kinds:
        raise ConfigError(f"unknown pipeline.pacemaker {p['pacemaker']!r}; known: {', '.join(sorted(kinds))}")
    nodes = custom_graph(p, seed) if topology == "custom" else chain_graph(p, topology, seed)
    check_graph(nodes)
    return nodes


def custom_graph(p: dict[str, Any], seed: int) -> list[StageNode]:
    """``pipeline.stages``: every stage names its model and sources."""
    entries = list(p.get("stages") or [])
    if not entries:
        raise ConfigError("pipeline.topology=custom needs pipeline.stages: [{name, model, sources}, ...]")
    n = len(entries)
    nodes = []
    for i, e in enumerate(entries):
        name = str(e.get("name", ""))
        nodes.append(StageNode(name=name, role=e.get("role") or default_role(name, i, n, "custom"),
                               model=e.get("model"), sources=list(e.get("sources") or []),
                               seed=seed + int(e.get("seed_offset", 0))))
    return nodes


def chain_graph(p: dict[str, Any], topology: str, seed: int) -> list[StageNode]:
    """``pipeline.chain`` under a topology: its models (``ensemble``: K copies of the first, ``generations``: G
    copies), the default names and roles, and each stage's sources from :data:`TOPOLOGIES`."""
    chain = list(p.get("chain") or [])
    k, g = p.get("ensemble"), p.get("generations")
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
    generations = g is not None and topology != "ensemble"
    names = [str(x) for x in (p.get("names") or default_names(n, topology, generations=generations))]
    if len(names) != n:
        raise ConfigError(f"pipeline.names has {len(names)} names for a chain of {n} models")
    roles = list(p.get("roles") or [None] * n)
    if len(roles) != n:
        raise ConfigError(f"pipeline.roles has {len(roles)} roles for a chain of {n} models")
    sources = TOPOLOGIES.get(topology)(n)
    return [StageNode(name=names[i], role=roles[i] or default_role(names[i], i, n, topology), model=chain[i],
                      sources=[names[j] for j in sources[i]], seed=seeds[i],
                      checkpoint=p.get("teacher_checkpoint") if i == 0 else None)
            for i in range(n)]


def check_graph(nodes: list[StageNode]) -> None:
    """Stage names unique and non-empty, every source an earlier stage, every role known."""
    names = [node.name for node in nodes]
    if len(set(names)) != len(names) or any(not x for x in names):
        raise ConfigError(f"stage names must be unique and non-empty, got {names}")
    seen: set[str] = set()
    for node in nodes:
        for s in node.sources:
            if s not in seen:
                raise ConfigError(f"stage {node.name!r} is taught by {s!r}, which is not an earlier stage; "
                                  f"earlier stages: {', '.join(sorted(seen)) or 'none'}")
        if node.role not in ROLES:
            raise ConfigError(f"unknown stage role {node.role!r} for stage {node.name!r}; known: {', '.join(ROLES)}")
        seen.add(node.name)
