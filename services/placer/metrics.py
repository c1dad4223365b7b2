"""Prometheus metrics of the placer, in a registry of their own: tick wall time, decisions (effects)
by kind and reason, planned vs observed copies and instances per model, and whether it leads.

Only the shell calls these, after the core has decided; nothing here decides anything.
"""

from __future__ import annotations

import re
from collections import Counter as Tally
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from shared.schemas import CopyState, InstanceState, NodeView, Plan

TICK_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class PlacerMetrics:
    def __init__(self, leading: Callable[[], bool]) -> None:
        self.registry = CollectorRegistry()
        self.tick = Histogram("warmserve_placer_tick_seconds", "wall time of one planning tick (observe, plan, "
                              "write the plan)", buckets=TICK_BUCKETS_S, registry=self.registry)
        self.decisions = Counter("warmserve_placer_decisions", "effects decided (ticks and allocations)",
                                 ["kind", "reason"], registry=self.registry)
        self.copies = Gauge("warmserve_placer_copies", "prewarmed copies per model: planned by the last tick, or "
                            "ready on live agents", ["model", "source"], registry=self.registry)
        self.instances = Gauge("warmserve_placer_instances", "instances per model: planned by the last tick, or "
                               "ready on live agents", ["model", "source"], registry=self.registry)
        self.nodes = Gauge("warmserve_placer_live_nodes", "agents with a live heartbeat at the last tick",
                           registry=self.registry)
        self.leader = Gauge("warmserve_placer_leader", "1 while this placer holds the lease", registry=self.registry)
        self.leader.set_function(lambda: float(leading()))

    def decided(self, effects: Iterable[object]) -> None:
        """Count effects by kind (prewarm, evict, promote, cold_start, demote) and reason."""
        for effect in effects:
            self.decisions.labels(re.sub(r"(?<!^)(?=[A-Z])", "_", type(effect).__name__).lower(), effect.reason).inc()

    def ticked(self, seconds: float, plan: Plan, views: dict[str, NodeView]) -> None:
        """One tick's time, and the plan beside what the live agents hold (every model shown, 0 included)."""
        self.tick.observe(seconds)
        self.nodes.set(len(views))
        observed_copies = Tally(c.model for v in views.values() for c in v.copies if c.state == CopyState.ready)
        observed_instances = Tally(i.model for v in views.values() for i in v.instances
                                   if i.state == InstanceState.ready)
        planned_copies = Tally(c.model for c in plan.copies)
        models = set(observed_copies) | set(observed_instances) | set(planned_copies) | set(plan.instances)
        self.copies.clear()
        self.instances.clear()
        for model in models:
            self.copies.labels(model, "planned").set(planned_copies[model])
            self.copies.labels(model, "observed").set(observed_copies[model])
            self.instances.labels(model, "planned").set(plan.instances.get(model, 0))
            self.instances.labels(model, "observed").set(observed_instances[model])

    def render(self) -> bytes:
        return generate_latest(self.registry)
