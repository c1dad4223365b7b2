"""What each node of the core's index is built from: its GPUs, its instances and copies of known
models (snapshot order) and which copies lie inside the devices of the instance whose KV space
they name. Two inputs with the same layout build the same node up to the instances' figures
(requests, KV use, state); the same snapshot node object builds the same node.
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter, is_
from typing import Sequence, TypeVar

from services.placer.core.snapshot import Copy, Instance, Node

MODEL, KV_HOST = attrgetter("model"), attrgetter("kv_host")
SHAPE = attrgetter("instance_id", "model", "devices")  # what of an instance its node's layout holds
SAME, FIGURES, LAYOUT = range(3)  # how a node's inputs differ from those it was built from
Item = TypeVar("Item", Instance, Copy)


@dataclass(eq=False, slots=True)
class NodeInputs:
    node: Node
    instances: Sequence[Instance]
    copies: Sequence[Copy]
    hosted: tuple[bool, ...]  # per copy: inside its named KV host's devices (empty: none names one)

    def is_hosted(self, k: int) -> bool:
        return bool(self.hosted) and self.hosted[k]

    def change_from(self, old: NodeInputs) -> int:
        """SAME: the very objects of `old`; FIGURES: its layout (GPUs, copies, instances' ids,
        models and devices) with new instance figures; LAYOUT: anything else."""
        if not ((self.node.gpus is old.node.gpus or self.node.gpus == old.node.gpus)
                and (self.copies is old.copies or self.copies == old.copies) and self.hosted == old.hosted
                and len(self.instances) == len(old.instances)):
            return LAYOUT
        if all(map(is_, self.instances, old.instances)):
            return SAME
        return FIGURES if list(map(SHAPE, self.instances)) == list(map(SHAPE, old.instances)) else LAYOUT


def node_inputs(node: Node, models: dict, old: NodeInputs | None = None) -> NodeInputs:
    """`node`'s inputs; given the inputs of the node it replaces, the parts whose snapshot objects
    are the same are taken over (copies, and which of them are hosted while instance shapes stay)."""
    instances = known(node.instances, models)
    if old is not None and node.copies is old.node.copies and \
            list(map(SHAPE, instances)) == list(map(SHAPE, old.instances)):
        return NodeInputs(node, instances, old.copies, old.hosted)
    copies = known(node.copies, models)
    hosted: tuple[bool, ...] = ()
    if any(map(KV_HOST, copies)):
        by_id = {i.instance_id: i for i in instances}
        hosts = map(by_id.get, map(KV_HOST, copies))
        hosted = tuple(host is not None and frozenset(c.devices) <= frozenset(host.devices)
                       for c, host in zip(copies, hosts))
    return NodeInputs(node, instances, copies, hosted)


def known(items: Sequence[Item], models: dict) -> Sequence[Item]:
    """The items of known models, in order."""
    if models.keys() >= set(map(MODEL, items)):
        return items
    return tuple(i for i in items if i.model in models)
