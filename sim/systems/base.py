"""What every simulated system gets (the run context) and shared cluster arithmetic for the
baselines: aligned TP groups and the KV room of an instance. No policy lives here."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Protocol

from sim.cluster import Cluster, Gpu
from sim.engine import EventLoop
from shared.workload import Workload
from sim.serving import Requests, Serving


@dataclass
class Context:
    loop: EventLoop
    cluster: Cluster
    serving: Serving
    requests: Requests
    models: list[str]  # model names, index = the model ids in `requests`
    capacity: int  # B: requests in flight per instance
    history_rate_rps: list[float]  # each model's mean arrival rate over the learning days
    replay_start_s: float
    replay_end_s: float
    config: dict  # the run's configuration (system options read their keys from it)
    workload: Workload

    def __post_init__(self) -> None:
        self._ids = itertools.count()

    def new_instance_id(self, model: str) -> str:
        return f"{model}#{next(self._ids)}"


class System(Protocol):
    name: str

    def start(self, ctx: Context) -> None:
        """Install hooks (ctx.serving.on_waiting, ...) and schedule the system's own events."""


def aligned_groups(gpus_per_node: int, tp: int) -> list[tuple[int, ...]]:
    """TP-sized device groups at multiples of tp (so groups of different sizes nest, never straddle)."""
    return [tuple(range(start, start + tp)) for start in range(0, gpus_per_node - tp + 1, tp)]


def full_kv_bytes(gpus: list[Gpu], weights_per_gpu: int) -> int:
    """KV a new instance gets when it takes all the memory its weights leave on its GPUs."""
    return min(g.free_bytes for g in gpus) - weights_per_gpu
