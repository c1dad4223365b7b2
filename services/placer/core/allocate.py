"""Request-time allocation of a new instance (DESIGN §3.3), applied to the cluster index: promote a
ready copy on idle GPUs (evicting others only as far as the KV cache needs), else a loading copy,
else cold-load on the aligned group with the fewest overlapping copies, evicting all of them.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.placer.core import effects as fx
from services.placer.core.cluster import Cluster, NodeState, Occupant
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


def instance_id_for(model: str, node: str, devices: tuple[int, ...], now_s: float) -> str:
    return f"{model}-{node}-{devices[0]}-{round(now_s * 1000)}"


def allocate_in(cluster: Cluster, model: str, now_s: float, trigger: str) -> Allocation:
    """Find GPUs for one new instance of `model` and apply the result to `cluster`; `trigger`
    (scale_up or instance_needed) says why the instance is wanted."""
    if model not in cluster.models:
        return Allocation(NONE, fx.NO_CAPACITY)
    kv = instance_pages(cluster.models[model])
    for ready, kind, reason in ((True, HIT, fx.PREWARM_HIT), (False, IN_PROGRESS, fx.PREWARM_IN_PROGRESS)):
        found = _promotable(cluster, model, ready, kv)
        if found is not None:
            copy, evicted = found
            return _start(cluster, model, now_s, trigger, kind, reason, copy.node, copy.devices, evicted, copy)
    found_miss = _cold_group(cluster, model, kv)
    if found_miss is None:
        return Allocation(NONE, fx.NO_CAPACITY)
    node, group, evicted = found_miss
    return _start(cluster, model, now_s, trigger, MISS, fx.COLD_START, node, group, evicted, None)


def _idle(cluster: Cluster, node: str, devices: tuple[int, ...]) -> bool:
    return not any(o.is_instance for o in cluster.overlapped(node, devices))


def _promotable(cluster: Cluster, model: str, ready: bool, kv: int) -> tuple[Occupant, list[Occupant]] | None:
    """The copy to promote that costs the least evicted score for its KV room."""
    best = None
    for copy in cluster.copies.get(model, ()):
        if copy.ready != ready or copy.kv_host or len(copy.devices) != cluster.models[model].tp \
                or not _idle(cluster, copy.node, copy.devices):
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
    best = None
    for node in cluster.nodes.values():
        for key, group, overlapped in _idle_groups_by_overlap(cluster, node, spec.tp):
            if best is not None and key >= best[0]:
                break
            if cluster.evictions_for_room(node.name, group, need, lambda o: False, forced=overlapped) is not None:
                best = (key, node.name, group, overlapped)
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
