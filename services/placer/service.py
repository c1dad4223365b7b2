"""Placer shell, the only writer of the desired plan: each tick it observes (live agents' views,
registry, forecasts, load samples), overlays commands in flight, runs the core, sends the effects
and writes the Plan; it answers InstanceNeed at once. Re-reading observed state every tick makes
the plan converge after a placer restart or an agent's death (dead agents' views are removed).

Several placers may run: the one holding the Redis lease leads (ticks, commands agents, answers
InstanceNeed, writes the plan only while its lease holds); the others are ready standbys that
keep hearing load samples, so a standby that takes over knows the load. A placer that has not
heard a whole scale window of samples yet (since it started, or since NATS came back) scales
nothing down: it would read busy as idle.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from dataclasses import dataclass

from services.placer import adapter
from services.placer.core import LoadPoint, Snapshot, allocate, apply_effects, plan_tick, windowed_load
from services.placer.dispatch import Dispatcher
from services.placer.leader import ELECTED, LOST, Leadership
from services.placer.metrics import PlacerMetrics
from shared.runner import Service, every
from shared.schemas import (Event, Forecast, InstanceAnswer, InstanceNeed, InstanceRoute, LoadSample, ModelInfo,
                            NodeView, Plan)
from shared.state import StateError


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
        self.token = uuid.uuid4().hex  # this placer's lease token
        self.leadership = Leadership(settings.placer_lease_ttl_s)
        self.metrics = PlacerMetrics(lambda: self.leadership.leading)
        self.lease_lock = asyncio.Lock()  # one lease operation at a time; stop() releases under it
        self.released = False
        self.need_subscription = None  # InstanceNeed is subscribed only while leading
        self.hearing_since_s = 0.0  # load samples are heard without a break from then on

    async def start(self) -> None:
        self.dispatcher = Dispatcher(self.bus, self.settings.request_timeout_s, lambda node: node in self.alive)
        await self.bus.ensure_event_stream()
        self.last_plan = await self.state.plan()
        self.hearing_since_s = time.time()
        await self.bus.subscribe(self.bus.subjects.load_samples(), LoadSample, self.on_sample, concurrent=False)
        await self.keep_lease()
        if self.settings.kv_prewarm:
            self.log.info("kv_prewarm_disabled", reason="agents cannot lend KV space yet")

    async def run(self, stopping: asyncio.Event) -> None:
        # one bad tick or lease round (Redis hiccup, bad data) must not end the loops
        lease = asyncio.create_task(every(self.settings.placer_lease_renew_s, stopping, self.keep_lease, self.log,
                                          "lease_failed"))
        try:
            await every(self.settings.placer_tick_s, stopping, self.tick, self.log, "tick_failed")
        finally:
            await lease

    async def stop(self) -> None:
        await self.dispatcher.drain()
        async with self.lease_lock:
            self.released = True
            change = None
            if self.leadership.leading:
                await self.state.release_lease(self.state.keys.placer_lease(), self.token)
                change = self.leadership.answered(time.time(), False)
        await self._lead(change, "released")

    # ------------------------------------------------------------ leadership

    async def keep_lease(self) -> None:
        """Renew the lease while leading, else try to take it; act on a change."""
        if not self.bus.nc.is_connected:  # no sample arrives while NATS is away: hearing starts again after
            self.hearing_since_s = time.time()
        async with self.lease_lock:  # lease I/O and the leadership it decides only: nothing that waits on NATS
            if self.released:
                return
            key, ttl_s, asked_s = self.state.keys.placer_lease(), self.settings.placer_lease_ttl_s, time.time()
            try:
                if self.leadership.leading:
                    held = await self.state.renew_lease(key, self.token, ttl_s)
                else:
                    held = await self.state.acquire_lease(key, self.token, ttl_s)
                change = self.leadership.answered(asked_s, held)
                reason = "lease taken" if held else "lease held elsewhere"
            except StateError as exc:
                change, reason = self.leadership.unanswered(time.time()), f"lease unreachable: {exc}"
        await self._lead(change, reason)

    async def _lead(self, change: str | None, reason: str) -> None:
        """Report a leadership change; subscribe to InstanceNeed only while leading (each lease round
        checks it again, so a subscription that failed is retried)."""
        if change is not None:
            (self.log.info if change == ELECTED else self.log.warning)(change, placer=self.token, reason=reason)
            if change == LOST:
                self.dispatcher.abandon()  # only the leader commands agents
            await self.bus.publish_event("placer", Event(name=change, at_s=time.time(), reason=reason,
                                                         detail={"placer": self.token}))
        if self.leadership.leading and self.need_subscription is None:
            self.need_subscription = await self.bus.subscribe(self.bus.subjects.instance_need(), InstanceNeed,
                                                              self.on_need)
        elif not self.leadership.leading and self.need_subscription is not None:
            subscription, self.need_subscription = self.need_subscription, None
            await self.bus.unsubscribe(subscription)

    # ------------------------------------------------------------ inputs

    async def on_sample(self, sample: LoadSample) -> None:
        if sample.model not in self.samples and await self.state.model(sample.model) is None:
            self.log.debug("load_sample_ignored", model=sample.model, reason="model not registered")
            return
        points = self.samples.setdefault(sample.model, deque())
        points.append(LoadPoint(sample.at_s, sample.interval_s, sample.avg_outstanding, sample.source))
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
        for model in set(self.samples) - set(models):  # unregistered since
            del self.samples[model]
        forecasts = await self.state.hgetall(self.state.keys.forecasts(), Forecast)
        return Observation(at_s, views, models, forecasts)

    def snapshot(self, seen: Observation, now_s: float) -> Snapshot:
        """Observed state with the commands still in flight applied (call without awaiting in
        between this and submitting what it decides, so concurrent decisions see each other)."""
        loads = {m: windowed_load(p, now_s, self.settings.scale_window_s) for m, p in self.samples.items()}
        heard_window = now_s - self.hearing_since_s >= self.settings.scale_window_s
        forecasts = adapter.current_forecasts(seen.forecasts, now_s)
        observed = adapter.snapshot_from(seen.views, seen.models, forecasts, loads, self.settings,
                                         frozenset() if heard_window else frozenset(seen.models))
        return apply_effects(observed, self.dispatcher.overlay(seen.at_s), now_s)

    # ------------------------------------------------------------ planning tick

    async def tick(self) -> Plan | None:
        """One planning round, led only (a standby does nothing); None when not leading."""
        if not self.leadership.holds(time.time()):
            return None
        started = time.perf_counter()
        seen = await self.observe()
        now = time.time()
        if not self.leadership.holds(now):  # lost while observing
            return None
        result = plan_tick(self.snapshot(seen, now), now, self.config)
        self.dispatcher.submit(list(result.effects))
        plan = adapter.plan_from(result, now)
        if not await self.state.put_plan_if_leader(plan, self.token):
            async with self.lease_lock:
                change = self.leadership.answered(now, False)
            await self._lead(change, "plan write refused: lease held elsewhere")
            return None
        if self._changed(plan):
            await self.bus.publish_event("placer", Event(name="plan_changed", at_s=now, detail={
                "copies": len(plan.copies), "instances": plan.instances, "effects": len(result.effects)}))
        self.last_plan, self.ticks = plan, self.ticks + 1
        self.metrics.decided(result.effects)
        self.metrics.ticked(time.perf_counter() - started, plan, seen.views)
        self.log.info("tick_done", nodes=len(seen.views), models=len(seen.models), effects=len(result.effects),
                      copies=len(plan.copies), tick=self.ticks)
        return plan

    def _changed(self, plan: Plan) -> bool:
        def key(p: Plan) -> tuple:
            return (sorted((c.model, c.node, tuple(c.devices)) for c in p.copies), sorted(p.instances.items()))
        return self.last_plan is None or key(self.last_plan) != key(plan)

    # ------------------------------------------------------------ gateway requests

    async def on_need(self, need: InstanceNeed) -> InstanceAnswer | None:
        """"ready" while some instance has room, else "starting" (one is on its way, or is ordered
        now; never waits for it), else "error" with the reason. Not leading: no answer (the leader answers)."""
        if not self.leadership.holds(time.time()):
            return None
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
        self.metrics.decided(allocation.effects)
        if allocation.effects:
            self.dispatcher.submit(list(allocation.effects))  # KV reclaims come even without an instance
        if not allocation.found:
            if routes:
                return InstanceAnswer(status="ready", instances=routes, reason=allocation.reason)
            return InstanceAnswer(status="error", reason=allocation.reason)
        self.log.info("instance_allocated", model=need.model, node=allocation.node, devices=list(allocation.devices),
                      kind=allocation.kind, instance_id=allocation.instance_id, waiting=need.waiting)
        return InstanceAnswer(status="starting", instances=routes, reason=allocation.reason)
