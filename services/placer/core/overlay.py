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
    copies = list(snapshot.copies)
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

    def find_copy(model: str, node: str, devices: tuple[int, ...]) -> Copy | None:
        return next((c for c in copies if (c.model, c.node) == (model, node) and set(c.devices) & set(devices)), None)

    for e in effects:
        if e.model not in models or not known(e.node, e.devices[0]):
            continue
        weight = copy_pages(models[e.model]) * PAGE_BYTES
        if isinstance(e, fx.Prewarm):
            if find_copy(e.model, e.node, e.devices) is None:
                copies.append(Copy(e.model, e.node, e.devices, ready=True, kv_host=e.kv_host))
                take(e.node, e.devices, 0 if e.kv_host else weight)
        elif isinstance(e, fx.Evict):
            gone = find_copy(e.model, e.node, e.devices)
            if gone is not None:
                copies.remove(gone)
                take(gone.node, gone.devices, 0 if gone.kv_host else -weight)
        elif isinstance(e, (fx.Promote, fx.ColdStart)) and e.instance_id not in instances:
            copy = find_copy(e.model, e.node, e.devices) if isinstance(e, fx.Promote) else None
            if copy is not None:
                copies.remove(copy)
            take(e.node, e.devices, (0 if copy else weight) + instance_pages(models[e.model]) * PAGE_BYTES)
            instances[e.instance_id] = Instance(e.instance_id, e.model, e.node, e.devices, started_at_s=now_s,
                                                kv_capacity_bytes=e.kv_bytes, ready=False)
        elif isinstance(e, fx.Demote) and e.instance_id in instances:
            gone = instances.pop(e.instance_id)
            hosted = [c for c in copies if c.kv_host == e.instance_id]
            lent = sum(copy_pages(models[c.model]) for c in hosted) * PAGE_BYTES
            take(gone.node, gone.devices, lent - instance_pages(models[gone.model]) * PAGE_BYTES)
            copies = [dataclasses.replace(c, kv_host="") if c.kv_host == e.instance_id else c for c in copies]
            copies.append(Copy(gone.model, gone.node, gone.devices, ready=True))
    nodes = tuple(Node(n.name, tuple(Gpu(g.index, free[(n.name, g.index)]) for g in n.gpus))
                  if n.name in touched else n for n in snapshot.nodes)
    return dataclasses.replace(snapshot, nodes=nodes, copies=tuple(copies), instances=tuple(instances.values()))
