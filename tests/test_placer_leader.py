"""Two placers, one leader: the lease rules without I/O, then two PlacerServices over the session's
real NATS and Redis with real agents: exactly one leads and answers InstanceNeed, the standby keeps
hearing load, takes over within 5 s of the leader's death (or at once after a clean stop), and a
stale leader's plan write is refused, after which it commands nothing more."""

from __future__ import annotations

import asyncio
import math
import time

from services.placer.core import Prewarm
from services.placer.dispatch import Dispatcher
from services.placer.leader import ELECTED, LOST, Leadership
from shared.bus import Bus
from shared.runner import Running
from shared.schemas import Event, InstanceNeed, LoadSample, Plan
from tests.test_placer_service import _collect, _stop, cluster, eventually, need  # noqa: F401 (cluster is a fixture)

# ------------------------------------------------------------------ the rules


def test_leadership_follows_the_store_answers():
    lead = Leadership(ttl_s=3.0)
    assert lead.answered(10.0, held=False) is None and not lead.holds(10.0)
    assert lead.answered(11.0, held=True) == ELECTED and lead.holds(13.9) and not lead.holds(14.0)
    assert lead.answered(12.0, held=True) is None and lead.holds(14.9)  # renewed from when it was asked
    assert lead.answered(13.0, held=False) == LOST and not lead.holds(13.0)


def test_an_unreachable_store_ends_leadership_when_the_lease_may_have_expired():
    lead = Leadership(ttl_s=3.0)
    lead.answered(10.0, held=True)
    assert lead.unanswered(12.5) is None and lead.holds(12.5)  # the lease still holds: keep acting
    assert lead.unanswered(13.0) == LOST and not lead.leading  # another placer may hold it now
    assert lead.unanswered(14.0) is None


# ------------------------------------------------------------------ two live placers


def leaders(*placers: Running) -> list[Running]:
    return [p for p in placers if p.service.leadership.holds(time.time())]


async def _die(running: Running) -> None:
    """Stop a placer's loops and connections without its clean shutdown: the lease is not released."""
    running.accepting = False
    running.stopping.set()
    await running._run_task
    await running.service.bus.close()
    await running.service.state.close()


async def test_one_leads_the_standby_takes_over_and_a_stale_plan_write_is_refused(cluster):
    s, state, bus, agents, start_placer = cluster
    elected: list[Event] = []
    watcher = asyncio.create_task(_collect(bus, "leader_elected", elected))
    await asyncio.sleep(0.1)
    a, b = await start_placer(), await start_placer()
    [leader] = leaders(a, b)
    standby = b if leader is a else a
    assert standby.ready() and standby.service.need_subscription is None  # a healthy standby: ready, silent
    assert (await need(bus, "m1")).status == "starting"  # answered once, by the leader
    await bus.publish(bus.subjects.load_samples(), LoadSample(model="m1", at_s=time.time(), interval_s=1.0,
                                                              avg_outstanding=1.0, peak_outstanding=1.0))
    await eventually(lambda: asyncio.sleep(0, "m1" in standby.service.samples), what="the standby hears load")
    assert await standby.service.on_need(InstanceNeed(model="m1")) is None and await standby.service.tick() is None

    old_token = leader.service.token
    await _die(leader)
    died, died_at_s = time.monotonic(), time.time()
    await eventually(lambda: asyncio.sleep(0, bool(leaders(standby))), timeout_s=6, what="the standby leads")
    assert time.monotonic() - died < 5.0
    await eventually(lambda: _plan_after(state, died_at_s), what="a plan from the new leader")
    assert (await need(bus, "m2")).status == "starting"
    assert [e.detail["placer"] for e in elected][-1] == standby.service.token

    stale = Plan(at_s=1.0, instances={"stale": 1})
    assert await state.put_plan_if_leader(stale, old_token) is False  # fenced: the dead leader's token
    assert (await state.plan()).instances.get("stale") is None
    await _stop(watcher)


async def _plan_after(state, since_s: float):
    plan = await state.plan()
    return plan if plan is not None and plan.at_s > since_s else None


async def test_a_leader_that_lost_its_lease_unseen_cannot_write_the_plan(cluster):
    s, state, bus, agents, start_placer = cluster
    lost: list[Event] = []
    watcher = asyncio.create_task(_collect(bus, "leader_lost", lost))
    await asyncio.sleep(0.1)
    a = await start_placer(placer_lease_renew_s=30.0)  # a leader that stalls: no renewal in time
    assert a.service.leadership.holds(time.time())
    await state.delete(state.keys.placer_lease())  # its lease expired while it stalled ...
    assert await state.acquire_lease(state.keys.placer_lease(), "successor", 30.0)  # ... and another took it
    a.service.leadership.valid_until_s = math.inf  # the stalled leader still believes it leads
    before = await state.plan()
    assert await a.service.tick() is None  # its plan write is refused: it steps down
    assert not a.service.leadership.leading and a.service.need_subscription is None
    assert a.service.dispatcher.overlay(0.0) == [] and not a.service.dispatcher.tasks  # it commands nothing more
    assert (await state.plan()) == before
    await eventually(lambda: asyncio.sleep(0, bool(lost)), what="leader_lost event")
    await _stop(watcher)


async def test_a_placer_that_loses_the_lead_abandons_its_commands(settings):
    bus = await Bus.connect(settings, "placer-abandon")
    dispatcher = Dispatcher(bus, attempt_timeout_s=0.2, node_alive=lambda node: True)  # nobody answers: retries
    dispatcher.submit([Prewarm("m1", "nz", (0,), 1.0, "prewarm_foundation")])
    await asyncio.sleep(0.3)
    dispatcher.abandon()
    await asyncio.wait_for(dispatcher.drain(), 2)
    assert dispatcher.overlay(0.0) == [] and not dispatcher.tasks
    await bus.close()


async def test_a_clean_stop_hands_over_at_once(cluster):
    s, state, bus, agents, start_placer = cluster
    a = await start_placer(placer_lease_ttl_s=30.0)  # a takeover can only come from the release
    b = await start_placer()
    assert leaders(a, b) == [a]
    await a.shutdown()
    stopped = time.monotonic()
    await eventually(lambda: asyncio.sleep(0, bool(leaders(b))), timeout_s=3, what="the standby leads")
    assert time.monotonic() - stopped < 2.0
