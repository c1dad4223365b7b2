"""Placer shell, the only writer of the desired plan: each tick it observes (live agents' views,
registry, forecasts, load samples), overlays commands in flight, runs the core, sends the effects
and writes the Plan; it answers InstanceNeed at once. Re-reading observed state every tick makes
the plan converge after a placer restart or an agent's death (dead agents' views are removed).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass

from services.placer import adapter
from services.placer.core import LoadPoint, Snapshot, allocate, apply_effects, plan_tick, windowed_load
from services.placer.dispatch import Dispatcher
from shared.runner import Service, every
from shared.schemas import (Event, Forecast, InstanceAnswer, InstanceNeed, InstanceRoute, LoadSample, ModelInfo,
                            NodeView, Plan)


@dataclass(frozen=True)
class Observation:
    at_s: float  # when reading started: effects finished before this are in it
    views: dict[str, NodeView]
    models: dict[str, ModelInfo]
    forecasts: dict[str, Forecast]


class PlacerService(Service):
    name = "placer"

    def __init__(self, settings):
        super().__init__(settings)
        self.config = adapter.core_config(settings)
        self.samples: dict[str, deque[LoadPoint]] = {}
        self.alive: set[str] = set()
        self.dispatcher: Dispatcher | None = None
        self.last_plan: Plan | None = None
        self.ticks = 0

    async def start(self) -> None:
        self.dispatcher = Dispatcher(self.bus, self.settings.request_timeout_s, lambda node: node in self.alive)
        await self.bus.ensure_event_stream()
        self.last_plan = await self.state.plan()
        await self.bus.subscribe(self.bus.subjects.load_samples(), LoadSample, self.on_sample, concurrent=False)
        await self.bus.subscribe(self.bus.subjects.instance_need(), InstanceNeed, self.on_need)
        if self.settings.kv_prewarm:
            self.log.info("kv_prewarm_disabled", reason="agents cannot lend KV space yet")

    async def run(self, stopping: asyncio.Event) -> None:
        # one bad tick (Redis hiccup, bad data) must not end the loop
        await every(self.settings.placer_tick_s, stopping, self.tick, self.log, "tick_failed")

    async def stop(self) -> None:
        await self.dispatcher.drain()

    # ------------------------------------------------------------ inputs

    async def on_sample(self, sample: LoadSample) -> None:
        points = self.samples.setdefault(sample.model, deque())
        points.append(LoadPoint(sample.at_s, sample.interval_s, sample.avg_outstanding))
        while points and points[0].at_s < sample.at_s - 2 * self.settings.scale_window_s:
            points.popleft()

    async def observe(self) -> Observation:
        at_s = time.time()
        every = await self.state.node_views(alive_only=False)
        alive = await self.state.alive_nodes(list(every))
        views = {node: view for node, view in every.items() if node in alive}
        for node in sorted(set(every) - set(views)):  # heartbeat expired: the agent is gone
            await self.state.drop_node(node)
            await self.bus.publish_event("placer", Event(name="node_lost", at_s=time.time(), node=node,
                                                         reason="heartbeat_expired"))
            self.log.warning("node_lost", node=node)
        self.alive = set(views)
        models = await self.state.models()
        forecasts = await self.state.hgetall(self.state.keys.forecasts(), Forecast)
        return Observation(at_s, views, models, forecasts)

    def snapshot(self, seen: Observation, now_s: float) -> Snapshot:
        """Observed state with the commands still in flight applied (call without awaiting in
        between this and submitting what it decides, so concurrent decisions see each other)."""
        loads = {m: windowed_load(p, now_s, self.settings.scale_window_s) for m, p in self.samples.items()}
        observed = adapter.snapshot_from(seen.views, seen.models, seen.forecasts, loads, self.settings)
        return apply_effects(observed, self.dispatcher.overlay(seen.at_s), now_s)

    # ------------------------------------------------------------ planning tick

    async def tick(self) -> Plan:
        seen = await self.observe()
        now = time.time()
        result = plan_tick(self.snapshot(seen, now), now, self.config)
        self.dispatcher.submit(list(result.effects))
        plan = adapter.plan_from(result, now)
        await self.state.put_plan(plan)
        if self._changed(plan):
            await self.bus.publish_event("placer", Event(name="plan_changed", at_s=now, detail={
                "copies": len(plan.copies), "instances": plan.instances, "effects": len(result.effects)}))
        self.last_plan, self.ticks = plan, self.ticks + 1
        self.log.info("tick_done", nodes=len(seen.views), models=len(seen.models), effects=len(result.effects),
                      copies=len(plan.copies), tick=self.ticks)
        return plan

    def _changed(self, plan: Plan) -> bool:
        def key(p: Plan) -> tuple:
            return (sorted((c.model, c.node, tuple(c.devices)) for c in p.copies), sorted(p.instances.items()))
        return self.last_plan is None or key(self.last_plan) != key(plan)

    # ------------------------------------------------------------ gateway requests

    async def on_need(self, need: InstanceNeed) -> InstanceAnswer:
        """"ready" while some instance has room, else "starting" (one is on its way, or is ordered
        now; never waits for it), else "error" with the reason."""
        seen = await self.observe()
        if need.model not in seen.models:
            return InstanceAnswer(status="error", reason=f"unknown model {need.model!r}")
        now = time.time()
        snapshot = self.snapshot(seen, now)
        serving = [i for i in snapshot.instances if i.model == need.model and i.ready and not i.draining]
        routes = [InstanceRoute(instance_id=i.instance_id, model=i.model, node=i.node, devices=list(i.devices))
                  for i in serving]
        if any(i.inflight < self.config.capacity for i in serving):  # the asker's view was stale
            return InstanceAnswer(status="ready", instances=routes, reason="capacity_free")
        starting = self.dispatcher.starting(need.model) or any(
            i.model == need.model and not i.ready and not i.draining for i in snapshot.instances)
        if starting:
            return InstanceAnswer(status="starting", instances=routes, reason="instance_starting")
        allocation = allocate(snapshot, need.model, now, self.config)
        if allocation.effects:
            self.dispatcher.submit(list(allocation.effects))  # KV reclaims come even without an instance
        if not allocation.found:
            if routes:
                return InstanceAnswer(status="ready", instances=routes, reason=allocation.reason)
            return InstanceAnswer(status="error", reason=allocation.reason)
        self.log.info("instance_allocated", model=need.model, node=allocation.node, devices=list(allocation.devices),
                      kind=allocation.kind, instance_id=allocation.instance_id, waiting=need.waiting)
        return InstanceAnswer(status="starting", instances=routes, reason=allocation.reason)
