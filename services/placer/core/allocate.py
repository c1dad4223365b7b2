"""Request-time allocation of a new instance (DESIGN §3.3), applied to the cluster index: promote a
ready copy on idle GPUs (evicting others only as far as the KV cache needs), else a loading copy,
else cold-load on the aligned group with the fewest overlapping copies, evicting all of them; with
no idle group, displace (demote) other models' idle or surplus instances, the least load first.
"hit_first" allocation also displaces idle instances for a ready copy before any cold start, and
a cold start there evicts copies only as far as it needs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from services.placer.core import effects as fx
from services.placer.core.cluster import Cluster, NodeState, Occupant, laminar_ok
from services.placer.core.scores import copy_pages, instance_pages
from services.placer.core.snapshot import Instance

HIT, IN_PROGRESS, MISS, NONE = "hit", "in_progress", "miss", "none"


@dataclass(frozen=True)
class Allocation:
    kind: str  # "hit" | "in_progress" | "miss" | "none"
    reason: str  # prewarm_hit | prewarm_in_progress | cold_start | no_capacity
    effects: tuple[fx.Effect, ...] = ()  # evictions first, then the promote or cold start
    instance_id: str = ""
    node: str = ""
    devices: tuple[int, ...] = ()

    @property
    def found(self) -> bool:
        """An instance was placed (a "none" allocation may still carry KV reclaims)."""
        return self.kind != NONE


def instance_id_for(model: str, node: str, devices: tuple[int, ...], now_s: float) -> str:
    return f"{model}-{node}-{devices[0]}-{round(now_s * 1000)}"


def allocate_in(cluster: Cluster, model: str, now_s: float, trigger: str) -> Allocation:
    """Find GPUs for one new instance of `model` and apply the result to `cluster`; `trigger`
    (scale_up or instance_needed) says why the instance is wanted."""
    if model not in cluster.models:
        return Allocation(NONE, fx.NO_CAPACITY)
    if cluster.config.allocation == "hit_first":
        got = _allocate_idle(cluster, model, now_s, trigger, (HIT,))
        if not got.found:
            got = _displaced(cluster, model, now_s, trigger, for_hit=True)
        if not got.found:
            got = _allocate_idle(cluster, model, now_s, trigger, (IN_PROGRESS, MISS))
    else:
        got = _allocate_idle(cluster, model, now_s, trigger, (HIT, IN_PROGRESS, MISS))
    return got if got.found else _displaced(cluster, model, now_s, trigger, for_hit=False)


def _displaced(cluster: Cluster, model: str, now_s: float, trigger: str, for_hit: bool) -> Allocation:
    displaced = _displace(cluster, model, now_s, for_hit, trigger)
    if not displaced:
        return Allocation(NONE, fx.NO_CAPACITY)
    found = _allocate_idle(cluster, model, now_s, trigger, (HIT,) if for_hit else (HIT, IN_PROGRESS, MISS))
    return dataclasses.replace(found, effects=tuple(displaced) + found.effects)  # on the GPUs just freed


def _allocate_idle(cluster: Cluster, model: str, now_s: float, trigger: str, kinds: tuple[str, ...]) -> Allocation:
    kv = instance_pages(cluster.models[model])
    for ready, kind, reason in ((True, HIT, fx.PREWARM_HIT), (False, IN_PROGRESS, fx.PREWARM_IN_PROGRESS)):
        found = _promotable(cluster, model, ready, kv) if kind in kinds else None
        if found is not None:
            copy, evicted = found
            return _start(cluster, model, now_s, trigger, kind, reason, copy.node, copy.devices, evicted, copy)
    found_miss = _cold_group(cluster, model, kv) if MISS in kinds else None
    if found_miss is None:
        return Allocation(NONE, fx.NO_CAPACITY)
    node, group, evicted = found_miss
    return _start(cluster, model, now_s, trigger, MISS, fx.COLD_START, node, group, evicted, None)


def _displace(cluster: Cluster, model: str, now_s: float, for_hit: bool, trigger: str) -> list[fx.Effect]:
    """Demote the instances on the aligned group that displaces the least load (requests in flight),
    preferring a group holding a ready copy of `model`, then the least windowed load per displaced
    instance, then fewer instances, then less copy score;
    only groups where `model` fits once everything on them is gone (`for_hit`: only idle instances
    over a ready copy). Copies borrowing a displaced instance's KV space are evicted first, then
    the instance is demoted (its weights stay a copy). With unserved_first, a model without a
    serving instance in an over-full cluster whose requests wait (`trigger` instance_needed) also
    takes idle instances still inside their protection: there, young instances hold every group it
    could take. A scale-up never does: its windowed load outlives the requests for a whole scale
    window, so two such models would take each other's new instances back and forth every tick."""
    spec = cluster.models[model]
    need = copy_pages(spec) + instance_pages(spec)
    takes_young = cluster.config.unserved_first and trigger == fx.INSTANCE_NEEDED and not cluster.serving(model) \
        and _over_full(cluster, model)

    def per_instance_load(victim: Occupant) -> float:
        return cluster.loads.get(victim.model, 0.0) / len(cluster.serving(victim.model))

    best = None
    for node in cluster.nodes.values():
        for group in cluster.groups(node, spec.tp):
            overlapped = cluster.overlapped(node.name, group)
            victims = [o for o in overlapped if o.is_instance]
            if not victims or not _displaceable(cluster, model, victims, now_s, takes_young) \
                    or any(cluster.pages_without_occupants(node.name, d) < need for d in group):
                continue
            hit = any(o.model == model and o.devices == group and o.ready and not o.is_instance for o in overlapped)
            if for_hit and (not hit or any(v.instance.inflight for v in victims)):
                continue
            key = (sum(v.instance.inflight for v in victims), not hit, sum(map(per_instance_load, victims)), len(victims),
                   sum(o.score for o in overlapped if not o.is_instance), node.order, group[0])
            if best is None or key < best[0]:
                best = (key, victims)
    if best is None:
        return []
    effects: list[fx.Effect] = []
    for victim in best[1]:
        inst = victim.instance
        lent = [o for o in cluster.overlapped(victim.node, victim.devices) if o.kv_host == inst.instance_id]
        for occ in lent:
            if occ.model != model:
                cluster.evict(occ)
                effects.append(fx.Evict(occ.model, occ.node, occ.devices, fx.EVICTED_FOR, for_model=model))
        cluster.displace(victim, keep=[o for o in lent if o.model == model])
        effects.append(fx.Demote(victim.model, victim.node, victim.devices, inst.instance_id, fx.DISPLACED_FOR,
                                 for_model=model))
    return effects


def _displaceable(cluster: Cluster, model: str, victims: list[Occupant], now_s: float, takes_young: bool) -> bool:
    """Instances of other models, ready and past their protection (`takes_young`: idle ones still
    inside it too); a model loses busy instances only while its remaining ones stay under the
    scale-up line for its load (requests in flight or the windowed load, whichever is higher):
    never starved to zero while it has requests."""
    config = cluster.config
    by_model: dict[str, list[Occupant]] = {}
    for v in victims:
        inst = v.instance
        protected = now_s - inst.started_at_s < config.protect_s and not (takes_young and inst.inflight == 0)
        if v.model == model or not inst.ready or inst.draining or protected:
            return False
        by_model.setdefault(v.model, []).append(v)
    for name, taken in by_model.items():
        if all(v.instance.inflight == 0 for v in taken):
            continue
        serving = cluster.serving(name)
        left = len(serving) - len(taken)
        demand = max(cluster.loads.get(name, 0.0), sum(o.instance.inflight for o in serving))
        if left < 1 or config.over_scale_up_line(demand, left):
            return False
    return True


def _over_full(cluster: Cluster, model: str) -> bool:
    """The cluster has fewer GPUs than the instances the autoscaler wants for every model with load
    or instances (at least one each, and one for `model`)."""
    wanted = sum(spec.tp * max(1, cluster.config.instances_for(cluster.loads.get(name, 0.0)))
                 for name, spec in cluster.models.items()
                 if name == model or cluster.loads.get(name, 0.0) > 0 or cluster.serving(name))
    return wanted > sum(len(node.gpus) for node in cluster.nodes.values())


def _promotable(cluster: Cluster, model: str, ready: bool, kv: int) -> tuple[Occupant, list[Occupant]] | None:
    """The copy to promote that costs the least evicted score for its KV room."""
    best = None
    for copy in cluster.copies.get(model, ()):
        if copy.ready != ready or copy.kv_host or len(copy.devices) != cluster.models[model].tp \
                or cluster.hosts_instance(copy.node, copy.devices):
            continue
        evicted = cluster.evictions_for_room(copy.node, copy.devices, kv, lambda o: o is not copy)
        if evicted is None:
            continue
        key = (sum(o.score for o in evicted), cluster.nodes[copy.node].order, copy.devices)
        if best is None or key < best[0]:
            best = (key, copy, evicted)
    return None if best is None else (best[1], best[2])


def _cold_group(cluster: Cluster, model: str, kv: int) -> tuple[str, tuple[int, ...], list[Occupant]] | None:
    """Idle aligned group with the fewest overlapping copies (then least score) that fits once all
    of them are evicted. Each node's groups are kept sorted by that key until the node changes."""
    spec = cluster.models[model]
    need = copy_pages(spec) + kv
    keep = cluster.config.allocation == "hit_first"
    best = None
    for node in cluster.nodes.values():
        for key, group, overlapped in _idle_groups_by_overlap(cluster, node, spec.tp):
            if best is not None and key >= best[0]:
                break
            forced = [o for o in overlapped if o.model == model or not laminar_ok(frozenset(group), o)] \
                if keep else overlapped
            more = cluster.evictions_for_room(node.name, group, need, lambda o: keep, forced=forced)
            if more is not None:
                best = (key, node.name, group, forced + more)
                break
        if best is not None and best[0][0] == 0:
            break  # an empty group that fits: nothing later in scan order is better
    return None if best is None else best[1:]


def _idle_groups_by_overlap(cluster: Cluster, node: NodeState, tp: int) -> list:
    cached = cluster.cache.get(("idle_groups", node.name, tp))
    if cached is not None and cached[0] == node.version:
        return cached[1]
    groups = []
    for group in cluster.groups(node, tp):
        overlapped = list(cluster.overlapped(node.name, group))
        if not any(o.is_instance for o in overlapped):
            groups.append(((len(overlapped), sum(o.score for o in overlapped), node.order, group[0]), group, overlapped))
    groups.sort(key=lambda g: g[0])
    cluster.cache[("idle_groups", node.name, tp)] = (node.version, groups)
    return groups


def _start(cluster: Cluster, model: str, now_s: float, trigger: str, kind: str, reason: str, node: str,
           devices: tuple[int, ...], evicted: list[Occupant], copy: Occupant | None) -> Allocation:
    effects: list[fx.Effect] = []
    for occ in evicted:
        cluster.evict(occ)
        effects.append(fx.Evict(occ.model, occ.node, occ.devices, fx.EVICTED_FOR, for_model=model))
    instance_id = instance_id_for(model, node, devices, now_s)
    kv_bytes = cluster.models[model].kv_bytes
    instance = Instance(instance_id, model, node, devices, started_at_s=now_s,
                        kv_capacity_bytes=kv_bytes, ready=False)
    cluster.start_instance(model, node, devices, instance, copy)
    start = fx.Promote if copy is not None else fx.ColdStart
    effects.append(start(model, node, devices, instance_id, reason, kv_bytes=kv_bytes, trigger=trigger))
    return Allocation(kind, reason, tuple(effects), instance_id, node, devices)
