"""The core's index built with a Reuse handle equals a fresh build: it follows a change of a node's
lending order (its instances' order) and new instance figures; the simulator's shell keeps the views
of nodes and instances that did not change; a whole replay's core calls decide alike on fresh
indexes."""

from __future__ import annotations

import numpy as np

from services.placer.core import Config, Copy, Gpu, Instance, ModelSpec, Node, allocate, snapshot_of
from services.placer.core.cluster import Cluster, Reuse
from sim.cluster import Cluster as SimCluster
from sim.engine import EventLoop
from sim.serving import Requests, Serving
from sim.systems.placer_shell import PlacerShell
from sim.timing import load_profile

GIB = 1 << 30
MODELS = (ModelSpec("a", 2 * GIB, 1, kv_bytes=8 * GIB), ModelSpec("b", 2 * GIB, 1, kv_bytes=4 * GIB))
NODES = tuple(Node(f"n{i}", (Gpu(0, 40 * GIB), Gpu(1, 40 * GIB))) for i in range(2))


def instance(iid: str, model: str, node: str, inflight: int = 0) -> Instance:
    kv = next(m.kv_bytes for m in MODELS if m.name == model)
    return Instance(iid, model, node, (0,), inflight=inflight, kv_capacity_bytes=kv)


def hosts(cluster: Cluster) -> list[tuple[str, int, str, int]]:
    return [(n.name, g.index, g.host.instance.instance_id if g.host else "", g.kv_spare)
            for n in cluster.nodes.values() for g in n.gpus.values()]


def test_reuse_follows_the_lending_order_and_figures():
    """n0 holds instances of a and b on one GPU; the first of them on the node lends its KV space."""
    config = Config(capacity=4)
    first = snapshot_of(NODES, MODELS, instances=(instance("a0", "a", "n0"), instance("b0", "b", "n0"),
                                                  instance("b1", "b", "n1")))
    second = snapshot_of(NODES, MODELS, instances=(instance("b0", "b", "n0"), instance("a0", "a", "n0", inflight=2)))
    reuse = Reuse()
    Cluster(first, config, reuse)
    for snapshot, lender in ((second, "b0"), (first, "a0"), (second, "b0")):
        got = hosts(Cluster(snapshot, config, reuse))
        assert got == hosts(Cluster(snapshot, config))
        assert got[0][2] == lender


def index(cluster: Cluster) -> dict:
    return {kind: {m: [(o.node, o.devices, o.instance.instance_id if o.instance else "") for o in occs]
                   for m, occs in sorted(by_model.items())}
            for kind, by_model in (("instances", cluster.instances), ("copies", cluster.copies))}


def test_reused_per_model_lists_match_a_fresh_build():
    """Nodes rebuilt (changed copies, or changed by the previous decision) leave and re-enter the
    per-model lists in snapshot order; nodes with new figures only keep their occupants."""
    config = Config(capacity=4)
    copies = (Copy("a", "n0", (1,)), Copy("b", "n1", (1,)), Copy("a", "n1", (0,)))
    first = snapshot_of(NODES, MODELS, copies, (instance("a0", "a", "n0"), instance("b1", "b", "n1")))
    figures = snapshot_of(NODES, MODELS, copies, (instance("a0", "a", "n0"), instance("b1", "b", "n1", inflight=3)))
    moved = snapshot_of(NODES, MODELS, copies[1:] + (Copy("b", "n0", (1,)),),
                        (instance("a0", "a", "n0", inflight=1), instance("b1", "b", "n1", inflight=3)))
    reuse = Reuse()
    for snapshot in (first, figures, moved, first):
        assert index(Cluster(snapshot, config, reuse)) == index(Cluster(snapshot, config))
    decided = allocate(moved, "b", 0.0, config, reuse)  # changes the index of the node it places on
    assert decided.found
    assert index(Cluster(moved, config, reuse)) == index(Cluster(moved, config))


def test_shell_keeps_the_views_of_unchanged_instances():
    loop, none = EventLoop(), np.zeros(0)
    sim = SimCluster(loop, load_profile(), 1, 4, {"a": "llama2-7b", "b": "llama2-7b"})
    shell = PlacerShell(sim, Serving(loop, sim, Requests(none, none, none, none), ["a", "b"]), 32,
                        {"a": GIB, "b": GIB})
    busy = sim.cold_start("a", 0, (0,), "a#1", GIB, 32)
    sim.cold_start("b", 0, (1,), "b#1", GIB, 32)
    before = shell.snapshot({}, {}).instances
    busy.inflight += 1
    sim.served_nodes.add(0)  # as Serving marks a node whose requests changed
    seen = shell.snapshot({}, {})
    after = seen.instances
    assert after[1] is before[1] and after[0] is not before[0]
    assert (after[0].inflight, after[0].instance_id, after[0].devices) == (1, "a#1", (0,))
    assert shell.snapshot({}, {}).nodes[0] is seen.nodes[0]  # nothing changed since: the same node view


def test_reused_index_decides_as_fresh_builds_over_a_simulated_replay(monkeypatch):
    """Every core call of a short replay of ours (promotable copies: allocations re-plan copies)
    gives the same effects again on a fresh index: what the Reuse handle carries over (nodes,
    the models changed since rescoring and wants were last worked out) changes no decision."""
    import sim.systems.warmserve as warmserve
    from services.placer.core.planner import allocate, tick
    from sim.run import DEFAULTS, make_system, run

    config = {**DEFAULTS, "models": {"llama2-7b": 5, "llama2-13b": 2}, "nodes": 2, "gpus_per_node": 4,
              "total_rate_rps": 6.0, "replay_h": 0.1, "warmup_s": 300.0, "drain_s": 300.0, "history_days": 1}
    calls = []

    def recorded_allocate(snapshot, model, now_s, core_config, reuse):
        out = allocate(snapshot, model, now_s, core_config, reuse)
        calls.append((lambda: allocate(snapshot, model, now_s, core_config).effects, out.effects))
        return out

    def recorded_tick(snapshot, now_s, core_config, reuse):
        out = tick(snapshot, now_s, core_config, reuse)
        calls.append((lambda: tuple(tick(snapshot, now_s, core_config)), tuple(out)))
        return out

    monkeypatch.setattr(warmserve, "allocate", recorded_allocate)
    monkeypatch.setattr(warmserve, "tick", recorded_tick)
    run(config, make_system("ours", config))
    allocations = [effects for _, effects in calls if any(type(e).__name__ in ("Promote", "ColdStart") for e in effects)]
    replans = [effects for effects in allocations if any(type(e).__name__ == "Prewarm" for e in effects)]
    assert len(allocations) > 20 and replans  # the replay exercised allocations that re-plan copies
    assert [fresh() for fresh, _ in calls] == [effects for _, effects in calls]
