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
    models = {m.name: m for m in snapshot.models}
    by_name = {n.name: n for n in snapshot.nodes}
    changed: dict[str, _NodeOverlay] = {}  # the nodes the effects touch (others stay the same objects)
    for e in effects:
        node = by_name.get(e.node)
        retiring = e.model not in models and isinstance(e, (fx.Demote, fx.Evict))
        if node is None or (e.model not in models and not retiring):
            continue
        on = changed.get(e.node)
        if on is None:
            on = changed[e.node] = _NodeOverlay(node)
        if e.devices[0] not in on.free:
            continue
        if retiring:  # an unregistered model's: gone (or draining), its memory freed once its agent says so
            on.retire(e)
            continue
        weight = copy_pages(models[e.model]) * PAGE_BYTES
        if isinstance(e, fx.Prewarm):
            if on.copies.find(e.model, e.devices) is None:
                on.copies.add(Copy(e.model, e.node, e.devices, ready=True, kv_host=e.kv_host))
                on.take(e.devices, 0 if e.kv_host else weight)
        elif isinstance(e, fx.Evict):
            gone = on.copies.find(e.model, e.devices)
            if gone is not None:
                copy = on.copies.remove(gone)
                on.take(copy.devices, 0 if copy.kv_host else -weight)
        elif isinstance(e, (fx.Promote, fx.ColdStart)) and e.instance_id not in on.instances:
            found = on.copies.find(e.model, e.devices) if isinstance(e, fx.Promote) else None
            if found is not None:
                on.copies.remove(found)
            on.take(e.devices, (0 if found is not None else weight) + instance_pages(models[e.model]) * PAGE_BYTES)
            on.instances[e.instance_id] = Instance(e.instance_id, e.model, e.node, e.devices, started_at_s=now_s,
                                                   kv_capacity_bytes=e.kv_bytes, ready=False)
        elif isinstance(e, fx.Demote) and e.instance_id in on.instances:
            gone = on.instances.pop(e.instance_id)
            hosted = on.copies.move_to_pool(e.instance_id)
            for d in gone.devices:  # each device's lent copies move to its pool; its KV is freed
                lent = sum(copy_pages(models[c.model]) for c in hosted if d in c.devices) * PAGE_BYTES
                on.take((d,), lent - instance_pages(models[gone.model]) * PAGE_BYTES)
            on.copies.add(Copy(gone.model, gone.node, gone.devices, ready=True))
    if not changed:
        return snapshot
    nodes = tuple(changed[n.name].node() if n.name in changed else n for n in snapshot.nodes)
    return dataclasses.replace(snapshot, nodes=nodes)


class _NodeOverlay:
    """One node's GPUs' free bytes, copies and instances as effects change them."""

    def __init__(self, node: Node):
        self.name, self.gpus = node.name, node.gpus
        self.free = {g.index: g.free_bytes for g in node.gpus}
        self.copies = _Copies(node.copies)
        self.instances = {i.instance_id: i for i in node.instances}

    def retire(self, e: fx.Demote | fx.Evict) -> None:
        if isinstance(e, fx.Evict):
            found = self.copies.find(e.model, e.devices)
            if found is not None:
                self.copies.remove(found)
        elif e.instance_id in self.instances:
            self.instances[e.instance_id] = dataclasses.replace(self.instances[e.instance_id], draining=True)

    def take(self, devices: tuple[int, ...], nbytes: int) -> None:
        for d in devices:
            self.free[d] -= nbytes

    def node(self) -> Node:
        return Node(self.name, tuple(Gpu(g.index, self.free[g.index]) for g in self.gpus),
                    tuple(self.instances.values()), self.copies.in_order())


class _Copies:
    """A node's copies in order, with new ones appended, found by model (and by the instance whose
    KV space they use) without scanning them all."""

    def __init__(self, copies: tuple[Copy, ...]):
        self.by_key: dict[int, Copy] = dict(enumerate(copies))  # key order = snapshot order, then added ones
        self.next_key = len(copies)
        self.by_model: dict[str, list[int]] = {}
        self.lent: dict[str, list[int]] = {}  # kv_host -> keys
        for k, c in self.by_key.items():
            self._index(k, c)

    def _index(self, k: int, c: Copy) -> None:
        self.by_model.setdefault(c.model, []).append(k)
        if c.kv_host:
            self.lent.setdefault(c.kv_host, []).append(k)

    def find(self, model: str, devices: tuple[int, ...]) -> int | None:
        """The key of the first copy of `model` overlapping `devices`."""
        wanted = set(devices)
        return next((k for k in self.by_model.get(model, ()) if wanted.intersection(self.by_key[k].devices)), None)

    def add(self, copy: Copy) -> None:
        self.by_key[self.next_key] = copy
        self._index(self.next_key, copy)
        self.next_key += 1

    def remove(self, k: int) -> Copy:
        copy = self.by_key.pop(k)
        self.by_model[copy.model].remove(k)
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
