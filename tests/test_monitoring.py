"""Monitoring as a user sees it: `warmserve watch` prints lifecycle events live (and replays
the stream), `warmserve status` shows devices x models and instances, `models list` the registry."""

from __future__ import annotations

import json
import subprocess
import sys

from services.gpuagent.service import AgentService
from shared.bus import Bus
from shared.runner import Running
from shared.schemas import CommandKind, Event
from shared.state import State
from tests.agent_helpers import command, fake_model
from warmserve import status, watch
from warmserve.models import list_models


def cli_flags(s) -> list[str]:
    return ["--namespace", s.namespace, "--nats-url", s.nats_url, "--redis-url", s.redis_url]


async def test_status_shows_serving_and_prewarmed_per_device(settings):
    s = settings.with_overrides(engine="fake", devices=2, device_memory_bytes=64 << 20, kv_cache_bytes=1 << 20)
    state = await State.connect(s)
    for name in ("m1", "m2"):
        await state.register_model(fake_model(name))
    running = await Running.start(AgentService(s), with_health=False)
    bus = await Bus.connect(s, "t")
    await command(bus, s.node, CommandKind.prewarm, "m2", devices=(1,))
    await command(bus, s.node, CommandKind.cold_start, "m1", devices=(0,), instance_id="i1")
    snap = await status.snapshot(s)
    rows = {(d["node"], d["device"]): d["models"] for d in snap["devices"]}
    assert rows == {(s.node, 0): {"m1": "serving"}, (s.node, 1): {"m2": "ready"}}
    table = status.render(snap)
    assert "node0/0" in table and "i1" in table
    assert [m.name for m in await list_models(s)] == ["m1", "m2"]
    await bus.close()
    await running.shutdown()
    await state.close()


def test_watch_renders_one_line_per_event():
    event = Event(name="instance_ready", at_s=0.0, model="m", node="n0", devices=[1], instance_id="i",
                  reason="prewarm_hit", detail={"promote_ms": 3})
    line = watch.render("ns.agent.evt.instance_ready", event, as_json=False)
    assert "instance_ready" in line and "n0/1" in line and "reason=prewarm_hit" in line
    assert json.loads(watch.render("s", event, as_json=True))["instance_id"] == "i"


async def test_watch_command_replays_then_follows_live(settings):
    bus = await Bus.connect(settings, "t")
    await bus.ensure_event_stream()
    await bus.publish_event("registry", Event(name="model_registered", at_s=1.0, model="old"))
    await bus.nc.flush()
    proc = subprocess.Popen([sys.executable, "-m", "warmserve.cli", "watch", "--json", "--since", "3600",
                             *cli_flags(settings)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert json.loads(proc.stdout.readline())["model"] == "old"  # replayed from the stream
        for model in ("other", "live"):
            await bus.publish_event("agent", Event(name="evicted", at_s=2.0, model=model))
        await bus.nc.flush()
        seen = [json.loads(proc.stdout.readline())["model"] for _ in range(2)]
        assert seen == ["other", "live"]
    finally:
        proc.terminate()
        proc.wait(10)
        await bus.close()
