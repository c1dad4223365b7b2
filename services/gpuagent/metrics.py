"""Prometheus metrics of the GPU agent, in a registry of their own: copies and bytes per device and
state, which model is where, engine memory, command times (promote, cold start, prewarm, ...),
prewarm bandwidth and device worker deaths.

The gauges are set from the NodeView the agent publishes each heartbeat, so they show what Redis shows.
"""

from __future__ import annotations

from collections import Counter as Tally
from typing import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from services.gpuagent.core.ledger import DeviceLedger
from shared.schemas import NodeView

COMMAND_BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 900.0)
BANDWIDTH_BUCKETS = (1e8, 2.5e8, 5e8, 1e9, 2e9, 4e9, 8e9, 16e9, 32e9, 64e9)
SERVING = {"ready": "serving"}  # an instance's state as `warmserve status` names it


class AgentMetrics:
    def __init__(self, node: str) -> None:
        self.node = node
        self.registry = CollectorRegistry()
        per_device = ["node", "device"]

        def gauge(name: str, help_: str, labels: list[str]) -> Gauge:
            return Gauge(name, help_, labels, registry=self.registry)

        self.budget = gauge("warmserve_agent_device_budget_bytes", "memory the agent may use", per_device)
        self.free = gauge("warmserve_agent_device_free_bytes", "budget minus copies and the serving engine "
                          "(idle warm engines count as free; 0 while the device's worker is down)", per_device)
        self.copies = gauge("warmserve_agent_copies", "prewarmed copies", per_device + ["state"])
        self.copy_bytes = gauge("warmserve_agent_copy_bytes", "memory held by prewarmed copies",
                                per_device + ["state"])
        self.engine_bytes = gauge("warmserve_agent_engine_bytes", "engine memory (its KV cache): "
                                  "serving an instance, or idle (warm, dropped on demand)", per_device + ["use"])
        self.resident = gauge("warmserve_agent_model_resident", "1 for each model on each device, by state "
                              "(copy: loading ready evicting; instance: starting serving draining)",
                              per_device + ["model", "state"])
        self.commands = Histogram("warmserve_agent_command_seconds", "placer commands from receipt to answer",
                                  ["kind", "ok"], buckets=COMMAND_BUCKETS_S, registry=self.registry)
        self.bandwidth = Histogram("warmserve_agent_prewarm_bandwidth_bytes_per_second",
                                   "bytes loaded per second by each finished prewarm", ["node"],
                                   buckets=BANDWIDTH_BUCKETS, registry=self.registry)
        self.prewarmed = Counter("warmserve_agent_prewarmed_bytes", "bytes loaded by finished prewarms", ["node"],
                                 registry=self.registry)
        self.worker_deaths = Counter("warmserve_agent_worker_deaths", "device workers that died", per_device,
                                     registry=self.registry)

    def command_done(self, kind: str, ok: bool, seconds: float) -> None:
        self.commands.labels(kind, "true" if ok else "false").observe(seconds)

    def prewarm_done(self, nbytes: int, seconds: float) -> None:
        self.prewarmed.labels(self.node).inc(nbytes)
        if seconds > 0:
            self.bandwidth.labels(self.node).observe(nbytes / seconds)

    def worker_died(self, device: int) -> None:
        self.worker_deaths.labels(self.node, str(device)).inc()

    def observe(self, view: NodeView, ledgers: Iterable[DeviceLedger]) -> None:
        """Every gauge from the view just published (and engine bytes from the ledgers)."""
        for gauge in (self.copies, self.copy_bytes, self.resident):
            gauge.clear()  # a copy or model gone since the last view leaves no stale series
        counts, sizes = Tally(), Tally()
        for copy in view.copies:
            for device in copy.devices:
                counts[device, copy.state.value] += 1
                sizes[device, copy.state.value] += copy.bytes
                self.resident.labels(self.node, str(device), copy.model, copy.state.value).set(1)
        for instance in view.instances:
            state = SERVING.get(instance.state.value, instance.state.value)
            for device in instance.devices:
                self.resident.labels(self.node, str(device), instance.model, state).set(1)
        for (device, state), count in counts.items():
            self.copies.labels(self.node, str(device), state).set(count)
            self.copy_bytes.labels(self.node, str(device), state).set(sizes[device, state])
        for d in view.devices:
            self.budget.labels(self.node, str(d.index)).set(d.budget_bytes)
            self.free.labels(self.node, str(d.index)).set(d.free_bytes)
        for ledger in ledgers:
            engines = sum(e.bytes for e in ledger.engines.values())
            self.engine_bytes.labels(self.node, str(ledger.index), "idle").set(ledger.idle_engine_bytes)
            self.engine_bytes.labels(self.node, str(ledger.index), "serving").set(engines - ledger.idle_engine_bytes)

    def render(self) -> bytes:
        return generate_latest(self.registry)
