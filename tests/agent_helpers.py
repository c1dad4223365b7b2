"""Helpers for tests that drive a GPU agent over real NATS/Redis: registering models, sending
commands, running one inference and collecting its chunks."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import uuid
from pathlib import Path

from services.forecaster.service import ForecasterService
from services.gateway.service import GatewayService
from services.gpuagent.service import AgentService
from services.placer.service import PlacerService
from shared.bus import Bus
from shared.runner import Running
from shared.settings import load_settings
from shared.state import State
from shared.schemas import (AgentCommand, CommandKind, CommandResult, Event, InferChunk, InferRequest, ModelInfo,
                            SamplingSpec)


def fake_model(name: str, size_bytes: int = 8 << 20, arch: str = "a1") -> ModelInfo:
    return ModelInfo(name=name, path=f"/nonexistent/{name}", size_bytes=size_bytes, content_hash="h-" + name,
                     arch=arch, max_model_len=256, kv_bytes_per_token=1024)


async def command(bus: Bus, node: str, kind: CommandKind, model: str = "", devices=(0,), instance_id: str = "",
                  command_id: str | None = None, timeout_s: float = 60, reason: str = "") -> CommandResult:
    cmd = AgentCommand(command_id=command_id or uuid.uuid4().hex, kind=kind, model=model, devices=list(devices),
                       instance_id=instance_id, reason=reason)
    return await bus.request(bus.subjects.agent_command(node), cmd, CommandResult, timeout_s=timeout_s)


async def infer(bus: Bus, instance_id: str, prompt: str | None = "hello", max_tokens: int = 4,
                messages=None, timeout_s: float = 60, cancel_after: int | None = None) -> list[InferChunk]:
    request_id = uuid.uuid4().hex
    reply = bus.subjects.infer_reply("test", request_id)
    chunks: list[InferChunk] = []

    async def collect():
        async for chunk in bus.stream(reply, InferChunk):
            chunks.append(chunk)
            if cancel_after is not None and len(chunks) == cancel_after:
                from shared.schemas import CancelInference

                await bus.publish(bus.subjects.infer_cancel(instance_id), CancelInference(request_id=request_id))
            if chunk.finish_reason or chunk.error:
                return

    task = asyncio.create_task(collect())
    await asyncio.sleep(0.05)  # let the reply subscription reach the server
    await bus.nc.flush()
    await bus.publish(bus.subjects.infer(instance_id), InferRequest(
        request_id=request_id, model="", reply_to=reply, prompt=prompt, messages=messages,
        sampling=SamplingSpec(max_tokens=max_tokens, temperature=0, ignore_eos=True)))
    await asyncio.wait_for(task, timeout_s)
    return chunks


@contextlib.asynccontextmanager
async def agent_events(bus: Bus, name: str):
    """A queue that receives every agent event called `name` while the context is open."""
    events: asyncio.Queue[Event] = asyncio.Queue()

    async def collect():
        async for event in bus.stream(bus.subjects.event("agent", name), Event):
            events.put_nowait(event)

    task = asyncio.create_task(collect())
    await asyncio.sleep(0.05)  # let the subscription reach the server
    await bus.nc.flush()
    try:
        yield events
    finally:
        task.cancel()


async def kill_device_worker(agent: AgentService, bus: Bus, device: int, timeout_s: float) -> tuple[Event, int, float]:
    """kill -9 a device worker: its agent's instance_failed event, the pid killed, and the seconds until
    that event arrived."""
    pid = agent.workers.pid(device)
    async with agent_events(bus, "instance_failed") as failed:
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        event = await asyncio.wait_for(failed.get(), timeout_s)
    return event, pid, time.monotonic() - killed_at

def is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False  # reaped: no such process any more


async def eventually(check, timeout_s: float, what: str, pause_s: float = 0.05):
    """Poll `check()` (sync or async) until it returns something truthy; that value, or fail after `timeout_s`."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        value = check()
        value = await value if asyncio.iscoroutine(value) else value
        if value:
            return value
        assert asyncio.get_running_loop().time() < deadline, f"not within {timeout_s} s: {what}"
        await asyncio.sleep(pause_s)


@contextlib.asynccontextmanager
async def running_agent(settings, models: list[ModelInfo]):
    """An agent in this process with `models` registered: yields (running, client bus, state)."""
    state = await State.connect(settings)
    for info in models:
        await state.register_model(info)
    running = await Running.start(AgentService(settings), with_health=False)
    bus = await Bus.connect(settings, "test-client")
    try:
        yield running, bus, state
    finally:
        await bus.close()
        if running.accepting:
            await running.shutdown()
        await state.close()


@contextlib.asynccontextmanager
async def running_stack(infra_servers, models, data_dir, **overrides):
    """The four services in this process on the session's servers, `models` registered; yields the
    gateway's base URL (real vLLM engines unless `engine` is overridden)."""
    nats, redis = infra_servers
    s = load_settings({"namespace": "st" + uuid.uuid4().hex[:8], "nats_url": nats.url, "redis_url": redis.url,
                       "data_dir": str(data_dir)}, env={})
    s = s.with_overrides(**{"engine": "vllm", "gateway_port": 0, "heartbeat_s": 0.5, "placer_tick_s": 0.5,
                            **overrides})
    state = await State.connect(s)
    for info in models:
        await state.register_model(info)
    await state.close()
    services = [await Running.start(cls(s), with_health=False)
                for cls in (AgentService, ForecasterService, PlacerService, GatewayService)]
    try:
        yield f"http://127.0.0.1:{services[-1].service.port}"
    finally:
        for running in reversed(services):
            await running.shutdown()
