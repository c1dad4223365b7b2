"""Prewarm placement (DESIGN §3.2): which new copies to load where, greedy in descending score.

A candidate is an aligned TP group on one node with room, no copy of the same model, and laminar
with every copy or instance it overlaps. Preference: protected (every overlapped copy scores lower),
then least overlapped score. When nothing fits, "evict_aware" evicts lower-score copies if the
plan's total score rises, "paper" skips, "round_robin" (ablation) takes the first fit in turn.
"""

from __future__ import annotations

from typing import Iterator

from services.placer.core import effects as fx
from services.placer.core.cluster import Cluster, NodeState, Occupant, laminar_ok
from services.placer.core.scores import copy_pages, copy_scores

Want = tuple[float, str, str]  # (score, model, kind "foundation" | "burst")


def wanted_copies(cluster: Cluster) -> list[Want]:
    """New copies every model still needs beyond its existing ones, highest score first."""
    wants: list[Want] = []
    for name, model in cluster.models.items():
        scores = copy_scores(model, len(cluster.serving(name)), cluster.config)
        have = len(cluster.copies.get(name, ()))
        wants += [(score, name, kind) for score, kind in scores[have:]]
    wants.sort(key=lambda w: (-w[0], w[1]))
    return wants


def plan_prewarms(cluster: Cluster) -> list[fx.Effect]:
    """Place every wanted copy; apply each decision to `cluster` and return the effects."""
    effects: list[fx.Effect] = []
    cursor = sum(len(c) for c in cluster.copies.values())  # round robin: rotates with the cluster
    for score, model, kind in wanted_copies(cluster):
        if cluster.config.placement == "round_robin":
            placed, cursor = _round_robin(cluster, model, score, cursor)
            effects += placed
        else:
            reason = fx.PREWARM_FOUNDATION if kind == "foundation" else fx.PREWARM_BURST
            effects += _place_best(cluster, model, score, reason)
    return effects


def _candidates(cluster: Cluster, tp: int) -> Iterator[tuple[NodeState, tuple[int, ...], frozenset[int], list[Occupant]]]:
    for node in cluster.nodes.values():
        for group in cluster.groups(node, tp):
            yield node, group, frozenset(group), cluster.overlapped(node.name, group)


def _usable(model: str, group: frozenset[int], overlapped: list[Occupant]) -> bool:
    return all(o.model != model and laminar_ok(group, o) for o in overlapped)


def _place_best(cluster: Cluster, model: str, score: float, reason: str) -> list[fx.Effect]:
    spec = cluster.models[model]
    need = copy_pages(spec)
    best: tuple | None = None
    for node, group, group_set, overlapped in _candidates(cluster, spec.tp):
        if not _usable(model, group_set, overlapped):
            continue
        room = cluster.room(node.name, group, need)
        if room is False:
            continue
        protected = all(not o.is_instance and o.score < score for o in overlapped)
        key = (not protected, sum(o.score for o in overlapped if not o.is_instance), node.order, group[0])
        if best is None or key < best[0]:
            best = (key, node.name, group, room)
            if key[:2] == (False, 0):
                break  # nothing later in scan order can beat a protected, unoverlapped group
    if best is not None:
        _, node_name, group, room = best
        host = room if isinstance(room, Occupant) else None
        cluster.add_copy(model, node_name, group, score, host)
        return [fx.Prewarm(model, node_name, group, score, fx.PREWARM_KV_SPACE if host else reason,
                           kv_host=host.instance.instance_id if host else "")]
    if cluster.config.placement == "evict_aware":
        return _place_evicting(cluster, model, score, reason, need)
    return []


def _place_evicting(cluster: Cluster, model: str, score: float, reason: str, need: int) -> list[fx.Effect]:
    """Evict lower-score copies for the group with the largest gain (score minus evicted scores)."""
    best: tuple | None = None
    for node, group, group_set, overlapped in _candidates(cluster, cluster.models[model].tp):
        if any(o.model == model for o in overlapped):
            continue
        blocking = [o for o in overlapped if not laminar_ok(group_set, o)]
        if any(o.is_instance or o.score >= score for o in blocking):
            continue
        more = cluster.evictions_for_room(node.name, group, need, lambda o: o.score < score, forced=blocking)
        if more is None:
            continue
        evicted = blocking + more
        gain = score - sum(o.score for o in evicted)
        key = (-gain, node.order, group[0])
        if gain > 0 and (best is None or key < best[0]):
            best = (key, node.name, group, evicted)
    if best is None:
        return []
    _, node_name, group, evicted = best
    out: list[fx.Effect] = []
    for occ in evicted:
        cluster.evict(occ)
        out.append(fx.Evict(occ.model, occ.node, occ.devices, fx.EVICTED_FOR, for_model=model))
    cluster.add_copy(model, node_name, group, score)
    out.append(fx.Prewarm(model, node_name, group, score, reason))
    return out


def _round_robin(cluster: Cluster, model: str, score: float, cursor: int) -> tuple[list[fx.Effect], int]:
    """Ablation: the first group that fits, scanning from a rotating cursor; never evicts."""
    spec = cluster.models[model]
    need = copy_pages(spec)
    groups = [(node, g) for node in cluster.nodes.values() for g in cluster.groups(node, spec.tp)]
    for step in range(len(groups)):
        position = (cursor + step) % len(groups)
        node, group = groups[position]
        if _usable(model, frozenset(group), cluster.overlapped(node.name, group)) \
                and cluster.room(node.name, group, need) is True:
            cluster.add_copy(model, node.name, group, score)
            return [fx.Prewarm(model, node.name, group, score, fx.PREWARM_ROUND_ROBIN)], position + 1
    return [], cursor
