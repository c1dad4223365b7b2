"""Effects applied to a snapshot: the state the cluster reaches once agents have executed them.

The service overlays effects its agents have not reported yet; the simulator and the property
tests advance a snapshot with it. Memory follows the core's accounting in 2 MiB pages.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

from services.placer.core import effects as fx
from services.placer.core.scores import copy_pages, pages
from services.placer.core.snapshot import PAGE_BYTES, Copy, Gpu, Instance, Node, Snapshot


def apply_effects(snapshot: Snapshot, effects: Iterable[fx.Effect], now_s: float) -> Snapshot:
    models = {m.name: m for m in snapshot.models}
    copies = list(snapshot.copies)
    instances = list(snapshot.instances)
    free = {(n.name, g.index): g.free_bytes for n in snapshot.nodes for g in n.gpus}

    def take(node: str, devices: tuple[int, ...], nbytes: int) -> None:
        for d in devices:
            free[(node, d)] -= nbytes

    def pop_copy(model: str, node: str, devices: tuple[int, ...]) -> Copy | None:
        for i, c in enumerate(copies):
            if (c.model, c.node, c.devices) == (model, node, devices):
                return copies.pop(i)
        return None

    for e in effects:
        weight = copy_pages(models[e.model]) * PAGE_BYTES
        if isinstance(e, fx.Prewarm):
            copies.append(Copy(e.model, e.node, e.devices, ready=True, kv_host=e.kv_host))
            if not e.kv_host:
                take(e.node, e.devices, weight)
        elif isinstance(e, fx.Evict):
            gone = pop_copy(e.model, e.node, e.devices)
            if gone is not None and not gone.kv_host:
                take(e.node, e.devices, -weight)
        elif isinstance(e, (fx.Promote, fx.ColdStart)):
            if isinstance(e, fx.Promote):
                pop_copy(e.model, e.node, e.devices)
                weight = 0
            take(e.node, e.devices, weight + pages(e.kv_bytes) * PAGE_BYTES)
            instances.append(Instance(e.instance_id, e.model, e.node, e.devices, started_at_s=now_s,
                                      kv_capacity_bytes=e.kv_bytes, ready=True))
        elif isinstance(e, fx.Demote):
            gone = next(i for i in instances if i.instance_id == e.instance_id)
            instances.remove(gone)
            hosted = [c for c in copies if c.kv_host == e.instance_id]
            lent = sum(copy_pages(models[c.model]) for c in hosted) * PAGE_BYTES
            take(e.node, e.devices, lent - pages(gone.kv_capacity_bytes) * PAGE_BYTES)
            copies = [dataclasses.replace(c, kv_host="") if c.kv_host == e.instance_id else c for c in copies]
            copies.append(Copy(e.model, e.node, e.devices, ready=True))
    nodes = tuple(Node(n.name, tuple(Gpu(g.index, free[(n.name, g.index)]) for g in n.gpus)) for n in snapshot.nodes)
    return dataclasses.replace(snapshot, nodes=nodes, copies=tuple(copies), instances=tuple(instances))
