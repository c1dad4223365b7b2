"""The placer in the whole stack with fake engines: gateway, forecaster, placer and two agents
(n0, n1) over real NATS and Redis; requests for cold models are held by the gateway, the placer
starts instances on distinct GPUs, and every request is answered."""

from __future__ import annotations

import asyncio

import httpx

from services.forecaster.service import ForecasterService
from services.gateway.service import GatewayService
from services.gpuagent.service import AgentService
from services.placer.service import PlacerService
from shared.runner import Running
from shared.state import State
from tests.agent_helpers import fake_model

MiB = 1 << 20


async def test_cold_models_served_through_gateway_and_placer(settings):
    s = settings.with_overrides(engine="fake", devices=2, device_memory_bytes=64 * MiB, fake_token_s=0.001,
                                fake_load_bytes_s=1e9, heartbeat_s=0.2, heartbeat_ttl_s=1.0, kv_cache_bytes=2 * MiB,
                                placer_tick_s=0.2, gateway_port=0)
    state = await State.connect(s)
    for name in ("m1", "m2", "m3"):
        await state.register_model(fake_model(name, 8 * MiB))
    services = [await Running.start(AgentService(s.with_overrides(node=node)), with_health=False)
                for node in ("n0", "n1")]
    services += [await Running.start(cls(s), with_health=False)
                 for cls in (ForecasterService, PlacerService, GatewayService)]
    port = services[-1].service.port
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            answers = await asyncio.gather(*[
                client.post("/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 4})
                for model in ("m1", "m2", "m3") for _ in range(3)])
        assert [a.status_code for a in answers] == [200] * 9, [a.text for a in answers if a.status_code != 200]
        views = await state.node_views()
        serving = sorted((i.model, v.node, i.devices[0]) for v in views.values() for i in v.instances)
        assert sorted(m for m, _, _ in serving) == ["m1", "m2", "m3"]  # one instance each: no duplicates
        assert len({(n, d) for _, n, d in serving}) == 3
    finally:
        for running in reversed(services):
            await running.shutdown()
        await state.close()
