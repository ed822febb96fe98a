"""kdlab.pipeline.topology: ``pipeline.*`` expanded into the stage graph, a pure function of the pipeline node and
the run's seed (names, roles, models as given, sources, base seeds), for every topology; its errors."""
from __future__ import annotations

import pytest

from kdlab.data.loader import derive_seed
from kdlab.errors import ConfigError
from kdlab.pipeline.spec import build_stages
from kdlab.pipeline.topology import TOPOLOGIES, StageNode, member_seed, stage_graph
from tests.helpers.config import compose_config

CHAIN = ["plain10", "plain6", "plain4", "plain2"]


def graph(seed: int = 7, **pipeline) -> list[tuple]:
    """(name, role, model, sources, seed, checkpoint) of every node, in order."""
    nodes = stage_graph(pipeline, seed)
    assert all(isinstance(n, StageNode) for n in nodes)
    return [(n.name, n.role, n.model, n.sources, n.seed, n.checkpoint) for n in nodes]


def test_single_direct_sequential_dense_on_a_chain():
    assert graph(topology="single", chain=["plain2"]) == [("student", "student", "plain2", [], 7, None)]
    names = ["teacher", "ta1", "ta2", "student"]
    roles = ["teacher", "ta", "ta", "student"]
    wired = {
        "direct": [[], ["teacher"], ["teacher"], ["teacher"]],
        "sequential": [[], ["teacher"], ["ta1"], ["ta2"]],
        "dense": [[], ["teacher"], ["teacher", "ta1"], ["teacher", "ta1", "ta2"]],
    }
    for topology, sources in wired.items():
        assert graph(topology=topology, chain=CHAIN) == [
            (names[i], roles[i], CHAIN[i], sources[i], 7, None) for i in range(4)], topology
    assert graph(chain=CHAIN[:2]) == graph(topology="dense", chain=CHAIN[:2])  # dense is the default


def test_ensemble_members_have_seeds_of_their_own():
    got = graph(topology="ensemble", chain=["resnet20", "plain2"], ensemble=3)
    members = [member_seed(7, "ensemble", k) for k in (1, 2, 3)]
    assert got == [("teacher1", "teacher", "resnet20", [], members[0], None),
                   ("teacher2", "teacher", "resnet20", [], members[1], None),
                   ("teacher3", "teacher", "resnet20", [], members[2], None),
                   ("student", "student", "plain2", ["teacher1", "teacher2", "teacher3"], 7, None)]
    # hashed from (kind, run seed, k), independently of this module, below 2**31 for seed_everything
    assert members[0] == derive_seed("pipeline-member", "ensemble", 7, 1) % 2**31
    assert len(set(members) | {7, 8, 9, 10}) == 7


def test_generations_sequential_and_dense():
    gens = [member_seed(7, "generation", k) for k in (1, 2)]
    assert graph(topology="sequential", chain=["resnet20"], generations=3) == [
        ("gen1", "teacher", "resnet20", [], gens[0], None), ("gen2", "ta", "resnet20", ["gen1"], gens[1], None),
        ("student", "student", "resnet20", ["gen2"], 7, None)]
    assert [n[3] for n in graph(topology="dense", chain=["resnet20"], generations=3)] == [
        [], ["gen1"], ["gen1", "gen2"]]


def test_custom_graph_names_roles_models_seed_offsets():
    stages = [{"name": "big", "model": "plain10", "sources": [], "distill": {"temperature": 2}},
              {"name": "pacemaker1", "model": {"arch": "plain6", "on_the_fly": True}, "sources": ["big"],
               "seed_offset": 3},
              {"name": "small", "model": "plain2", "sources": ["pacemaker1", "big"], "role": "ta"}]
    assert graph(topology="custom", stages=stages, teacher_checkpoint="/t.pt") == [
        ("big", "teacher", "plain10", [], 7, None),  # a custom graph has no teacher_checkpoint
        ("pacemaker1", "pacemaker", {"arch": "plain6", "on_the_fly": True}, ["big"], 10, None),
        ("small", "ta", "plain2", ["pacemaker1", "big"], 7, None)]


def test_names_roles_and_the_teacher_checkpoint_on_a_chain():
    got = graph(topology="sequential", chain=CHAIN[:3], names=["a", "pacemaker", "c"], roles=[None, None, "ta"],
                teacher_checkpoint="/t.pt")
    assert got == [("a", "teacher", "plain10", [], 7, "/t.pt"), ("pacemaker", "pacemaker", "plain6", ["a"], 7, None),
                   ("c", "ta", "plain4", ["pacemaker"], 7, None)]


def test_the_graph_reads_only_the_pipeline_node_and_the_seed():
    """What build_stages makes of a composed recipe is the graph's: names, roles, sources and seeds."""
    for overrides in (["+experiment=dgkd_fashion_mnist"], ["+experiment=feed_parallel_fashion_mnist", "seed=2"],
                      ["+experiment=feed_sequential_fashion_mnist"], ["+experiment=pacemaker_fashion_mnist"],
                      ["pipeline=custom"], ["pipeline=single", "model=plain4"]):
        cfg = compose_config(*overrides)
        nodes = stage_graph(cfg["pipeline"], int(cfg["seed"]))
        specs = build_stages(cfg)
        assert [(n.name, n.role, n.sources) for n in nodes] == [(s.name, s.role, s.sources) for s in specs]
        pinned = cfg["pipeline"].get("per_stage") or {}
        assert [n.seed for n in nodes if "seed" not in pinned.get(n.name, {})] == \
            [s.seed for s in specs if "seed" not in pinned.get(s.name, {})], overrides


@pytest.mark.parametrize(("pipeline", "message"), [
    ({"topology": "star", "chain": CHAIN}, "unknown topology 'star'; known: custom, dense, direct, ensemble"),
    ({"topology": "single", "chain": CHAIN[:2]}, "single trains one model"),
    ({"topology": "dense", "chain": ["plain2"]}, "at least 2 models"),
    ({"topology": "dense", "chain": CHAIN, "names": ["a", "b"]}, "pipeline.names has 2 names for a chain of 4"),
    ({"topology": "dense", "chain": CHAIN, "roles": ["teacher"]}, "pipeline.roles has 1 roles for a chain of 4"),
    ({"topology": "dense", "chain": CHAIN, "names": ["a", "a", "b", "c"]}, "unique and non-empty"),
    ({"topology": "dense", "chain": CHAIN[:2], "roles": ["boss", None]}, "unknown stage role 'boss'"),
    ({"topology": "ensemble", "chain": CHAIN[:2], "ensemble": 0}, "must be >= 1 teachers"),
    ({"topology": "sequential", "chain": ["plain2"], "generations": 1}, "must be >= 2, got 1"),
    ({"topology": "custom"}, "needs pipeline.stages"),
    ({"topology": "custom", "stages": [{"name": "a", "model": "plain2", "sources": ["b"]},
                                       {"name": "b", "model": "plain2", "sources": []}]}, "not an earlier stage"),
    ({"topology": "dense", "chain": CHAIN, "pacemakers": {"nxn": "plain6"}, "pacemaker": "mxm"},
     "unknown pipeline.pacemaker 'mxm'; known: nxn"),
])
def test_bad_graphs_are_one_line_config_errors(pipeline, message):
    with pytest.raises(ConfigError, match=message):
        stage_graph(pipeline, 0)


def test_every_registered_topology_is_expanded():
    assert sorted(TOPOLOGIES.names()) == ["custom", "dense", "direct", "ensemble", "sequential", "single"]
