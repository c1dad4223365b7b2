"""What each node of the core's index is built from, grouped from a snapshot: its GPUs, its
instances and copies (snapshot order), which copies lie inside the devices of the instance whose
KV space they name, and the order in which its instances claim GPUs to lend KV space (by their
model's rank: the position of its first instance in the snapshot). Two inputs with the same layout
build the same node up to the instances' figures (requests, KV use, state). The grouping runs
mostly in C (sorts and maps), as the simulator groups thousands of snapshots.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from itertools import groupby
from operator import attrgetter, is_
from typing import Sequence, TypeVar

from services.placer.core.snapshot import Copy, Instance, Node, Snapshot

NODE, MODEL, KV_HOST, INSTANCE_ID, DEVICES = (attrgetter(a) for a in ("node", "model", "kv_host", "instance_id", "devices"))
SHAPE = attrgetter("instance_id", "model", "devices")  # what of an instance its node's layout holds
SAME, FIGURES, LAYOUT = range(3)  # how a node's inputs differ from those it was built from
Item = TypeVar("Item", Instance, Copy)


@dataclass(eq=False, slots=True)
class NodeInputs:
    node: Node
    instances: list[Instance] = field(default_factory=list)
    copies: list[Copy] = field(default_factory=list)
    hosted: tuple[bool, ...] = ()  # per copy: inside its named KV host's devices (empty: none names one)
    lending: tuple[int, ...] = ()  # positions in `instances` in KV lending order (where two share a GPU)

    def lending_order(self) -> tuple[int, ...] | range:
        return self.lending or range(len(self.instances))

    def is_hosted(self, k: int) -> bool:
        return bool(self.hosted) and self.hosted[k]

    def change_from(self, old: NodeInputs) -> int:
        """SAME: the very objects of `old`; FIGURES: its layout (GPUs, copies, lending order,
        instances' ids, models and devices) with new instance figures; LAYOUT: anything else."""
        if not ((self.node is old.node or self.node == old.node) and self.copies == old.copies
                and self.hosted == old.hosted and self.lending == old.lending
                and len(self.instances) == len(old.instances)):
            return LAYOUT
        if all(map(is_, self.instances, old.instances)):
            return SAME
        return FIGURES if list(map(SHAPE, self.instances)) == list(map(SHAPE, old.instances)) else LAYOUT


def known(items: Sequence[Item], models: dict, nodes: dict) -> Sequence[Item]:
    """The items of known models on known nodes, in order."""
    if models.keys() >= set(map(MODEL, items)) and nodes.keys() >= set(map(NODE, items)):
        return items
    return [i for i in items if i.model in models and i.node in nodes]


def group_by_node(snapshot: Snapshot, models: dict) -> tuple[dict[str, NodeInputs], Sequence[Instance], Sequence[Copy]]:
    """Per node its inputs; and the instances and copies on known nodes of known models (snapshot order)."""
    inputs = {n.name: NodeInputs(n) for n in snapshot.nodes}
    instances, copies = known(snapshot.instances, models, inputs), known(snapshot.copies, models, inputs)
    for name, on_node in groupby(sorted(instances, key=NODE), NODE):  # stable: snapshot order per node
        inputs[name].instances = list(on_node)
    for name, on_node in groupby(sorted(copies, key=NODE), NODE):
        inputs[name].copies = list(on_node)
    by_id = dict(zip(map(INSTANCE_ID, instances), instances)) if any(map(KV_HOST, copies)) else {}
    rank: dict[str, int] = {}
    for on in inputs.values():
        if by_id and any(map(KV_HOST, on.copies)):
            hosts = map(by_id.get, map(KV_HOST, on.copies))
            on.hosted = tuple(host is not None and frozenset(c.devices) <= frozenset(host.devices)
                              for c, host in zip(on.copies, hosts))
        if len(on.instances) > 1 and _shared_gpu(tuple(map(DEVICES, on.instances))):  # else any order lends alike
            rank = rank or {m: r for r, m in enumerate(dict.fromkeys(map(MODEL, instances)))}
            on.lending = tuple(sorted(range(len(on.instances)), key=lambda k: rank[on.instances[k].model]))
    return inputs, instances, copies


@functools.lru_cache(maxsize=4096)  # pure; nodes keep their instances' devices across many snapshots
def _shared_gpu(devices: tuple[tuple[int, ...], ...]) -> bool:
    return len(set().union(*devices)) < sum(map(len, devices))
