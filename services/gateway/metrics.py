"""Prometheus metrics of the gateway, in a registry of their own (several gateways can share a process).

TTFT and its parts are histograms per model, in seconds: queue wait, instance start wait, engine
time to first token, and the gateway's own overhead (the rest of the TTFT).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                     1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
UNKNOWN_MODEL = "_unknown"  # label for requests naming no registered model (bounded cardinality)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()

        def histogram(name: str, help_: str) -> Histogram:
            return Histogram(name, help_, ["model"], buckets=LATENCY_BUCKETS_S, registry=self.registry)

        self.ttft = histogram("warmserve_gateway_ttft_seconds", "time to first token seen by the gateway")
        self.queue_wait = histogram("warmserve_gateway_queue_wait_seconds",
                                    "time held behind other requests or for a free slot")
        self.start_wait = histogram("warmserve_gateway_instance_start_wait_seconds",
                                    "time held while the model had no ready instance")
        self.engine_ttft = histogram("warmserve_gateway_engine_ttft_seconds",
                                     "engine time from receipt to first token")
        self.overhead = histogram("warmserve_gateway_overhead_seconds",
                                  "TTFT minus queue, start and engine time (gateway and transport)")
        self.requests = Counter("warmserve_gateway_requests", "answered requests",
                                ["model", "endpoint", "status"], registry=self.registry)
        self.placer_asks = Counter("warmserve_gateway_placer_asks", "instance requests sent to the placer",
                                   ["model"], registry=self.registry)
        self.requeued = Counter("warmserve_gateway_requeued", "requests sent elsewhere because their instance "
                                "went away (or refused them) before any output", ["model"], registry=self.registry)
        self.queued = Gauge("warmserve_gateway_queued_requests", "requests waiting for an instance",
                            ["model"], registry=self.registry)
        self.outstanding = Gauge("warmserve_gateway_outstanding_requests", "queued + running requests",
                                 ["model"], registry=self.registry)

        self._ttft_parts: dict[str, tuple[Histogram, ...]] = {}  # per model: labelled children, looked up once

    def observe_first_token(self, model: str, ttft_s: float, queue_wait_s: float, start_wait_s: float,
                            engine_ttft_s: float) -> None:
        parts = self._ttft_parts.get(model)
        if parts is None:
            parts = self._ttft_parts[model] = tuple(h.labels(model) for h in (
                self.ttft, self.queue_wait, self.start_wait, self.engine_ttft, self.overhead))
        overhead_s = max(ttft_s - queue_wait_s - start_wait_s - engine_ttft_s, 0.0)
        for histogram, value in zip(parts, (ttft_s, queue_wait_s, start_wait_s, engine_ttft_s, overhead_s)):
            histogram.observe(value)

    def render(self) -> bytes:
        return generate_latest(self.registry)
