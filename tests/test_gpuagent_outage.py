"""GPU agent through a Redis outage (its own redis-server, killed and started again on the same port
and data): a demote during the outage still ends `stopped`, and the view in Redis converges within
5 s of the server's return because every heartbeat writes the whole view again."""

from __future__ import annotations

import asyncio
import time

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
