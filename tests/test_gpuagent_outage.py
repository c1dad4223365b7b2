"""GPU agent through outages of its own redis-server / nats-server (killed, then started again on
the same port and data): a demote during a Redis outage still ends `stopped` and the view in Redis
converges within 5 s of the server's return, and a promotion meanwhile needs no Redis (every heartbeat writes the whole view again); during
a NATS outage the heartbeats keep the node alive in Redis, and commands work once it is back."""

from __future__ import annotations

import asyncio
import time

from shared.bus import BusError
from shared.schemas import CommandKind
from shared.state import StateError
from tests.agent_helpers import command, eventually, fake_model, infer, running_agent
from warmserve import infra

MiB = 1 << 20


async def test_demote_during_a_redis_outage_ends_stopped_and_the_view_converges(settings, tmp_path):
    port = infra.free_port()
    redis = infra.start_redis(tmp_path, port, tmp_path / "redis.log")
    s = settings.with_overrides(redis_url=redis.url, engine="fake", devices=1, device_memory_bytes=64 * MiB,
                                kv_cache_bytes=2 * MiB, fake_token_s=0.01, fake_load_bytes_s=1e9, heartbeat_s=0.2,
                                warm_engines=False)
    try:
        async with running_agent(s, [fake_model("m1")]) as (running, bus, state):
            agent = running.service
            assert (await command(bus, s.node, CommandKind.cold_start, "m1", instance_id="i1")).ok
            worker = agent.workers.workers[0].inproc
            accepted = asyncio.create_task(infer(bus, "i1", max_tokens=50))  # the demote drains it
            await eventually(lambda: worker._generations, 5, "generation started")
            redis.proc.kill()
            redis.proc.wait()

            demoted = await command(bus, s.node, CommandKind.demote, instance_id="i1", timeout_s=30)
            assert demoted.ok, demoted.reason
            assert agent.ledgers[0].instance is None and list(agent.ledgers[0].copies) == ["m1"]
            assert (await accepted)[-1].finish_reason == "length"
            # a burst during the outage still finds its copy: a promotion needs no registry read
            promoted = await command(bus, s.node, CommandKind.promote, "m1", instance_id="i2", timeout_s=30)
            assert promoted.ok, promoted.reason
            assert (await command(bus, s.node, CommandKind.demote, instance_id="i2", timeout_s=30)).ok
            await asyncio.sleep(2 * s.heartbeat_s)  # heartbeats keep running (and failing) meanwhile

            redis = infra.start_redis(tmp_path, port, tmp_path / "redis.log")
            back = time.monotonic()

            async def converged():
                try:
                    view = (await state.node_views()).get(s.node)
                except StateError:
                    return False
                return view is not None and view.instances == [] and [c.model for c in view.copies] == ["m1"]

            await eventually(converged, 5, "the view in Redis shows the demoted instance gone")
            assert time.monotonic() - back < 5
    finally:
        redis.stop()


async def test_a_nats_outage_keeps_the_node_alive_in_redis_and_commands_work_after_it(settings, tmp_path):
    port = infra.free_port()
    nats = infra.start_nats(tmp_path, port, tmp_path / "nats.log")
    s = settings.with_overrides(nats_url=nats.url, engine="fake", devices=1, device_memory_bytes=64 * MiB,
                                kv_cache_bytes=2 * MiB, fake_load_bytes_s=1e9, heartbeat_s=0.2, heartbeat_ttl_s=3.0,
                                warm_engines=False)
    try:
        async with running_agent(s, [fake_model("m1")]) as (running, bus, state):
            assert (await command(bus, s.node, CommandKind.cold_start, "m1", instance_id="i1")).ok
            nats.proc.kill()
            nats.proc.wait()
            outage_end = time.monotonic() + 2 * s.heartbeat_ttl_s
            while time.monotonic() < outage_end:  # heartbeats go on writing the view (device status unknown)
                assert s.node in await state.node_views(), "the node's liveness key expired"
                await asyncio.sleep(0.2)

            nats = infra.start_nats(tmp_path, port, tmp_path / "nats.log")

            async def demoted():
                try:
                    return (await command(bus, s.node, CommandKind.demote, instance_id="i1", timeout_s=2)).ok
                except BusError:  # clients still reconnecting
                    return False

            await eventually(demoted, 10, "a demote after the outage")
            await eventually(lambda: state.node_views(), 5, "a view")
            view = (await state.node_views())[s.node]
            assert view.instances == [] and [c.model for c in view.copies] == ["m1"]
    finally:
        nats.stop()
