"""Effects applied to a snapshot: the cluster once agents have accepted them (new instances still
starting). Idempotent, so the service can overlay commands in flight on observed state that may
already show them; the simulator and property tests advance snapshots with it.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

from services.placer.core import effects as fx
from services.placer.core.scores import copy_pages, instance_pages
from services.placer.core.snapshot import PAGE_BYTES, Copy, Gpu, Instance, Node, Snapshot


def apply_effects(snapshot: Snapshot, effects: Iterable[fx.Effect], now_s: float) -> Snapshot:
    effects = list(effects)
    models = {m.name: m for m in snapshot.models}
    copies = _Copies(snapshot.copies, {e.node for e in effects})
    instances = {i.instance_id: i for i in snapshot.instances}
    by_name = {n.name: n for n in snapshot.nodes}
    free: dict[tuple[str, int], int] = {}  # the GPUs of the nodes the effects touch (others stay as they are)
    touched: set[str] = set()

    def known(node: str, device: int) -> bool:
        if node in by_name and node not in touched:
            touched.add(node)
            free.update({(node, g.index): g.free_bytes for g in by_name[node].gpus})
        return (node, device) in free

    def take(node: str, devices: tuple[int, ...], nbytes: int) -> None:
        for d in devices:
            known(node, d)
            free[(node, d)] -= nbytes

    for e in effects:
        if e.model not in models or not known(e.node, e.devices[0]):
            continue
        weight = copy_pages(models[e.model]) * PAGE_BYTES
        if isinstance(e, fx.Prewarm):
            if copies.find(e.model, e.node, e.devices) is None:
                copies.add(Copy(e.model, e.node, e.devices, ready=True, kv_host=e.kv_host))
                take(e.node, e.devices, 0 if e.kv_host else weight)
        elif isinstance(e, fx.Evict):
            gone = copies.find(e.model, e.node, e.devices)
            if gone is not None:
                copy = copies.remove(gone)
                take(copy.node, copy.devices, 0 if copy.kv_host else -weight)
        elif isinstance(e, (fx.Promote, fx.ColdStart)) and e.instance_id not in instances:
            found = copies.find(e.model, e.node, e.devices) if isinstance(e, fx.Promote) else None
            if found is not None:
                copies.remove(found)
            take(e.node, e.devices, (0 if found is not None else weight) + instance_pages(models[e.model]) * PAGE_BYTES)
            instances[e.instance_id] = Instance(e.instance_id, e.model, e.node, e.devices, started_at_s=now_s,
                                                kv_capacity_bytes=e.kv_bytes, ready=False)
        elif isinstance(e, fx.Demote) and e.instance_id in instances:
            gone = instances.pop(e.instance_id)
            hosted = copies.move_to_pool(e.instance_id)
            for d in gone.devices:  # each device's lent copies move to its pool; its KV is freed
                lent = sum(copy_pages(models[c.model]) for c in hosted if d in c.devices) * PAGE_BYTES
                take(gone.node, (d,), lent - instance_pages(models[gone.model]) * PAGE_BYTES)
            copies.add(Copy(gone.model, gone.node, gone.devices, ready=True))
    nodes = tuple(Node(n.name, tuple(Gpu(g.index, free[(n.name, g.index)]) for g in n.gpus))
                  if n.name in touched else n for n in snapshot.nodes)
    return dataclasses.replace(snapshot, nodes=nodes, copies=copies.in_order(), instances=tuple(instances.values()))


class _Copies:
    """The snapshot's copies in order, with new ones appended, found by model and node (and by the
    instance whose KV space they use) without scanning them all; only copies on `nodes` (those the
    effects name) are indexed."""

    def __init__(self, copies: tuple[Copy, ...], nodes: set[str]):
        self.by_key: dict[int, Copy] = dict(enumerate(copies))  # key order = snapshot order, then added ones
        self.next_key = len(copies)
        self.by_place: dict[tuple[str, str], list[int]] = {}
        self.lent: dict[str, list[int]] = {}  # kv_host -> keys
        for k, c in self.by_key.items():
            if c.node in nodes:
                self._index(k, c)

    def _index(self, k: int, c: Copy) -> None:
        self.by_place.setdefault((c.model, c.node), []).append(k)
        if c.kv_host:
            self.lent.setdefault(c.kv_host, []).append(k)

    def find(self, model: str, node: str, devices: tuple[int, ...]) -> int | None:
        """The key of the first copy of `model` on `node` overlapping `devices`."""
        wanted = set(devices)
        return next((k for k in self.by_place.get((model, node), ())
                     if wanted.intersection(self.by_key[k].devices)), None)

    def add(self, copy: Copy) -> None:
        self.by_key[self.next_key] = copy
        self._index(self.next_key, copy)
        self.next_key += 1

    def remove(self, k: int) -> Copy:
        copy = self.by_key.pop(k)
        self.by_place[(copy.model, copy.node)].remove(k)
        if copy.kv_host:
            self.lent[copy.kv_host].remove(k)
        return copy

    def move_to_pool(self, instance_id: str) -> list[Copy]:
        """The copies in `instance_id`'s KV space, as they were; they now count as pool copies."""
        keys = self.lent.pop(instance_id, [])
        hosted = [self.by_key[k] for k in keys]
        for k, c in zip(keys, hosted):
            self.by_key[k] = dataclasses.replace(c, kv_host="")
        return hosted

    def in_order(self) -> tuple[Copy, ...]:
        return tuple(self.by_key.values())
