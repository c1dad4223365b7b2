"""Forecast-driven prewarming end to end with real vLLM (CPU build): the four services in-process,
2 devices of 200 MiB (a serving instance takes 160 MiB: 4 models cannot all be resident), 10 s
windows. A model whose imported history says a burst is due in the current window is prewarmed
before its first request, which is then served by promoting that copy (event order asserted);
with prewarm off (a second placer takes over), a model with the same history finds no copy."""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx
import pytest

from services.forecaster.service import ForecasterService
from services.gateway.service import GatewayService
from services.gpuagent.service import AgentService
from services.placer.service import PlacerService
from shared.bus import Bus
from shared.runner import Running
from shared.schemas import Event, WindowLoad
from shared.settings import load_settings
from shared.state import State
from warmserve import history

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
MiB = 1 << 20
WINDOW_S = 10.0
PERIOD = 6  # windows between the imported bursts
MODELS = ("prewarmed", "unforecast", "steady-a", "steady-b")  # one checkpoint under four names


def burst_history(end_s: float) -> list[WindowLoad]:
    """Five periods of history ending at `end_s`, with a burst every PERIOD windows: the next is due
    in the window starting at `end_s`."""
    starts = [end_s - WINDOW_S * k for k in range(5 * PERIOD, 0, -1)]
    return [WindowLoad(window_start_s=s, avg=4.0 if k % PERIOD == 0 else 0.0, peak=8.0 if k % PERIOD == 0 else 0.0)
            for s, k in zip(starts, range(5 * PERIOD, 0, -1))]


async def next_window_middle() -> float:
    """Sleep until a few seconds into a window (its predecessor closed); the window's start."""
    now = time.time()
    start = (now // WINDOW_S) * WINDOW_S
    if now - start > 5.0:
        start += WINDOW_S
    await asyncio.sleep(max(start + 2.0 - now, 0.0))
    return start


async def wait_event(events: list[Event], name: str, model: str, timeout_s: float = 60.0) -> Event:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = [e for e in events if e.name == name and e.model == model]
        if found:
            return found[0]
        await asyncio.sleep(0.05)
    raise AssertionError(f"no {name} of {model} in {timeout_s} s: {[(e.name, e.model) for e in events]}")


async def complete(client: httpx.AsyncClient, model: str) -> float:
    """One request through the gateway; returns when it was sent."""
    sent = time.time()
    resp = await client.post("/v1/completions", json={"model": model, "prompt": "def main(", "max_tokens": 4})
    assert resp.status_code == 200, resp.text
    return sent


async def test_forecast_prewarms_before_the_burst_and_prewarm_off_misses(infra_servers, demo_models, tmp_path):
    nats, redis = infra_servers
    s = load_settings({"namespace": "live" + uuid.uuid4().hex[:8], "nats_url": nats.url, "redis_url": redis.url,
                       "data_dir": str(tmp_path)}, env={})
    s = s.with_overrides(engine="vllm", devices=2, device_memory_bytes=200 * MiB, kv_cache_bytes=32 * MiB,
                         gateway_port=0, heartbeat_s=0.5, placer_tick_s=0.5, window_s=WINDOW_S)
    state = await State.connect(s)
    for name in MODELS:
        await state.register_model(demo_models["demo-small-a"].model_copy(update={"name": name}))
    await state.close()
    bus = await Bus.connect(s, "test-events")
    events: list[Event] = []

    async def collect(event: Event) -> None:
        events.append(event)

    await bus.subscribe(bus.subjects.domain_events("agent"), Event, collect)
    agent = await Running.start(AgentService(s), with_health=False)
    services = [await Running.start(cls(s), with_health=False) for cls in (ForecasterService, GatewayService)]
    placer = await Running.start(PlacerService(s), with_health=False)
    try:
        await asyncio.wait_for(agent.service._warming, 180)  # one idle engine per device
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{services[1].service.port}", timeout=300) as client:
            # prewarm on: the imported history says a burst of "prewarmed" is due in this window
            start_s = await next_window_middle()
            await history.send(s, {"prewarmed": burst_history(start_s)})
            prewarm = await wait_event(events, "prewarm_finished", "prewarmed", timeout_s=WINDOW_S)
            assert prewarm.reason.startswith("prewarm_")  # placed from the forecast
            sent = await complete(client, "prewarmed")
            starting = await wait_event(events, "instance_starting", "prewarmed")
            assert prewarm.at_s < sent < starting.at_s
            assert starting.detail["start"] == "forecast_prewarm"
            assert (await wait_event(events, "instance_ready", "prewarmed")).detail["start"] == "forecast_prewarm"

            # prewarm off: the same history for a model never requested, under a placer that does not prewarm
            await placer.shutdown()
            placer = await Running.start(PlacerService(s.with_overrides(prewarm=False)), with_health=False)
            start_s = await next_window_middle()
            await history.send(s, {"unforecast": burst_history(start_s)})
            await asyncio.sleep(3.0)  # a few ticks of the new placer
            sent = await complete(client, "unforecast")
            starting = await wait_event(events, "instance_starting", "unforecast")
            assert sent < starting.at_s and starting.detail["start"] == "miss"
            assert not [e for e in events if e.name == "prewarm_started" and e.model == "unforecast"
                        and e.at_s < sent]
    finally:
        for running in (placer, *reversed(services), agent):
            if running.accepting:
                await running.shutdown()
        await bus.close()
