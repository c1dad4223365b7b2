"""A periodic batch job learnt live, with no imported history: the four services in-process with
fake engines, 1 s windows, 2 devices of 160 MiB (an instance, 60 MiB copy + 96 MiB KV cache, fills
one). A steady model keeps device 0 serving; on device 1 a batch model's burst every 8 s alternates
with a filler model's request, each evicting the other's copy. After three periods the forecaster has found the period
and at least 80 % of the bursts are served by promoting a copy that a forecast placed."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from services.forecaster.service import ForecasterService
from services.gateway.service import GatewayService
from services.gpuagent.service import AgentService
from services.placer.service import PlacerService
from shared.bus import Bus
from shared.runner import Running
from shared.schemas import Event
from shared.state import State
from tests.agent_helpers import fake_model

pytestmark = pytest.mark.slow
MiB = 1 << 20
PERIOD_S = 8.0
BURST_PHASE_S = 0.7  # into its window: the forecast for the window is out by then
LEARN_PERIODS, MEASURED_PERIODS = 3, 5


async def ask(client: httpx.AsyncClient, model: str) -> None:
    resp = await client.post("/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 2})
    assert resp.status_code == 200, resp.text


async def steady(client: httpx.AsyncClient, stop: asyncio.Event) -> None:
    while not stop.is_set():
        await ask(client, "steady")
        await asyncio.sleep(0.1)


async def test_periodic_bursts_find_forecast_placed_copies(settings):
    s = settings.with_overrides(engine="fake", devices=2, device_memory_bytes=160 * MiB, kv_cache_bytes=96 * MiB,
                                fake_token_s=0.001, fake_load_bytes_s=1e10, gateway_port=0, heartbeat_s=0.2,
                                placer_tick_s=0.1, window_s=1.0, sample_interval_s=0.25, scale_window_s=1.0)
    state = await State.connect(s)
    for name in ("steady", "batch", "filler"):
        await state.register_model(fake_model(name, 60 * MiB))
    await state.close()
    bus = await Bus.connect(s, "test-events")
    starts: list[Event] = []

    async def collect(event: Event) -> None:
        if event.name == "instance_starting" and event.model == "batch":
            starts.append(event)

    await bus.subscribe(bus.subjects.event("agent", "instance_starting"), Event, collect)
    services = [await Running.start(cls(s), with_health=False)
                for cls in (AgentService, ForecasterService, PlacerService, GatewayService)]
    stop = asyncio.Event()
    try:
        await asyncio.wait_for(services[0].service._warming, 30)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{services[-1].service.port}", timeout=60) as client:
            background = asyncio.create_task(steady(client, stop))
            first = (time.time() // PERIOD_S + 1) * PERIOD_S
            bursts = []
            for k in range(LEARN_PERIODS + MEASURED_PERIODS):
                burst_s = first + k * PERIOD_S + BURST_PHASE_S
                await asyncio.sleep(max(burst_s - time.time(), 0.0))
                bursts.append(time.time())
                await asyncio.gather(*(ask(client, "batch") for _ in range(4)))
                await asyncio.sleep(max(burst_s + PERIOD_S / 2 - time.time(), 0.0))
                await ask(client, "filler")  # half a period later: takes device 1
            stop.set()
            await background
        found = []
        for burst_s in bursts[LEARN_PERIODS:]:
            first_start = next((e for e in starts if burst_s <= e.at_s < burst_s + PERIOD_S / 2), None)
            found.append(first_start.detail["start"] if first_start else "no start")
        print("what the measured bursts' instance starts found:", found)
        assert found.count("forecast_prewarm") >= 0.8 * MEASURED_PERIODS, found
    finally:
        stop.set()
        for running in reversed(services):
            await running.shutdown()
        await bus.close()
