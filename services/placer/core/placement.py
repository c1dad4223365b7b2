"""Prewarm placement (DESIGN §3.2), greedy in descending score over aligned TP groups that have
room, hold no copy of the model and stay laminar; protected first, then least overlapped score.
When nothing fits: "evict_aware" evicts lower-score copies if the plan's score rises, "paper"
skips, "round_robin" (ablation) takes the first fit in turn."""

from __future__ import annotations

from itertools import chain
from typing import Iterator

from services.placer.core import effects as fx
from services.placer.core.cluster import Cluster, NodeState, Occupant, laminar_ok
from services.placer.core.scores import copy_pages, copy_scores
from services.placer.core.snapshot import ModelSpec

Want = tuple[float, str, str]  # (score, model, kind "foundation" | "burst" | "standby")
REASONS = {"foundation": fx.PREWARM_FOUNDATION, "burst": fx.PREWARM_BURST, "standby": fx.PREWARM_STANDBY}


def wanted_copies(cluster: Cluster) -> list[Want]:
    """New copies every model still needs beyond its existing ones, highest score first (each
    model's wants are worked out again only once it has changed)."""
    for name in cluster.changed_models("wants"):
        wants = _wants_of(cluster, name)
        if wants:
            cluster.wants[name] = wants
        else:
            cluster.wants.pop(name, None)
    return sorted(chain.from_iterable(cluster.wants.values()), key=lambda w: (-w[0], w[1]))


def _wants_of(cluster: Cluster, name: str) -> list[Want]:
    spec = cluster.models[name]
    scores = copy_scores(spec, len(cluster.serving(name)), cluster.config)
    copies = cluster.copies.get(name, ())
    have = sum(not cluster.blocked(o) for o in copies) if cluster.config.replaces_blocked(spec) else len(copies)
    return [(score, name, kind) for score, kind in scores[have:]]


class _Failures:
    """Eviction searches that found nothing, per TP: (score, pages, groups skipped as the same
    model's). Placing copies only adds copies of higher score and takes memory, so a later want
    with the same TP, no higher score and no fewer pages can succeed only on those skipped
    groups; an eviction frees memory and forgets everything."""

    def __init__(self) -> None:
        self.by_tp: dict[int, list[tuple[float, int, set[tuple[str, int]]]]] = {}

    def only_groups(self, tp: int, score: float, need: int) -> set[tuple[str, int]] | None:
        for failed_score, failed_need, skipped in self.by_tp.get(tp, ()):
            if score <= failed_score and need >= failed_need:
                return skipped
        return None

    def add(self, tp: int, score: float, need: int, skipped: set[tuple[str, int]]) -> None:
        self.by_tp.setdefault(tp, []).append((score, need, skipped))

    def forget(self) -> None:
        self.by_tp.clear()


def plan_prewarms(cluster: Cluster) -> list[fx.Effect]:
    """Place every wanted copy; apply each decision to `cluster` and return the effects."""
    effects: list[fx.Effect] = []
    cursor = sum(len(c) for c in cluster.copies.values())  # round robin: rotates with the cluster
    failures = _Failures()
    for score, model, kind in wanted_copies(cluster):
        if cluster.config.placement == "round_robin":
            placed, cursor = _round_robin(cluster, model, score, cursor)
            effects += placed
        else:
            effects += _place_best(cluster, model, score, REASONS[kind], failures)
    return effects


def _usable(model: str, group: frozenset[int], overlapped: list[Occupant]) -> bool:
    return all(o.model != model and laminar_ok(group, o) for o in overlapped)


def _place_best(cluster: Cluster, model: str, score: float, reason: str, failures: _Failures) -> list[fx.Effect]:
    spec = cluster.models[model]
    need = copy_pages(spec)
    best: tuple | None = None
    for node, group, room in _fitting(cluster, spec, need):
        overlapped = cluster.overlapped(node.name, group)
        if not _usable(model, frozenset(group), overlapped):
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
        return _place_evicting(cluster, model, score, reason, need, failures)
    return []


def _fitting(cluster: Cluster, spec: ModelSpec,
             need: int) -> Iterator[tuple[NodeState, tuple[int, ...], Occupant | bool]]:
    """Aligned groups with `need` pages of room (see Cluster.room), skipping nodes without any;
    for models whose blocked copies are replaced, only free pool pages on GPUs without instances."""
    idle_only = cluster.config.replaces_blocked(spec)
    for node in cluster.nodes.values():
        if need <= (node.most_idle_free() if idle_only else node.most_room()):
            for group in cluster.groups(node, spec.tp):
                room = cluster.room(node.name, group, need)
                if room is False or (idle_only and (room is not True or cluster.hosts_instance(node.name, group))):
                    continue
                yield node, group, room


def _place_evicting(cluster: Cluster, model: str, score: float, reason: str, need: int,
                    failures: _Failures) -> list[fx.Effect]:
    """Evict lower-score copies for the group with the largest gain (score minus evicted scores)."""
    spec = cluster.models[model]
    tp, idle_only = spec.tp, cluster.config.replaces_blocked(spec)
    aligned = tp & (tp - 1) == 0  # aligned power-of-two groups are laminar with each other
    only = failures.only_groups(tp, score, need)
    skipped: set[tuple[str, int]] = set()
    best: tuple | None = None
    floors = sorted((node.eviction_floor(need), node.order, node) for node in cluster.nodes.values())
    for floor, _, node in floors:  # branch and bound: the most promising nodes first
        if score - floor <= 0 or (best is not None and score - floor < -best[0][0]):
            break
        for group in cluster.groups(node, tp):
            if only is not None and (node.name, group[0]) not in only:
                continue
            overlapped = cluster.overlapped(node.name, group)
            if any(o.model == model for o in overlapped):
                skipped.add((node.name, group[0]))
                continue
            if idle_only and cluster.hosts_instance(node.name, group):
                continue
            group_set = frozenset(group)
            blocking = [o for o in overlapped if not (aligned and o.aligned) and not laminar_ok(group_set, o)]
            if any(o.is_instance or o.score >= score for o in blocking):
                continue
            if blocking:
                bound = score - sum(o.score for o in blocking)
            else:  # the greedy evicts at least each device's own prefix
                bound = score - max(cluster.eviction_cost_floor(node, node.gpus[d], need, score) for d in group)
            if bound <= 0 or (best is not None and -bound > best[0][0]):
                continue
            more = cluster.evictions_for_room(node.name, group, need, lambda o: o.score < score, forced=blocking)
            if more is None:
                continue
            gain = score - sum(o.score for o in blocking + more)
            key = (-gain, node.order, group[0])
            if gain > 0 and (best is None or key < best[0]):
                best = (key, node.name, group, blocking + more)
    if best is None:
        failures.add(tp, score, need, skipped if only is None else skipped & only)
        return []
    failures.forget()
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
