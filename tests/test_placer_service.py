"""Placer service over real NATS and Redis with two real GPU agents (fake engine) as nodes n0 and
n1: forecasts become prewarmed copies, instance needs are answered at once (hit, starting, ready),
load samples scale instances up and down, an agent's death and a placer restart both converge to
the observed state with no phantoms, and commands are retried under one idempotency key."""

from __future__ import annotations

import asyncio
import time

import pytest

from services.gpuagent.service import AgentService
from services.placer.core import ColdStart, Demote, Evict, Prewarm
from services.placer.dispatch import Dispatcher
from services.placer.service import PlacerService
from shared.bus import Bus
from shared.runner import Running
from shared.schemas import AgentCommand, CommandResult, Event, Forecast, InstanceAnswer, InstanceNeed, LoadSample, Plan, PlannedCopy
from shared.state import State
from tests.agent_helpers import fake_model

MiB = 1 << 20
MODELS = ("m1", "m2", "m3")


async def eventually(check, timeout_s: float = 20.0, what: str = "condition"):
    """Poll observed state until `check()` returns neither None nor False (agents and ticks are async)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await check()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.fixture
async def cluster(settings):
    s = settings.with_overrides(engine="fake", devices=2, device_memory_bytes=64 * MiB, fake_token_s=0.001,
                                fake_load_bytes_s=1e9, heartbeat_s=0.2, heartbeat_ttl_s=1.0, kv_cache_bytes=2 * MiB,
                                placer_tick_s=0.2, request_timeout_s=2.0)
    state = await State.connect(s)
    for name in MODELS:
        await state.register_model(fake_model(name, 8 * MiB))
    agents = {node: await Running.start(AgentService(s.with_overrides(node=node)), with_health=False)
              for node in ("n0", "n1")}
    bus = await Bus.connect(s, "test-gateway")
    placers: list[Running] = []

    async def start_placer(**overrides) -> Running:
        placers.append(await Running.start(PlacerService(s.with_overrides(**overrides)), with_health=False))
        return placers[-1]

    yield s, state, bus, agents, start_placer
    for running in [*placers, *agents.values()]:
        if running.accepting:
            await running.shutdown()
    await bus.close()
    await state.close()


async def forecast(state: State, model: str, avg: float, peak: float) -> None:
    await state.hput(state.keys.forecasts(), model,
                     Forecast(model=model, window_start_s=time.time(), window_s=300, avg=avg, peak=peak, method="test"))


async def held_copies(state: State) -> list[tuple[str, str, int]]:
    views = await state.node_views()
    return sorted((v.node, c.model, d) for v in views.values() for c in v.copies if c.state.value == "ready"
                  for d in c.devices)


async def need(bus: Bus, model: str) -> InstanceAnswer:
    return await bus.request(bus.subjects.instance_need(), InstanceNeed(model=model), InstanceAnswer, timeout_s=5)


async def test_forecasts_become_prewarmed_copies_and_the_plan_says_so(cluster):
    s, state, bus, agents, start_placer = cluster
    await forecast(state, "m1", avg=40, peak=70)  # n_f = 2, n_b = 1: three copies, one per GPU at most
    await start_placer()
    copies = await eventually(lambda: _copies_of(state, "m1", 3), what="three ready copies of m1")
    assert len({(node, d) for node, _, d in copies}) == 3  # never two copies of m1 on one GPU
    plan = await state.plan()
    assert sorted((c.node, c.devices[0]) for c in plan.copies if c.model == "m1") == sorted(
        (node, d) for node, _, d in copies)


async def _copies_of(state: State, model: str, count: int):
    copies = [c for c in await held_copies(state) if c[1] == model]
    return copies if len(copies) == count else None


async def test_need_is_answered_at_once_then_ready_from_a_prewarmed_copy(cluster):
    s, state, bus, agents, start_placer = cluster
    await forecast(state, "m1", avg=10, peak=10)
    await start_placer()
    await eventually(lambda: _copies_of(state, "m1", 1), what="a copy of m1")
    orders = []
    stream = asyncio.create_task(_collect(bus, "promote_ordered", orders))
    await asyncio.sleep(0.1)  # let the event subscription reach the server
    started = time.monotonic()
    first = await need(bus, "m1")
    assert first.status == "starting" and time.monotonic() - started < 1.0
    assert (await need(bus, "m1")).status in ("starting", "ready")  # never a second instance while one starts
    ready = await eventually(lambda: _ready(bus, "m1"), what="a ready instance of m1")
    assert len(ready.instances) == 1
    views = await state.node_views()
    route = ready.instances[0]
    assert any(i.instance_id == route.instance_id for i in views[route.node].instances)
    await eventually(lambda: _nonempty(orders), what="promote_ordered event")
    assert orders[0].reason.startswith("prewarm_hit")
    await _stop(stream)


async def _ready(bus: Bus, model: str):
    answer = await need(bus, model)
    return answer if answer.status == "ready" else None


async def _nonempty(items):
    return items or None


async def _stop(task: asyncio.Task) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def _collect(bus: Bus, name: str, out: list) -> None:
    async for event in bus.stream(bus.subjects.event("placer", name), Event):
        out.append(event)


async def test_needs_for_different_models_do_not_wait_on_each_other(cluster):
    s, state, bus, agents, start_placer = cluster
    await start_placer()
    started = time.monotonic()
    answers = await asyncio.gather(need(bus, "m1"), need(bus, "m2"), need(bus, "m3"), need(bus, "nope"))
    assert time.monotonic() - started < 2.0
    assert [a.status for a in answers[:3]] == ["starting"] * 3
    assert answers[3].status == "error" and "unknown model" in answers[3].reason
    for model in ("m1", "m2", "m3"):
        await eventually(lambda: _ready(bus, model), what=f"a ready instance of {model}")
    views = await state.node_views()
    busy = [(v.node, i.devices[0]) for v in views.values() for i in v.instances]
    assert len(busy) == len(set(busy)) == 3  # cold starts landed on distinct GPUs


async def test_dead_agent_leaves_no_phantoms(cluster):
    s, state, bus, agents, start_placer = cluster
    await forecast(state, "m1", avg=100, peak=120)  # four copies: every GPU of both nodes
    await start_placer()
    await eventually(lambda: _copies_of(state, "m1", 4), what="four copies of m1")
    await _crash(agents.pop("n1"))  # no goodbye: its view stays until the heartbeat key expires

    async def converged():
        plan = await state.plan()
        views = await state.node_views(alive_only=False)
        return plan if set(views) == {"n0"} and {c.node for c in plan.copies} == {"n0"} else None

    plan = await eventually(converged, what="plan without n1")
    assert sorted(c.devices[0] for c in plan.copies) == [0, 1]


async def _crash(running: Running) -> None:
    """Stop an agent's heartbeats and connections without its clean shutdown."""
    running.accepting = False
    running.stopping.set()
    await running._run_task
    service = running.service
    for worker in service.workers.workers:
        if worker.inproc is not None:
            await worker.inproc.bus.close()
    await service.bus.close()
    await service.state.close()


async def test_restarted_placer_converges_to_observed_state(cluster):
    s, state, bus, agents, start_placer = cluster
    await forecast(state, "m2", avg=20, peak=20)
    first = await start_placer()
    await eventually(lambda: _copies_of(state, "m2", 1), what="a copy of m2")
    await first.shutdown()
    # a stale plan claims copies and instances nobody holds
    stale = Plan(at_s=0, copies=[PlannedCopy(model="m3", node="n1", devices=[1], score=9.0)], instances={"m3": 2})
    await state.put(state.keys.plan(), stale)
    orders = []
    stream = asyncio.create_task(_collect(bus, "prewarm_ordered", orders))
    await asyncio.sleep(0.1)
    second = await start_placer()

    async def converged():
        plan = await state.plan()
        held = await held_copies(state)
        return plan if plan and plan.at_s > 0 and sorted((c.node, c.model, c.devices[0]) for c in plan.copies) == held \
            else None

    plan = await eventually(converged, what="plan equal to the observed copies")
    assert plan.instances == {} and [c.model for c in plan.copies] == ["m2"]
    await eventually(lambda: _ticks(second, 3), what="three more ticks")
    assert orders == []  # the copy it already had was not loaded again
    await _stop(stream)


async def _ticks(running: Running, count: int):
    return running.service.ticks >= count


async def test_autoscaler_scales_up_on_load_and_demotes_to_zero_keeping_weights(cluster):
    s, state, bus, agents, start_placer = cluster
    load = {"m1": 40.0}  # above 0.8 * B for one instance: two instances

    async def gateway_samples():
        while True:
            await bus.publish(bus.subjects.load_samples(), LoadSample(
                model="m1", at_s=time.time(), interval_s=0.2, avg_outstanding=load["m1"], peak_outstanding=load["m1"]))
            await asyncio.sleep(0.2)

    sampler = asyncio.create_task(gateway_samples())
    await start_placer(scale_window_s=1.0)  # instances older than 1 s may be scaled down

    async def instances(count: int):
        views = await state.node_views()
        found = [(v.node, i.devices[0]) for v in views.values() for i in v.instances if i.state.value == "ready"]
        return found if len(found) == count else None

    serving = await eventually(lambda: instances(2), what="two instances of m1")
    load["m1"] = 0.0
    await eventually(lambda: instances(0), what="scale to zero")
    kept = [(node, d) for node, model, d in await held_copies(state) if model == "m1"]
    assert sorted(kept) == sorted(serving)  # demoted: the weights stay as prewarmed copies
    await _stop(sampler)


async def test_commands_are_retried_with_the_same_id_and_dropped_for_dead_nodes(settings):
    bus = await Bus.connect(settings, "placer-dispatch")
    agent = await Bus.connect(settings, "stub-agent")
    seen: list[str] = []

    async def flaky_agent(cmd: AgentCommand) -> CommandResult | None:
        seen.append(cmd.command_id)
        return None if len(seen) == 1 else CommandResult(command_id=cmd.command_id, ok=True)  # first: lost

    await agent.subscribe(agent.subjects.agent_command("nx"), AgentCommand, flaky_agent)
    alive = {"nx"}
    dispatcher = Dispatcher(bus, attempt_timeout_s=0.3, node_alive=lambda node: node in alive)
    dispatcher.submit([Prewarm("m1", "nx", (0,), 1.0, "prewarm_foundation")])
    assert dispatcher.overlay(observed_at_s=0.0)  # pending at once, before any answer
    await dispatcher.drain()
    assert len(seen) == 2 and seen[0] == seen[1]  # the retry reused the idempotency key
    assert dispatcher.overlay(observed_at_s=time.time() + 1) == []  # done, and observed since

    alive.clear()  # a node without heartbeat: no retries, the effect is forgotten
    dispatcher.submit([Evict("m1", "gone", (0,), "evicted_for")])
    await dispatcher.drain()
    assert dispatcher.overlay(observed_at_s=0.0) == []
    await agent.close()
    await bus.close()


async def test_later_commands_on_a_node_wait_for_an_earlier_demote(settings):
    bus = await Bus.connect(settings, "placer-dispatch-order")
    agent = await Bus.connect(settings, "stub-agent-order")
    drained, order = asyncio.Event(), []

    async def slow_demote_agent(cmd: AgentCommand) -> CommandResult:
        order.append(cmd.kind.value)
        if cmd.kind.value == "demote":
            await drained.wait()
        return CommandResult(command_id=cmd.command_id, ok=True)

    await agent.subscribe(agent.subjects.agent_command("nd"), AgentCommand, slow_demote_agent)
    dispatcher = Dispatcher(bus, attempt_timeout_s=5.0, node_alive=lambda node: True)
    dispatcher.submit([Demote("m1", "nd", (0,), "i1", "displaced_for", for_model="m2")])
    dispatcher.submit([ColdStart("m2", "nd", (0,), "i2", "cold_start")])  # a later batch, same node
    await eventually(lambda: asyncio.sleep(0, order == ["demote"]), what="demote sent")
    await asyncio.sleep(0.2)
    assert order == ["demote"]  # the cold start waits for the drain
    drained.set()
    await dispatcher.drain()
    await dispatcher.drain()
    assert order == ["demote", "cold_start"]
    await agent.close()
    await bus.close()
