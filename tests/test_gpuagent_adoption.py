"""A GPU agent killed with kill -9 and started again adopts its device workers (fake engine in worker
processes, agents as real subprocesses): the instance keeps serving while no agent runs, the new
agent rebuilds its ledger from the workers' status (same pid, same instance, no instance_failed) and
supervises them by pid; a worker no agent calls exits after its orphan timeout; `warmserve up`'s
orphan reaping never takes its own children's exit status."""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from services.gpuagent.core.adoption import adopted_ledger
from services.gpuagent.core.ledger import KEPT_COPY, DeviceLedger
from services.gpuagent.workers import start_ticks
from shared.bus import Bus
from shared.schemas import CommandKind, CommandResult, DeviceCall, DeviceOp, InstanceState
from shared.state import State
from tests.agent_helpers import agent_events, command, eventually, fake_model, infer
from warmserve import infra
from warmserve.up import PR_SET_CHILD_SUBREAPER, reap_orphans

MiB = 1 << 20


def test_the_adopted_ledger_charges_what_the_commands_charged():
    built = DeviceLedger(0, 64 * MiB)
    built.reserve_copy("m1", "h-m1", 5 * MiB + 1, 1.0)
    built.copy_ready("m1")
    assert built.reserve_engine("a2", 2 * MiB, 1.0)
    built.start_instance("i1", "m1", "a1", 4 * MiB, 2.0)
    status = {"memory_bytes": 64 * MiB, "pool": [{"model": "m1", "content_hash": "h-m1", "bytes": 5 * MiB + 1}],
              "engines": [{"arch": "a1", "model": "m1", "kv_bytes": 4 * MiB},
                          {"arch": "a2", "model": "m2", "kv_bytes": 2 * MiB}],
              "instances": [{"instance_id": "i1", "model": "m1", "arch": "a1", "started_at_s": 2.0}]}
    adopted = adopted_ledger(0, status, 9.0)
    assert adopted.used_bytes == built.used_bytes and adopted.free_bytes == built.free_bytes
    assert adopted.idle_engine_bytes == built.idle_engine_bytes == built.engines["a2"].bytes
    assert {a: e.bytes for a, e in adopted.engines.items()} == {a: e.bytes for a, e in built.engines.items()}
    assert (adopted.instance.instance_id, adopted.instance.state, adopted.instance.started_at_s) == (
        "i1", InstanceState.ready, 2.0)
    assert adopted.copies["m1"].origin == KEPT_COPY and adopted.copies["m1"].bytes == built.copies["m1"].bytes


def test_orphan_reaping_leaves_own_children_to_popen():
    """In a subprocess (it becomes a subreaper): an orphaned grandchild is reaped; an own child that
    exited too keeps its exit status for Popen."""
    script = """
import os, subprocess, sys, time
from warmserve.up import become_subreaper, reap_orphans
become_subreaper()
parent = subprocess.Popen(["sh", "-c", "sleep 0.2 & echo $!"], stdout=subprocess.PIPE, text=True)
orphan = int(parent.stdout.readline())
assert parent.wait() == 0
own = subprocess.Popen([sys.executable, "-c", "raise SystemExit(7)"])
time.sleep(1.0)  # both have exited by now
reaped = reap_orphans({own.pid})
if not reaped:  # the peek found our own child first: it stays for Popen, then the orphan comes next
    assert own.poll() == 7
    reaped = reap_orphans({own.pid})
assert reaped == [orphan], (reaped, orphan)
assert not os.path.exists(f"/proc/{orphan}")
assert own.wait() == 7
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30,
                            cwd=Path(__file__).resolve().parent.parent)
    assert result.stdout.strip() == "ok", result.stderr


async def test_a_worker_no_agent_calls_exits_after_its_orphan_timeout(settings):
    s = settings.with_overrides(engine="fake", worker_orphan_timeout_s=2.0)
    worker = subprocess.Popen([sys.executable, "-m", "services.gpuagent.worker", "--device-index", "0"],
                              env=dict(os.environ, **s.as_env()))
    bus = await Bus.connect(s, "test-client")
    try:
        started = time.monotonic()

        async def answers():  # a call that is not an agent's (no boot id) keeps no worker alive
            try:
                status = await bus.request(bus.subjects.device_call(s.node, 0), DeviceCall(op=DeviceOp.status),
                                           CommandResult, timeout_s=1.0)
            except Exception:  # noqa: BLE001 - not up yet
                return None
            return status.detail["pid"]

        assert await eventually(answers, 30, "the worker answers") == worker.pid
        while worker.poll() is None:
            await answers()
            assert time.monotonic() - started < 30, "the orphaned worker did not exit"
            await asyncio.sleep(0.2)
        assert worker.returncode == 0
    finally:
        await bus.close()
        if worker.poll() is None:
            worker.kill()
            worker.wait()


@pytest.fixture
def subreaper(infra_servers):
    """This test process adopts orphaned descendants (as `warmserve up` does); reaps them at the end."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        pytest.skip("no child subreaper here (Linux only)")
    servers = {server.proc.pid for server in infra_servers}
    try:
        yield lambda: reap_orphans(servers)
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
        reap_orphans(servers)


class AgentProcess:
    """`warmserve service gpuagent` as a process of its own, as `warmserve up` starts it."""

    def __init__(self, settings, log: Path):
        self.port = infra.free_port()
        env = dict(os.environ, PYTHONUNBUFFERED="1", **settings.with_overrides(health_port=self.port).as_env())
        with open(log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "warmserve.cli", "service", "gpuagent"], env=env,
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    async def ready(self) -> bool:
        assert self.proc.poll() is None, f"the agent exited with {self.proc.returncode}"
        try:
            async with httpx.AsyncClient(timeout=1) as client:
                return (await client.get(f"http://127.0.0.1:{self.port}/readyz")).status_code == 200
        except httpx.HTTPError:
            return False


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


async def test_a_restarted_agent_adopts_its_workers_which_serve_throughout(settings, subreaper, tmp_path):
    s = settings.with_overrides(engine="fake", fake_worker_processes=True, devices=2, device_memory_bytes=64 * MiB,
                                kv_cache_bytes=2 * MiB, fake_token_s=0.001, fake_load_bytes_s=1e9, heartbeat_s=0.2,
                                heartbeat_ttl_s=1.0, worker_orphan_timeout_s=5.0,  # > a loaded box's agent start
                                worker_restart_s=0.2)
    state = await State.connect(s)
    await state.register_model(fake_model("m1"))
    bus = await Bus.connect(s, "test-client")
    log = tmp_path / "agent.log"
    agents = [AgentProcess(s, log)]
    served: list[float] = []  # when each request to i0 was answered in full
    failures: list[str] = []

    async def keep_asking():
        while True:
            chunks = await infer(bus, "i0", max_tokens=2, timeout_s=10)
            if chunks[-1].finish_reason != "length":
                failures.append(repr(chunks[-1]))
            served.append(time.monotonic())
            await asyncio.sleep(0.05)

    async def worker_pids() -> list[int]:
        results = [await bus.request(bus.subjects.device_call(s.node, d), DeviceCall(op=DeviceOp.status),
                                     CommandResult, timeout_s=2) for d in range(2)]
        return [r.detail["pid"] for r in results]

    asking = None
    try:
        await eventually(agents[0].ready, 60, "the first agent is ready", pause_s=0.2)
        assert (await command(bus, s.node, CommandKind.cold_start, "m1", devices=(0,), instance_id="i0")).ok
        assert (await command(bus, s.node, CommandKind.prewarm, "m1", devices=(1,))).ok
        pids = await worker_pids()
        asking = asyncio.create_task(keep_asking())
        await eventually(lambda: len(served) >= 3, 10, "requests served")
        async with agent_events(bus, "instance_failed") as failed, \
                agent_events(bus, "device_worker_adopted") as adopted:
            agents[0].proc.kill()  # kill -9: the workers outlive it
            assert agents[0].proc.wait(10) == -signal.SIGKILL
            killed = time.monotonic()
            await eventually(lambda: all(parent_of(p) == os.getpid() for p in pids), 5, "workers re-parented to us")
            await eventually(lambda: len([t for t in served if t > killed]) >= 5, 10, "served while no agent runs")

            agents.append(AgentProcess(s, log))
            await eventually(agents[1].ready, 60, "the second agent is ready", pause_s=0.2)
            assert await worker_pids() == pids
            events = sorted([adopted.get_nowait() for _ in range(adopted.qsize())], key=lambda e: e.devices)
            assert [(e.devices, e.detail["pid"], e.instance_id) for e in events] == [
                ([0], pids[0], "i0"), ([1], pids[1], "")]
            assert events[1].detail["copies"] == ["m1"]
            view = (await state.node_views())[s.node]
            assert [(i.instance_id, i.state, i.devices) for i in view.instances] == [("i0", InstanceState.ready, [0])]
            assert sorted((c.model, c.devices[0], c.state.value) for c in view.copies) == [
                ("m1", 0, "ready"), ("m1", 1, "ready")]
            assert view.devices[1].free_bytes < s.device_memory_bytes  # the copy is charged again
            # the new agent keeps its adopted workers past their orphan timeout, and they serve on
            await asyncio.sleep(s.worker_orphan_timeout_s * 1.5)
            assert await worker_pids() == pids and failed.empty()
            assert (await command(bus, s.node, CommandKind.promote, "m1", devices=(1,), instance_id="i1")).ok
            assert (await infer(bus, "i1", max_tokens=2))[-1].finish_reason == "length"

            # an adopted worker that dies is noticed by pid, reported and started again (we reap it, as up would)
            os.kill(pids[1], signal.SIGKILL)
            event = await asyncio.wait_for(failed.get(), 5)
            assert (event.instance_id, event.devices) == ("i1", [1])
            assert pids[1] in subreaper()
            await eventually(agents[1].ready, 30, "device 1's worker restarted", pause_s=0.2)
            restarted = (await worker_pids())[1]
            assert restarted not in pids
        assert not failures and len(served) > 10

        # a clean stop stops every worker, adopted or not; nothing is left behind, not even a zombie
        asking.cancel()
        agents[1].proc.terminate()
        assert agents[1].proc.wait(30) == 0
        await eventually(lambda: [start_ticks(p) for p in (*pids, restarted)] == [None] * 3, 5, "workers stopped")
        subreaper()
        assert not any(Path(f"/proc/{p}").exists() for p in (*pids, restarted))
    finally:
        if asking:
            asking.cancel()
        for agent in agents:
            if agent.proc.poll() is None:
                agent.proc.kill()
                agent.proc.wait()
        await bus.close()
        await state.close()
