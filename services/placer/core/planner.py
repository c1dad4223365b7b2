"""The placer core's entry points: `tick` (one planning round) and `allocate` (one instance now).

Both are pure functions of a Snapshot, the time and a Config; the live service and the simulator
call exactly these (a `Reuse` handle only saves work: the result is the same with or without it).
Both first reclaim borrowed KV space an instance needs again; a tick first retires unregistered
models' instances and copies, then autoscales and plans prewarmed copies.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from services.placer.core import effects as fx
from services.placer.core.allocate import Allocation, allocate_in
from services.placer.core.autoscale import autoscale, reclaim_kv
from services.placer.core.cluster import Cluster, Reuse
from services.placer.core.placement import plan_prewarms
from services.placer.core.retire import retire_unregistered
from services.placer.core.snapshot import Config, Snapshot


@dataclass(frozen=True)
class DesiredCopy:
    model: str
    node: str
    devices: tuple[int, ...]
    score: float
    ready: bool  # False: loading or still to be prewarmed
    kv_host: str = ""


@dataclass(frozen=True)
class TickPlan:
    effects: tuple[fx.Effect, ...]  # in order: KV reclaims, scaling, prewarm evictions and loads
    copies: tuple[DesiredCopy, ...]  # every prewarmed copy the cluster should hold after the tick
    instances: dict[str, int]  # model -> instances that should serve (running or starting)


def plan_tick(snapshot: Snapshot, now_s: float, config: Config, reuse: Reuse | None = None) -> TickPlan:
    cluster, effects = _planned(snapshot, now_s, config, reuse)
    copies = tuple(sorted((DesiredCopy(o.model, o.node, o.devices, o.score, o.ready, o.kv_host)
                           for group in cluster.copies.values() for o in group),
                          key=lambda c: (c.node, c.devices, c.model)))
    instances = {m: len(cluster.serving(m)) for m in sorted(cluster.models) if cluster.serving(m)}
    return TickPlan(tuple(effects), copies, instances)


def tick(snapshot: Snapshot, now_s: float, config: Config, reuse: Reuse | None = None) -> list[fx.Effect]:
    """One planning round: the effects to execute, each with its reason (plan_tick's effects,
    without the desired state that only the live service publishes)."""
    return _planned(snapshot, now_s, config, reuse)[1]


def _planned(snapshot: Snapshot, now_s: float, config: Config, reuse: Reuse | None) -> tuple[Cluster, list[fx.Effect]]:
    cluster = Cluster(snapshot, config, reuse)
    cluster.rescore()
    effects = retire_unregistered(snapshot)
    effects += reclaim_kv(cluster)
    effects += autoscale(cluster, snapshot.loads, now_s, snapshot.unmeasured)
    cluster.rescore()  # instance counts changed: copies' ranks score against the new n_f, n_b
    if config.prewarm:
        effects += plan_prewarms(cluster)
    return cluster, effects


def allocate(snapshot: Snapshot, model: str, now_s: float, config: Config, reuse: Reuse | None = None) -> Allocation:
    """GPUs for one new instance of `model` right now (the gateway is waiting), after any KV
    reclaims; with promotable_copies, followed by the prewarms that replace the copies it blocks."""
    cluster = Cluster(snapshot, config, reuse)
    cluster.rescore()
    reclaims = tuple(reclaim_kv(cluster))
    allocation = allocate_in(cluster, model, now_s, fx.INSTANCE_NEEDED)
    replacements: tuple[fx.Effect, ...] = ()
    if allocation.effects and config.prewarm and config.promotable_copies:
        cluster.rescore()  # the new instance blocks the copies on its GPUs: replace them now, not next tick
        replacements = tuple(plan_prewarms(cluster))
    if reclaims or replacements:
        allocation = dataclasses.replace(allocation, effects=reclaims + allocation.effects + replacements)
    return allocation
