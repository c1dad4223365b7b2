"""GPU agent with real vLLM (CPU build) on the demo models: prewarm -> promote -> stream ->
demote -> promote again, a weight swap between two checkpoints of one architecture, eviction
(idle engines first) under memory pressure, refusal of an oversized prewarm, restart
reconciliation, a kill -9'd device worker (reported, reaped, restarted), the workers of a kill -9'd
agent exit by themselves once no agent calls them (the orphan timeout)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.gpuagent.core.ledger import instance_kv_bytes, page_bytes
from services.gpuagent.service import AgentService
from shared.runner import Running
from shared.schemas import CommandKind, CommandResult, DeviceCall, DeviceOp
from tests.agent_helpers import command, eventually, infer, is_zombie, kill_device_worker, running_agent

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
MiB = 1 << 20


def pressure_budget(demo_models, kv_cache_bytes: int) -> int:
    """A device that holds the large copy, one small copy, the large model's KV cache and half a small
    copy more (sizes in the dtype this machine serves: float32 where bfloat16 is emulated)."""
    small, large = demo_models["demo-small-a"], demo_models["demo-large"]
    large_kv = instance_kv_bytes(large.kv_bytes_per_token, large.max_model_len, kv_cache_bytes)
    return page_bytes(large.size_bytes) + page_bytes(small.size_bytes) * 3 // 2 + large_kv


@pytest.fixture
async def vllm_agent(settings, demo_models):
    s = settings.with_overrides(engine="vllm", devices=1, heartbeat_s=0.5, kv_cache_bytes=32 * MiB,
                                warm_engines=False)  # engines appear when the test says
    s = s.with_overrides(device_memory_bytes=pressure_budget(demo_models, s.kv_cache_bytes))
    async with running_agent(s, list(demo_models.values())) as (running, bus, state):
        yield running, bus, state, s


def text_of(chunks) -> str:
    assert not chunks[-1].error, chunks[-1].error
    return "".join(c.text for c in chunks)


async def test_promote_swaps_weights_and_serves_real_tokens(vllm_agent):
    running, bus, state, s = vllm_agent
    node = s.node
    assert (await command(bus, node, CommandKind.prewarm, "demo-small-a")).ok
    assert (await command(bus, node, CommandKind.prewarm, "demo-small-b")).ok
    first = await command(bus, node, CommandKind.promote, "demo-small-a", instance_id="a1")
    assert first.ok, first.reason
    a_text = text_of(await infer(bus, "a1", prompt="def main(", max_tokens=8))
    chunks = await infer(bus, "a1", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert chunks[-1].completion_tokens == 4 and chunks[-1].engine_ttft_ms > 0
    assert (await command(bus, node, CommandKind.demote, instance_id="a1")).ok

    # same architecture, other checkpoint: the warm engine computes with the pool's module, no new engine
    second = await command(bus, node, CommandKind.promote, "demo-small-b", instance_id="b1")
    assert second.ok and second.detail["path"] == "warm_engine" and second.detail["copied_bytes"] == 0
    b_text = text_of(await infer(bus, "b1", prompt="def main(", max_tokens=8))
    assert b_text != a_text  # greedy decoding: different weights, different tokens (prefix cache was reset)
    assert (await command(bus, node, CommandKind.demote, instance_id="b1")).ok

    again = await command(bus, node, CommandKind.promote, "demo-small-a", instance_id="a2")
    assert again.ok and again.detail["path"] == "warm_engine"
    assert text_of(await infer(bus, "a2", prompt="def main(", max_tokens=8)) == a_text


async def test_memory_pressure_oversize_refusal_and_restart(vllm_agent):
    running, bus, state, s = vllm_agent
    node = s.node
    assert (await command(bus, node, CommandKind.cold_start, "demo-small-a", instance_id="s")).ok
    assert (await command(bus, node, CommandKind.demote, instance_id="s")).ok
    assert running.service.view().devices[0].idle_engine_bytes > 0  # the small engine stays warm
    too_big = await command(bus, node, CommandKind.prewarm, "demo-large", devices=(0,))
    assert (await command(bus, node, CommandKind.prewarm, "demo-small-b")).ok
    # the large model fits as a copy, but not beside both small copies + its instance's KV cache
    started = await command(bus, node, CommandKind.cold_start, "demo-large", instance_id="L")
    assert started.ok, started.reason
    view = running.service.view()
    kept = {c.model for c in view.copies}
    assert "demo-large" in kept and len(kept) < 3  # evicted only as far as needed
    assert view.devices[0].idle_engine_bytes == 0  # the idle small engine went first
    text_of(await infer(bus, "L", prompt="hello", max_tokens=4))
    oversized = await command(bus, node, CommandKind.prewarm, "demo-small-b" if "demo-small-b" not in kept
                              else "demo-small-a")
    assert not oversized.ok and "not enough memory" in oversized.reason
    assert too_big.ok  # it fitted on its own at the time

    # restart: Redis shows exactly what the new agent holds (nothing)
    await running.shutdown()
    restarted = await Running.start(AgentService(s), with_health=False)
    view = (await state.node_views())[node]
    assert view.copies == [] and view.instances == []
    await restarted.shutdown()


async def test_killed_device_worker_is_reported_reaped_and_restarted_while_the_other_serves(settings, demo_models):
    """kill -9 one device worker: its instance is reported failed at once, it is reaped, the other
    device keeps serving and heartbeating, /readyz says not ready until the worker is back."""
    s = settings.with_overrides(engine="vllm", devices=2, device_memory_bytes=700 * MiB, heartbeat_s=0.5,
                                heartbeat_ttl_s=2.0, kv_cache_bytes=32 * MiB, warm_engines=False,
                                worker_restart_s=3.0)
    async with running_agent(s, list(demo_models.values())) as (running, bus, state):
        agent = running.service
        for device in (0, 1):
            started = await command(bus, s.node, CommandKind.cold_start, "demo-small-a", devices=(device,),
                                    instance_id=f"i{device}", timeout_s=300)
            assert started.ok, started.reason
        assert agent.is_ready()
        event, pid, noticed_s = await kill_device_worker(agent, bus, 0, 10)
        assert noticed_s < 2.0
        assert (event.instance_id, event.model, event.devices) == ("i0", "demo-small-a", [0])
        assert not agent.is_ready() and not is_zombie(pid)
        refused = await command(bus, s.node, CommandKind.prewarm, "demo-small-b", devices=(0,))
        assert not refused.ok and "device 0 is down" in refused.reason

        await asyncio.sleep(s.heartbeat_ttl_s * 1.2)  # past a liveness TTL: the node is still there
        view = (await state.node_views())[s.node]
        assert [(i.instance_id, i.devices) for i in view.instances] == [("i1", [1])]
        text_of(await infer(bus, "i1", prompt="hello", max_tokens=4))

        await eventually(agent.is_ready, 300, "device 0's worker restarted", pause_s=0.5)
        status = await bus.request(bus.subjects.device_call(s.node, 0), DeviceCall(op=DeviceOp.status), CommandResult)
        assert status.detail["pid"] == agent.workers.pid(0) != pid
        assert view.devices[0].free_bytes == 0 and agent.view().devices[0].free_bytes > 0


def test_device_workers_of_a_killed_agent_exit_after_the_orphan_timeout(settings):
    """No orphans for good: SIGKILL the agent process and start none; its vLLM device workers exit on
    their own once no agent has called them for worker_orphan_timeout_s (after their vLLM import)."""
    env = dict(os.environ, **settings.with_overrides(devices=2, engine="vllm", worker_orphan_timeout_s=2.0).as_env())
    agent = subprocess.Popen([sys.executable, "-m", "services.gpuagent"], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)

    def workers() -> list[int]:
        found = []
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and b"gpuagent.worker" in (entry / "cmdline").read_bytes() and \
                        f"WARMSERVE_NAMESPACE={settings.namespace}".encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
        return found

    deadline = time.monotonic() + 60
    while len(workers()) < 2:
        assert time.monotonic() < deadline and agent.poll() is None
        time.sleep(0.2)
    agent.send_signal(signal.SIGKILL)  # while the workers may still be importing vLLM
    agent.wait()
    deadline = time.monotonic() + 90  # the import (about 16 s, longer on a busy box), then the timeout
    while workers():
        assert time.monotonic() < deadline, f"orphaned device workers: {workers()}"
        time.sleep(0.2)
