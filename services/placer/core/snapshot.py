"""Inputs of the placer core: a frozen snapshot of the cluster and the policy configuration.

Plain frozen dataclasses, independent of NATS/Redis types, so the live service and the simulator
build the same snapshot. A snapshot is a tuple of nodes, each holding its GPUs, instances and copies
as its agent reports them, so a caller that keeps an unchanged node's object lets the core skip it.
Memory is in bytes here; the core counts it in 2 MiB pages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import chain
from typing import Iterable

PAGE_BYTES = 2 << 20  # pool memory is counted in 2 MiB pages


@dataclass(frozen=True)
class Gpu:
    index: int  # device index on its node
    free_bytes: int  # memory not used by copies, engines or KV caches


@dataclass(frozen=True)
class ModelSpec:
    name: str
    size_bytes: int  # total weight bytes (split evenly over its tp devices)
    tp: int = 1  # tensor-parallel degree: devices per copy or instance
    avg: float = 0.0  # forecast: mean outstanding requests in the next window
    peak: float = 0.0  # forecast: peak outstanding requests in the next window
    kv_bytes: int = 0  # KV cache per device a new instance needs (0: none reserved here)
    engine_bytes: int = 0  # memory per device an instance needs beyond the copy and its KV (an
    #                        engine that does not serve from the pool's tensors holds its own weights)
    chance: float = 0.0  # forecast: probability of at least one request in the next window


@dataclass(frozen=True)
class Copy:
    """A prewarmed copy of a model's weights on a TP group (not backing an instance)."""

    model: str
    node: str
    devices: tuple[int, ...]
    ready: bool = True  # False while still loading
    kv_host: str = ""  # instance id whose idle KV space holds this copy ("" = free pool memory)


@dataclass(frozen=True)
class Instance:
    instance_id: str
    model: str
    node: str
    devices: tuple[int, ...]
    started_at_s: float = 0.0
    inflight: int = 0  # Q: requests being served
    kv_capacity_bytes: int = 0  # C: KV cache per device
    kv_used_bytes: int = 0  # T: KV in use per device
    ready: bool = True  # False while starting
    draining: bool = False  # being stopped: no longer counts as capacity


@dataclass(frozen=True)
class Node:
    name: str
    gpus: tuple[Gpu, ...]
    instances: tuple[Instance, ...] = ()  # each names this node
    copies: tuple[Copy, ...] = ()


@dataclass(frozen=True)
class Snapshot:
    nodes: tuple[Node, ...]
    models: tuple[ModelSpec, ...]
    loads: dict[str, float] = field(default_factory=dict)  # model -> time-weighted load (see windowed_load)
    unmeasured: frozenset[str] = frozenset()  # models whose load the shell has not heard for a whole scale
    #   window yet (a placer just started or elected): their low load may be unmeasured, so they never scale down

    @property
    def instances(self) -> tuple[Instance, ...]:
        """Every node's instances, node by node."""
        return tuple(chain.from_iterable(n.instances for n in self.nodes))

    @property
    def copies(self) -> tuple[Copy, ...]:
        return tuple(chain.from_iterable(n.copies for n in self.nodes))


def snapshot_of(nodes: Iterable[Node], models: tuple[ModelSpec, ...], copies: Iterable[Copy] = (),
                instances: Iterable[Instance] = (), loads: dict[str, float] | None = None) -> Snapshot:
    """A snapshot from flat lists: each copy and instance goes to the node it names (in the given
    order; those naming no node are left out), replacing what `nodes` held."""
    nodes = tuple(nodes)
    placed: dict[str, tuple[list[Instance], list[Copy]]] = {n.name: ([], []) for n in nodes}
    for kind, items in ((0, instances), (1, copies)):
        for item in items:
            if item.node in placed:
                placed[item.node][kind].append(item)
    return Snapshot(tuple(Node(n.name, n.gpus, tuple(placed[n.name][0]), tuple(placed[n.name][1])) for n in nodes),
                    tuple(models), dict(loads or {}))


@dataclass(frozen=True)
class Config:
    capacity: int = 32  # B: requests in flight per instance
    load_bandwidth_bytes_s: float = 32e9  # cold-load bandwidth used in copy scores
    prewarm: bool = True  # False: the "no prewarm" ablation (no copies planned)
    placement: str = "evict_aware"  # "evict_aware" | "paper" (skip when full) | "round_robin" (first fit)
    kv_prewarm: bool = True  # let prewarmed copies use instances' idle KV space
    allocation: str = "paper"  # "paper" (DESIGN §3.3) | "hit_first" (displace for a ready copy before a
    #                            cold start; a cold start evicts copies only as far as it needs)
    scale_window_s: float = 5.0  # autoscaler load window
    protect_s: float = 5.0  # instances younger than this are never scaled down
    scale_up_at: float = 0.8  # scale up when load > scale_up_at * B * n
    scale_down_at: float = 0.5  # scale down when load < scale_down_at * B * n
    keep_s: float = 0.0  # scale-downs also spare instances younger than this (0: protect_s alone, the paper)
    promotable_copies: bool = False  # True: keep the wanted copies promotable: a copy on GPUs another
    #   instance holds (not promotable until it leaves) ranks last, and each allocation re-plans copies at once;
    #   for models on at most promotable_max_tp GPUs such a copy also does not count as a wanted copy and new
    #   copies go only to GPUs without instances (the paper: every copy counts, copies are planned each tick)
    promotable_max_tp: int = 1  # larger models keep counting blocked copies: re-loading them elsewhere costs the
    #   most bytes, and their idle TP groups are the ones allocations take soonest
    standby_copies: bool = False  # True: a model that wants no copy for its predicted load, has no instance and may
    #   still get a request (forecast chance > 0) wants one standby copy of score chance * its cold-start cost, so
    #   spare memory holds the likeliest idle models (the paper: copies only for predicted load)
    unserved_first: bool = False  # True: while the cluster cannot hold the instances its loads want, a model without
    #   a serving instance (its requests wait) may displace idle instances still inside protect_s (the paper:
    #   protection holds for every allocation, and a model can wait minutes for a group)

    def instances_for(self, load: float) -> int:
        """Instances that keep `load` (requests) under the scale-up line."""
        return math.ceil(load / (self.scale_up_at * self.capacity))

    def over_scale_up_line(self, load: float, instances: int) -> bool:
        """`load` (requests) is more than `instances` should carry: scale_up_at * B each."""
        return load > self.scale_up_at * self.capacity * instances

    def replaces_blocked(self, spec: ModelSpec) -> bool:
        """Copies of `spec` under an instance are replaced, and new ones kept off GPUs with instances."""
        return self.promotable_copies and spec.tp <= self.promotable_max_tp

    def __post_init__(self) -> None:
        if self.placement not in ("evict_aware", "paper", "round_robin"):
            raise ValueError(f"unknown placement {self.placement!r}")
        if self.allocation not in ("paper", "hit_first"):
            raise ValueError(f"unknown allocation {self.allocation!r}")
        if self.promotable_max_tp < 0:
            raise ValueError(f"promotable_max_tp must be >= 0, got {self.promotable_max_tp}")
