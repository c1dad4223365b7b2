"""GPU agent under faults, fake engine: a kill -9'd device worker (child processes, as with vLLM) is
reported, reaped, started again and warmed again while the other device serves, and the gateway
sends its requests without output elsewhere; a demoting instance answers requests with a 503,
never silence; the restart backoff policy."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import pytest

from services.gateway.service import GatewayService
from services.gpuagent.core.restarts import RestartPolicy, WorkerLife
from services.gpuagent.worker import engine_threads
from shared.runner import Running
from shared.schemas import CommandKind, CommandResult, DeviceCall, DeviceOp
from tests.agent_helpers import (command, eventually, fake_model, infer, is_zombie, kill_device_worker,
                                 running_agent)

MiB = 1 << 20


@pytest.mark.parametrize("deaths_after_s,delays", [
    ([0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1], [1, 2, 4, 8, 10, 10, 10]),  # dying young: doubling, capped
    ([0.1, 0.1, 100, 0.1], [1, 2, 1, 2]),  # up for a while: forgiven
])
def test_restart_backoff(deaths_after_s, delays):
    policy, life, now = RestartPolicy(base_s=1, max_s=10, stable_s=60), WorkerLife(), 0.0
    for up_s, delay in zip(deaths_after_s, delays):
        life.started(now)
        now += up_s
        assert life.died(now, policy) == now + delay
        now += delay


@pytest.mark.parametrize("setting,cores,devices,threads", [
    (0, 2, 1, 2), (0, 2, 2, 1), (0, 16, 1, 16), (0, 16, 3, 5), (0, 1, 2, 1), (4, 2, 1, 4)])
def test_engine_threads_share_the_cores_between_devices(setting, cores, devices, threads):
    assert engine_threads(setting, cores, devices) == threads


async def test_killed_worker_is_reported_reaped_restarted_and_warmed_while_the_other_serves(settings):
    s = settings.with_overrides(engine="fake", fake_worker_processes=True, devices=2, device_memory_bytes=64 * MiB,
                                kv_cache_bytes=2 * MiB, fake_token_s=0.001, fake_load_bytes_s=1e9, heartbeat_s=0.2,
                                heartbeat_ttl_s=1.0, worker_restart_s=2.0, warm_engines=True)
    async with running_agent(s, [fake_model("m1")]) as (running, bus, state):
        agent = running.service
        await asyncio.wait_for(agent._warming, 10)
        for device, instance_id in ((0, "i0"), (1, "i1")):
            assert (await command(bus, s.node, CommandKind.cold_start, "m1", devices=(device,),
                                  instance_id=instance_id)).ok
        assert agent.is_ready()
        event, pid, noticed_s = await kill_device_worker(agent, bus, 0, 5)
        assert noticed_s < 2.0
        assert (event.instance_id, event.model, event.devices, event.node) == ("i0", "m1", [0], s.node)
        assert not agent.is_ready()
        assert not is_zombie(pid)
        refused = await command(bus, s.node, CommandKind.prewarm, "m1", devices=(0,))
        assert not refused.ok and "device 0 is down" in refused.reason

        # the other device keeps serving, and the node stays alive in Redis past a liveness TTL
        await asyncio.sleep(s.heartbeat_ttl_s * 1.2)
        assert agent.workers.pid(0) == pid  # still down (restart backoff 2 s): the test covers the outage
        view = (await state.node_views())[s.node]
        assert [(i.instance_id, i.devices) for i in view.instances] == [("i1", [1])]
        assert view.devices[0].free_bytes == 0 and [c.devices for c in view.copies] == [[1]]
        assert (await infer(bus, "i1", max_tokens=3))[-1].finish_reason == "length"

        # back: a new worker answers, its engine is warmed again, the device takes commands again
        await eventually(agent.is_ready, 30, "the worker restarted")
        new_pid = agent.workers.pid(0)
        assert new_pid != pid
        status = await bus.request(bus.subjects.device_call(s.node, 0), DeviceCall(op=DeviceOp.status), CommandResult)
        assert status.detail["pid"] == new_pid
        await eventually(lambda: not agent._revivals, 10, "engine warmed again")
        assert set(agent.ledgers[0].engines) == {"a1"}
        again = await command(bus, s.node, CommandKind.cold_start, "m1", devices=(0,), instance_id="i0b")
        assert again.ok and again.detail["path"] == "warm_engine"
        assert (await infer(bus, "i0b", max_tokens=2))[-1].finish_reason == "length"


async def test_a_stopping_instance_answers_503_never_silence(settings):
    s = settings.with_overrides(engine="fake", devices=1, device_memory_bytes=64 * MiB, kv_cache_bytes=2 * MiB,
                                fake_token_s=0.01, fake_load_bytes_s=1e9, warm_engines=False)
    async with running_agent(s, [fake_model("m1")]) as (running, bus, state):
        assert (await command(bus, s.node, CommandKind.cold_start, "m1", instance_id="i1")).ok
        worker = running.service.workers.workers[0].inproc
        accepted = asyncio.create_task(infer(bus, "i1", max_tokens=60))  # 0.6 s: still running when the demote comes
        await eventually(lambda: worker._generations, 5, "generation started")
        demote = asyncio.create_task(command(bus, s.node, CommandKind.demote, instance_id="i1"))
        await eventually(lambda: "i1" in worker._closing, 5, "instance draining")
        late = await infer(bus, "i1", timeout_s=5)
        assert [(c.error_code, c.instance_id) for c in late] == [(503, "i1")]
        assert (await demote).ok
        assert (await accepted)[-1].finish_reason == "length"  # accepted before the demote: served in full
        after = await infer(bus, "i1", timeout_s=5)  # routed before the stop was seen
        assert after[-1].error_code == 503


async def test_a_request_without_output_on_a_killed_worker_is_served_by_another_instance(settings):
    """With the gateway: kill -9 the worker serving a request that has no token yet; the agent's
    instance_failed lets the gateway send it to the instance on the other device."""
    s = settings.with_overrides(engine="fake", fake_worker_processes=True, devices=2, device_memory_bytes=64 * MiB,
                                kv_cache_bytes=2 * MiB, fake_token_s=1.0, fake_load_bytes_s=1e9, heartbeat_s=0.2,
                                warm_engines=False, gateway_port=0, sample_interval_s=0.2)
    async with running_agent(s, [fake_model("m1")]) as (running, bus, state):
        gateway = await Running.start(GatewayService(s), with_health=False)
        try:
            assert (await command(bus, s.node, CommandKind.cold_start, "m1", devices=(0,), instance_id="i0")).ok
            scheduler = gateway.service.runtime.scheduler
            await eventually(lambda: scheduler.ready_instances("m1") == ["i0"], 5, "the gateway sees i0")
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.service.port}", timeout=30) as http:
                request = asyncio.create_task(http.post("/v1/completions", json={
                    "model": "m1", "prompt": "x", "max_tokens": 2}))
                await eventually(lambda: scheduler.instance_load("i0") == 1, 5, "the request reached i0")
                assert (await command(bus, s.node, CommandKind.cold_start, "m1", devices=(1,), instance_id="i1")).ok
                os.kill(running.service.workers.pid(0), signal.SIGKILL)  # before i0's first token (1 s)
                response = await asyncio.wait_for(request, 20)
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["text"] == " t0 t1"
        finally:
            await gateway.shutdown()


@pytest.mark.parametrize("how", ["sigterm", "left alone"])
def test_a_worker_whose_nats_is_gone_exits(tmp_path, how):
    """A stack torn down without its workers (kill -9 of `up` and its NATS) must not leave them
    running for ever: a SIGTERM ends one, and so does NATS staying unreachable for
    worker_bus_lost_exit_s."""
    import subprocess
    import sys

    from warmserve import infra

    nats = infra.start_nats(tmp_path, infra.free_port())
    log = tmp_path / "worker.log"
    worker = subprocess.Popen([sys.executable, "-m", "services.gpuagent.worker", "--device-index", "0",
                               "--engine", "fake", "--nats-url", nats.url, "--namespace", "gone",
                               "--worker-bus-lost-exit-s", "2"], stdout=subprocess.DEVNULL, stderr=log.open("w"))
    try:
        deadline = time.monotonic() + 30
        while "device_worker_ready" not in log.read_text():  # connected and serving
            assert worker.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        nats.stop()
        if how == "sigterm":
            time.sleep(0.5)
            worker.send_signal(signal.SIGTERM)
        assert worker.wait(15) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
