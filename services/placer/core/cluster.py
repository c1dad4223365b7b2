"""The core's working index of one snapshot: per node, per GPU, free pages and occupants.

Policies read candidates from it and apply their effects to it, so later decisions in the same
tick see earlier ones (incremental free memory). Built from each snapshot; a `Reuse` handle lets the
next build take over the previous one's nodes whose inputs are unchanged and that it left untouched
(the same index a fresh build gives, for callers that ask thousands of times, like the simulator).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Callable

from services.placer.core.node_inputs import FIGURES, LAYOUT, NodeInputs, node_inputs
from services.placer.core.scores import copy_pages, copy_scores, instance_pages, kv_lendable_pages
from services.placer.core.snapshot import PAGE_BYTES, Config, Copy, Instance, ModelSpec, Snapshot


@dataclass(eq=False)
class Occupant:
    """A copy or an instance holding weights on a TP group of one node."""

    model: str
    node: str
    devices: tuple[int, ...]
    pages: int  # weight pages per device
    instance: Instance | None = None  # set for instances
    ready: bool = True
    score: float = 0.0  # copies only: their current score
    kv_host: str = ""  # copies only: instance whose KV space holds them
    kv_devices: frozenset[int] = frozenset()  # devices where the copy's pages are KV space
    lendable: int = 0  # instances in a built index: the KV pages they could lend when last looked at
    slot: tuple[int, int] = (0, 0)  # built from a snapshot: (node order, position among its node's copies or instances)
    device_set: frozenset[int] = field(init=False)
    aligned: bool = field(init=False)  # a power-of-two group starting at a multiple of its size

    def __post_init__(self) -> None:
        self.device_set, self.aligned = device_facts(self.devices)

    @property
    def is_instance(self) -> bool:
        return self.instance is not None


SLOT = attrgetter("slot")


@dataclass(eq=False)
class GpuState:
    index: int
    free: int  # free pool pages
    kv_spare: int = 0  # pages of the hosting instance's idle KV space not yet lent
    host: Occupant | None = None  # the instance on this GPU, if any
    occupants: list[Occupant] = field(default_factory=list)
    instances: int = 0  # how many of the occupants are instances


@dataclass(eq=False)
class NodeState:
    name: str
    order: int  # position in the snapshot (deterministic tie-breaks)
    gpus: dict[int, GpuState]
    version: int = 0  # bumped on every change: caches keyed by it stay valid until then
    _summary: tuple[int, int, float, int] | None = None  # cache of the four below, dropped on change
    inputs: NodeInputs | None = None  # what it was built from: reusable while of the same layout
    built: tuple[list[Occupant], list[Occupant], int] = ([], [], 0)  # its instances, copies, version once built

    def _summarise(self) -> tuple[int, int, float, int]:
        if self._summary is None:
            gpus = self.gpus.values()
            self._summary = (max((max(g.free, g.kv_spare) for g in gpus), default=0),
                             max((g.free for g in gpus), default=0),
                             min((o.score for g in gpus for o in g.occupants if not o.is_instance),
                                 default=math.inf),
                             max((g.free for g in gpus if not g.instances), default=0))
        return self._summary

    def most_room(self) -> int:
        """The most pages any one GPU could still take (free pool or lendable KV space)."""
        return self._summarise()[0]

    def most_idle_free(self) -> int:
        """The most free pool pages on any one GPU without instances."""
        return self._summarise()[3]

    def eviction_floor(self, need: int) -> float:
        """A lower bound on the score evicted to fit `need` free pages on any group of this node:
        0 if some GPU has the room, else the lowest copy score here (inf without copies)."""
        _, most_free, lowest_score, _ = self._summarise()
        return 0.0 if most_free >= need else lowest_score

    def changed(self) -> None:
        self._summary = None
        self.version += 1


@functools.lru_cache(maxsize=1024)  # pure; indexes build thousands of occupants on a few device groups
def device_facts(devices: tuple[int, ...]) -> tuple[frozenset[int], bool]:
    return frozenset(devices), is_aligned(devices)


def is_aligned(devices: tuple[int, ...]) -> bool:
    size = len(devices)
    return size & (size - 1) == 0 and devices[0] % size == 0 and devices == tuple(range(devices[0], devices[0] + size))


def laminar_ok(group: frozenset[int], other: Occupant) -> bool:
    """TP groups stay laminar: same size = same group, smaller nests inside, larger contains.
    (Two overlapping aligned power-of-two groups always are: the fast path.)"""
    if other.aligned and len(group) & (len(group) - 1) == 0 and min(group) % len(group) == 0:
        return True
    if len(other.device_set) == len(group):
        return other.device_set == group
    if len(other.device_set) < len(group):
        return other.device_set <= group
    return group <= other.device_set


@dataclass
class Reuse:
    """Handle for reusing the index across builds: holds the last Cluster built with it, which the
    next build with the same handle takes apart (do not use that cluster afterwards)."""

    last: Cluster | None = None


class Cluster:
    def __init__(self, snapshot: Snapshot, config: Config, reuse: Reuse | None = None):
        self.config = config
        last = reuse.last if reuse else None
        same_specs = last is not None and last.specs is snapshot.models
        self.specs = snapshot.models
        self.models: dict[str, ModelSpec] = last.models if same_specs else {m.name: m for m in snapshot.models}
        self._groups: dict[str, dict[int, list[tuple[int, ...]]]] = {}  # node -> size -> aligned groups
        self.cache: dict[tuple, tuple[int, object]] = {}  # policies' per-node caches: key -> (node version, value)
        self.loads = snapshot.loads  # model -> windowed load (the autoscaler's input)
        previous = self._reusable(last, snapshot)
        # per consumer of per-model results (rescoring, placement's wants), the models whose spec, copies,
        # instances or copies' blocking changed since it last looked (see `changed_models`)
        self._changed: dict[str, set[str]] = previous._changed if previous else {}
        self.wants: dict[str, list] = previous.wants if previous else {}  # placement's per-model wants
        if previous is not None and not same_specs:
            for name, spec in self.models.items():
                if previous.models.get(name) != spec:
                    self.touch(name)
        self.nodes: dict[str, NodeState] = {}
        old_nodes, old_groups = (previous.nodes, previous._groups) if previous else ({}, {})
        built: list[NodeState] = []  # nodes built anew (their occupants replace the old nodes')
        for i, n in enumerate(snapshot.nodes):
            old = old_nodes.get(n.name)
            if old is None:
                built.append(self._build_node(i, node_inputs(n, self.models)))
                continue
            if n.name in old_groups and (old.inputs.node.gpus is n.gpus or tuple(old.gpus) == tuple(g.index for g in n.gpus)):
                self._groups[n.name] = old_groups[n.name]  # the same devices: the same aligned groups
            kept = old.order == i and old.version == old.built[2]
            if kept and old.inputs.node is n:
                self.nodes[n.name] = old
                old._summary = None  # its copies' scores are about to change
                continue
            new = node_inputs(n, self.models, old.inputs)
            change = new.change_from(old.inputs) if kept else LAYOUT
            if change == LAYOUT:
                for model in {o.model for g in old.gpus.values() for o in g.occupants}:
                    self.touch(model)  # its occupants leave the index
                built.append(self._build_node(i, new))
                continue
            self.nodes[n.name] = old
            if change == FIGURES:
                self._refresh_instances(old, new)
            old.inputs = new
            old._summary = None
        # per model its instances and copies, in snapshot order
        self.instances: dict[str, list[Occupant]] = previous.instances if previous else {}
        self.copies: dict[str, list[Occupant]] = previous.copies if previous else {}
        if previous is None:
            self._index(built, set(self.models))
        else:
            gone = {name for name in old_nodes if self.nodes.get(name) is not old_nodes[name]}
            models = {o.model for name in gone for g in old_nodes[name].gpus.values() for o in g.occupants}
            models.update(o.model for node in built for kind in node.built[:2] for o in kind)
            self._index(built, models, gone)
        if reuse is not None:
            reuse.last = self

    def _index(self, built: list[NodeState], models: set[str], gone: frozenset[str] | set[str] = frozenset()) -> None:
        """Index `models`' occupants by model in snapshot order (node, then its built order): those
        on `gone` nodes leave, those of `built` nodes come."""
        coming: tuple[dict[str, list[Occupant]], dict[str, list[Occupant]]] = ({}, {})
        for node in built:
            for kind in (0, 1):
                for occ in node.built[kind]:
                    coming[kind].setdefault(occ.model, []).append(occ)
        for kind, index in ((0, self.instances), (1, self.copies)):
            for model in models:
                staying = [o for o in index.get(model, ()) if o.node not in gone]
                new = coming[kind].get(model)
                if new:
                    staying = sorted(staying + new, key=SLOT) if staying else new
                if staying:
                    index[model] = staying
                else:
                    index.pop(model, None)

    def _reusable(self, previous: Cluster | None, snapshot: Snapshot) -> Cluster | None:
        """The previous cluster if its nodes can be taken over: same config and model shapes."""
        if previous is None or len(previous.nodes) != len(snapshot.nodes) or \
                not (previous.config is self.config or previous.config == self.config):
            return None
        if previous.models is self.models:
            return previous
        same = previous.models.keys() == self.models.keys() and \
            all((m.size_bytes, m.tp) == (p.size_bytes, p.tp) for m, p in zip(self.models.values(), previous.models.values()))
        return previous if same else None

    def _build_node(self, order: int, inputs: NodeInputs) -> NodeState:
        n = inputs.node
        node = NodeState(n.name, order, {g.index: GpuState(g.index, pages_floor(g.free_bytes)) for g in n.gpus})
        self.nodes[n.name] = node
        hosts = [self._attach(Occupant(inst.model, inst.node, inst.devices, copy_pages(self.models[inst.model]),
                                       instance=inst, ready=inst.ready), index=False) for inst in inputs.instances]
        held = [self._attach(self._copy_occupant(c, inputs.is_hosted(k)), index=False) for k, c in enumerate(inputs.copies)]
        node.built = (hosts, held, node.version)
        for kind in node.built[:2]:
            for k, occ in enumerate(kind):
                occ.slot = (order, k)
        for occ in hosts:
            self._lend_kv(occ)  # each GPU's host: the first instance on it in snapshot order
        for occ in held:
            for d in occ.kv_devices:  # observed free memory already counts pool copies, not lent KV
                node.gpus[d].kv_spare -= occ.pages
        node.inputs = inputs
        return node

    def _refresh_instances(self, node: NodeState, inputs: NodeInputs) -> None:
        """Same occupants, new instance figures (requests, KV use, state): which instance hosts
        each GPU stays, what it can lend moves its GPUs' spare KV pages by the difference."""
        hosts, _, _ = node.built
        for occ, inst in zip(hosts, inputs.instances):
            if occ.instance is not inst:
                if occ.instance.draining != inst.draining:
                    self.touch(occ.model)  # it stops (or starts again) counting as capacity
                lendable = self._lendable(inst)
                change, occ.lendable = lendable - occ.lendable, lendable
                occ.instance, occ.ready = inst, inst.ready
                for d in occ.devices if change else ():
                    gpu = node.gpus.get(d)
                    if gpu is not None and gpu.host is occ:
                        gpu.kv_spare += change

    def _copy_occupant(self, c: Copy, hosted: bool) -> Occupant:
        return Occupant(c.model, c.node, c.devices, copy_pages(self.models[c.model]), ready=c.ready,
                        kv_host=c.kv_host if hosted else "", kv_devices=frozenset(c.devices) if hosted else frozenset())

    def _lendable(self, inst: Instance) -> int:
        if not self.config.kv_prewarm or inst.draining:
            return 0
        return kv_lendable_pages(inst.kv_capacity_bytes, inst.inflight, inst.kv_used_bytes, self.config.capacity)

    def _lend_kv(self, occ: Occupant) -> None:
        lendable = occ.lendable = self._lendable(occ.instance)
        for d in occ.devices:
            gpu = self.gpu(occ.node, d)
            if gpu and gpu.host is None:
                gpu.host, gpu.kv_spare = occ, lendable

    # ------------------------------------------------------------ queries

    def gpu(self, node: str, index: int) -> GpuState | None:
        return self.nodes[node].gpus.get(index)

    def groups(self, node: NodeState, size: int) -> list[tuple[int, ...]]:
        """Aligned TP groups of `size` devices: they start at multiples of `size`."""
        by_size = self._groups.setdefault(node.name, {})
        if size not in by_size:
            starts = sorted(i for i in node.gpus if i % size == 0)
            by_size[size] = [g for g in (tuple(range(s, s + size)) for s in starts) if all(i in node.gpus for i in g)]
        return by_size[size]

    def overlapped(self, node: str, devices: tuple[int, ...]) -> list[Occupant]:
        """Copies and instances on any of `devices`, each once (do not mutate the result)."""
        gpus = self.nodes[node].gpus
        if len(devices) == 1:
            return gpus[devices[0]].occupants
        seen: list[Occupant] = []
        for d in devices:
            seen += [occ for occ in gpus[d].occupants if occ not in seen]
        return seen

    def serving(self, model: str) -> list[Occupant]:
        """Instances of `model` that count as capacity (running or starting, not draining)."""
        occupants = self.instances.get(model)
        return [o for o in occupants if not o.instance.draining] if occupants else []

    def room(self, node: str, devices: tuple[int, ...], need: int) -> Occupant | bool:
        """Where `need` pages per device fit: True (free pool), the instance whose idle KV space
        holds them (one host covering every device), or False (no room)."""
        if len(devices) == 1:
            gpu = self.nodes[node].gpus[devices[0]]
            return True if gpu.free >= need else gpu.host if gpu.host is not None and gpu.kv_spare >= need else False
        gpus = [self.nodes[node].gpus[d] for d in devices]
        if all(g.free >= need for g in gpus):
            return True
        host = gpus[0].host
        if host is not None and all(g.host is host and g.kv_spare >= need for g in gpus):
            return host
        return False

    def evictions_for_room(self, node: str, devices: tuple[int, ...], need: int,
                           may_evict: Callable[[Occupant], bool],
                           forced: list[Occupant] | None = None) -> list[Occupant] | None:
        """Copies to evict (after the `forced` ones), lowest score first and only where room is
        lacking, so that `need` free pool pages fit on every device; None if they cannot."""
        free = {d: self.nodes[node].gpus[d].free for d in devices}
        forced = forced or []

        def credit(occ: Occupant) -> None:
            for d in occ.device_set - occ.kv_devices:
                if d in free:
                    free[d] += occ.pages

        for occ in forced:
            credit(occ)
        candidates = sorted((o for o in self.overlapped(node, devices)
                             if not o.is_instance and o not in forced and may_evict(o)),
                            key=lambda o: (o.score, o.devices))
        chosen: list[Occupant] = []
        for occ in candidates:
            lacking = {d for d, f in free.items() if f < need}
            if not lacking:
                break
            if occ.device_set & lacking:
                chosen.append(occ)
                credit(occ)
        return chosen if all(f >= need for f in free.values()) else None

    def copies_by_score(self, node: NodeState, gpu: GpuState) -> list[Occupant]:
        """The copies on `gpu` in eviction order (lowest score first), cached until the node changes."""
        key = ("by_score", node.name, gpu.index)
        cached = self.cache.get(key)
        if cached is None or cached[0] != node.version:
            cached = (node.version, sorted((o for o in gpu.occupants if not o.is_instance),
                                           key=lambda o: (o.score, o.devices)))
            self.cache[key] = cached
        return cached[1]

    def eviction_cost_floor(self, node: NodeState, gpu: GpuState, need: int, below: float) -> float:
        """The score evictions_for_room evicts from `gpu` alone to give it `need` free pages when
        only copies scoring under `below` may go (inf: they cannot): a lower bound for any group
        holding `gpu`, as that greedy takes exactly this prefix while `gpu` lacks room."""
        free, cost = gpu.free, 0.0
        if free >= need:
            return cost
        for occ in self.copies_by_score(node, gpu):
            if occ.score >= below:
                break
            cost += occ.score
            if gpu.index not in occ.kv_devices:
                free += occ.pages
            if free >= need:
                return cost
        return math.inf

    def hosts_instance(self, node: str, devices: tuple[int, ...]) -> bool:
        """Some instance (running, starting or draining) holds one of `devices`."""
        gpus = self.nodes[node].gpus
        return any(gpus[d].instances for d in devices)

    def blocked(self, copy: Occupant) -> bool:
        """A copy that cannot be promoted now: it shares a GPU with an instance (or its KV space)."""
        return bool(copy.kv_host) or self.hosts_instance(copy.node, copy.devices)

    def pages_without_occupants(self, node: str, index: int) -> int:
        """Free pages GPU `index` would have with every copy and instance on it gone."""
        gpu = self.nodes[node].gpus[index]
        held = sum(o.pages for o in gpu.occupants if index not in o.kv_devices)
        return gpu.free + held + sum(instance_pages(self.models[o.model]) for o in gpu.occupants if o.is_instance)

    def rescore(self) -> None:
        """Existing copies keep the score of their rank (ready first; with promotable_copies on,
        blocked copies last); ranks past n_f + n_b score 0. Only models changed since the last
        rescore are ranked again."""
        nodes = self.nodes
        blocked_last = self.config.promotable_copies
        for name in self.changed_models("scores"):
            occs = self.copies.get(name)
            if not occs:
                continue
            scores = copy_scores(self.models[name], len(self.serving(name)), self.config)
            blocked = [self.blocked(o) for o in occs] if blocked_last else [False] * len(occs)
            ranked = occs if len(occs) == 1 else \
                [o for _, o in sorted(zip(blocked, occs),
                                      key=lambda bo: (bo[0], not bo[1].ready, nodes[bo[1].node].order, bo[1].devices))]
            for rank, occ in enumerate(ranked):
                occ.score = scores[rank][0] if rank < len(scores) else 0.0

    def changed_models(self, consumer: str) -> set[str]:
        """The models `consumer` must look at again: every model the first time, then those touched
        since its last call (taken: the next call starts empty)."""
        changed = self._changed.get(consumer)
        self._changed[consumer] = set()
        return set(self.models) if changed is None else changed

    def touch(self, model: str) -> None:
        """`model`'s spec, copies, instances or the blocking of its copies changed."""
        for changed in self._changed.values():
            changed.add(model)

    # ------------------------------------------------------------ changes

    def _attach(self, occ: Occupant, index: bool = True) -> Occupant:
        self._touch_around(occ)
        for d in occ.devices:
            gpu = self.nodes[occ.node].gpus[d]
            gpu.occupants.append(occ)
            gpu.instances += occ.is_instance
        if index:
            (self.instances if occ.is_instance else self.copies).setdefault(occ.model, []).append(occ)
        return occ

    def _detach(self, occ: Occupant) -> None:
        self._touch_around(occ)
        for d in occ.devices:
            gpu = self.nodes[occ.node].gpus[d]
            gpu.occupants.remove(occ)
            gpu.instances -= occ.is_instance
        (self.instances if occ.is_instance else self.copies)[occ.model].remove(occ)

    def _touch_around(self, occ: Occupant) -> None:
        """`occ` comes or goes: its node and model change, and so does the blocking of the copies
        sharing a GPU with it if it is an instance."""
        node = self.nodes[occ.node]
        node.changed()
        self.touch(occ.model)
        if occ.is_instance:
            for d in occ.devices:
                for other in node.gpus[d].occupants:
                    self.touch(other.model)

    def add_copy(self, model: str, node: str, devices: tuple[int, ...], score: float,
                 host: Occupant | None = None) -> Occupant:
        """A new (loading) copy in free pool pages, or in `host`'s idle KV space."""
        occ = Occupant(model, node, devices, copy_pages(self.models[model]), ready=False, score=score,
                       kv_host=host.instance.instance_id if host else "",
                       kv_devices=frozenset(devices) if host else frozenset())
        self._take(occ, occ.pages)
        self._attach(occ)
        return occ

    def evict(self, occ: Occupant) -> None:
        self._detach(occ)
        self._take(occ, -occ.pages)

    def _take(self, occ: Occupant, amount: int) -> None:
        self.nodes[occ.node].changed()
        for d in occ.devices:
            gpu = self.nodes[occ.node].gpus[d]
            if d in occ.kv_devices:
                gpu.kv_spare -= amount
            else:
                gpu.free -= amount

    def start_instance(self, model: str, node: str, devices: tuple[int, ...], instance: Instance,
                       from_copy: Occupant | None) -> Occupant:
        """Promote `from_copy` (or cold-load) into an instance; its KV cache comes from free pages."""
        if from_copy is not None:
            self.evict(from_copy)
        occ = Occupant(model, node, devices, copy_pages(self.models[model]), instance=instance, ready=False)
        kv = instance_pages(self.models[model])
        for d in devices:
            self.nodes[node].gpus[d].free -= occ.pages + kv
        self._attach(occ)  # also drops the node's room cache
        return occ

    def demote(self, occ: Occupant) -> Occupant:
        """The instance drains; its weights stay as a ready copy (its KV is freed only later, and a
        draining instance lends none of it)."""
        self._detach(occ)
        for d in occ.devices:
            gpu = self.nodes[occ.node].gpus[d]
            if gpu.host is occ:
                gpu.host, gpu.kv_spare = None, 0
        copy = Occupant(occ.model, occ.node, occ.devices, occ.pages, ready=True)
        self._attach(copy)
        return copy

    def displace(self, occ: Occupant, keep: list[Occupant]) -> Occupant:
        """Demote an instance whose GPUs go to another model: its KV and engine memory count as
        free at once, as the node's later commands wait for its drain; the copies in `keep`,
        the only ones left in its KV space, move to pool memory (as agents keep them)."""
        copy = self.demote(occ)
        freed = instance_pages(self.models[occ.model])
        for d in occ.devices:
            self.nodes[occ.node].gpus[d].free += freed
        for kept in keep:
            self.touch(kept.model)
            kept.kv_host, kept.kv_devices = "", frozenset()
            for d in kept.devices:
                self.nodes[occ.node].gpus[d].free -= kept.pages
        self.nodes[occ.node].changed()
        return copy


def pages_floor(nbytes: int) -> int:
    """Whole free pages in `nbytes` (free memory rounds down, usage rounds up)."""
    return max(0, nbytes) // PAGE_BYTES
