"""Metrics from every service: in a running stack (fake engine, in process, real NATS and Redis),
each service's health port answers /metrics with its own metrics, filled in by what happened;
with metrics_auth, /metrics wants an API key."""

from __future__ import annotations

import asyncio
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from services.forecaster.service import ForecasterService
from services.gateway.service import GatewayService
from services.gpuagent.service import AgentService
from services.placer.service import PlacerService
from shared.runner import HealthServer, Running
from shared.state import State
from tests.agent_helpers import fake_model


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(found: dict, name: str, **labels: str) -> float | None:
    """The value of the first sample named `name` whose labels include `labels`."""
    return next((v for (n, ls), v in found.items() if n == name and set(labels.items()) <= ls), None)


# per service: samples that must appear once a request has been served and a window has closed
EXPECTED = {
    "gpuagent": [("warmserve_agent_device_budget_bytes", {"device": "0"}),
                 ("warmserve_agent_model_resident", {"model": "m1", "state": "serving"}),
                 ("warmserve_agent_command_seconds_count", {"kind": "cold_start", "ok": "true"}),
                 ("warmserve_agent_engine_bytes", {"use": "serving"}),
                 ("warmserve_agent_prewarmed_bytes_total", {})],
    "placer": [("warmserve_placer_tick_seconds_count", {}), ("warmserve_placer_leader", {}),
               ("warmserve_placer_instances", {"model": "m1", "source": "observed"}),
               ("warmserve_placer_live_nodes", {})],
    "forecaster": [("warmserve_forecaster_forecast", {"model": "m1", "stat": "avg"}),
                   ("warmserve_forecaster_actual", {"model": "m1", "stat": "peak"}),
                   ("warmserve_forecaster_abs_error", {"model": "m1", "stat": "avg"})],
    "gateway": [("warmserve_gateway_ttft_seconds_count", {"model": "m1"}),
                ("warmserve_gateway_requests_total", {"model": "m1", "status": "200"})],
}


async def test_every_service_serves_its_metrics(settings):
    s = settings.with_overrides(engine="fake", fake_token_s=0.0, devices=2, device_memory_bytes=64 << 20,
                                kv_cache_bytes=1 << 20, warm_engines=False, gateway_port=0, heartbeat_s=0.2,
                                placer_tick_s=0.2, window_s=1.0, sample_interval_s=0.2)
    state = await State.connect(s)
    await state.register_model(fake_model("m1"))
    services = [await Running.start(cls(s)) for cls in (AgentService, ForecasterService, PlacerService,
                                                         GatewayService)]
    try:
        gateway_url = f"http://127.0.0.1:{services[-1].service.port}"
        async with httpx.AsyncClient(timeout=30) as client:
            resp = await client.post(gateway_url + "/v1/completions",
                                     json={"model": "m1", "prompt": "hi", "max_tokens": 2})
            assert resp.status_code == 200, resp.text
            missing: list[str] = []
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:  # a window must close and a tick pass: poll, do not sleep blind
                missing = []
                for running in services:
                    text = (await client.get(f"http://127.0.0.1:{running.health.port}/metrics")).text
                    found = samples(text)
                    missing += [f"{running.service.name}: {name} {labels}"
                                for name, labels in EXPECTED[running.service.name]
                                if value(found, name, **labels) is None]
                if not missing:
                    break
                await asyncio.sleep(0.2)
            assert not missing
            found = samples((await client.get(gateway_url + "/metrics")).text)  # the gateway's own port too
            assert value(found, "warmserve_gateway_ttft_seconds_count", model="m1") == 1
            placer = samples((await client.get(f"http://127.0.0.1:{services[2].health.port}/metrics")).text)
            assert value(placer, "warmserve_placer_leader") == 1
    finally:
        for running in reversed(services):
            await running.shutdown()
        await state.close()


async def test_metrics_want_an_api_key_when_asked():
    health = HealthServer("127.0.0.1", 0, lambda: True, lambda: b"m 1\n", api_keys=frozenset({"k1"}))
    assert health.answer("/metrics", "")[0].startswith("401")
    assert health.answer("/metrics", "Bearer k2")[0].startswith("401")
    assert health.answer("/metrics", "Bearer k1")[0:3:2] == ("200 OK", b"m 1\n")
    assert HealthServer("127.0.0.1", 0, lambda: True).answer("/metrics", "")[0].startswith("404")
