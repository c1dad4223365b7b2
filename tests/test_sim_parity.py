"""Parity of the live placer and the simulator: scripted scenarios (forecasts, instance needs,
changed forecasts, quiet ticks) run through the live shells (PlacerService and two fake-engine
AgentServices over real NATS and Redis) and through the simulator's PlacerShell with the same
inputs; both must order the same effects, step by step. The live tick reads the wall clock, so
instance ids (which embed the time) are compared by first appearance. The first scenario has room
for everything and no decision depends on the time (instances stay within their protection window);
the second gives each GPU room for two copies only and a 1 ms protection window (the simulator steps
a minute, the live steps take longer than 1 ms), so promotions evict and a need displaces."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from services.placer import adapter
from services.placer.core import allocate, tick
from services.gpuagent.service import AgentService
from services.placer.service import PlacerService
from shared.runner import Running
from shared.schemas import InstanceNeed
from shared.state import State
from sim.cluster import Cluster
from sim.engine import EventLoop
from sim.serving import Requests, Serving
from sim.systems.placer_shell import PlacerShell
from sim.timing import GpuProfile, ModelProfile, TimingProfile
from tests.test_placer_service import MODELS, MiB, cluster, eventually, forecast, held_copies  # noqa: F401

STEPS = (  # (what, forecasts as {model: (avg, peak)} or the model that needs an instance)
    ("tick", {"m1": (40.0, 70.0), "m2": (10.0, 10.0)}),
    ("need", "m2"),
    ("tick", {"m1": (0.0, 0.0), "m2": (10.0, 10.0), "m3": (40.0, 40.0)}),
    ("tick", {"m1": (0.0, 0.0), "m2": (10.0, 10.0), "m3": (40.0, 40.0)}),
)
TIGHT_MODELS = ("m1", "m2", "m3", "m4", "m5")
TIGHT_STEPS = (  # 2 nodes x 2 GPUs of 20 MiB: two 8 MiB copies per GPU, or one instance (8 + 8 + 2 MiB)
    ("tick", {"m1": (64.0, 64.0), "m2": (64.0, 64.0), "m3": (32.0, 32.0), "m4": (32.0, 32.0)}),
    ("need", "m1"),
    ("need", "m2"),
    ("need", "m3"),
    ("need", "m4"),
    ("need", "m5"),  # every GPU serves an idle instance: one is displaced
    ("tick", {"m1": (0.0, 0.0), "m2": (0.0, 0.0), "m3": (0.0, 0.0), "m4": (0.0, 0.0), "m5": (32.0, 32.0)}),
)
TIGHT = {"device_memory_bytes": 20 * MiB, "scale_window_s": 0.001}


def normalised(steps: list[list]) -> list[list[tuple]]:
    """Effects with node names as the live agents', instance ids by first appearance, and KV bytes
    left out (the simulator books the agent's engine memory as KV: the same pages to the core)."""
    ids: dict[str, str] = {}
    out = []
    for effects in steps:
        row = []
        for e in effects:
            fields = {"node": "n" + e.node.removeprefix("node").removeprefix("n")}
            if hasattr(e, "instance_id"):
                fields["instance_id"] = ids.setdefault(e.instance_id, f"i{len(ids)}")
            if hasattr(e, "kv_bytes"):
                fields["kv_bytes"] = 0
            row.append(dataclasses.replace(e, **fields))
        out.append(row)
    return out


async def live_decisions(s, state, steps=STEPS, scale_window_s: float = 600.0) -> list[list]:
    placer = PlacerService(s.with_overrides(placer_tick_s=3600.0, scale_window_s=scale_window_s))
    running = await Running.start(placer, with_health=False)  # its first tick has no forecasts: no effects
    recorded: list[list] = []
    submit = placer.dispatcher.submit
    placer.dispatcher.submit = lambda effects: (recorded[-1].extend(effects), submit(effects))
    for what, arg in steps:
        recorded.append([])
        if what == "tick":
            for model, (avg, peak) in arg.items():
                await forecast(state, model, avg, peak)
            await placer.tick()
        else:
            await placer.on_need(InstanceNeed(model=arg))
        await placer.dispatcher.drain()
        await eventually(lambda: _settled(state), what="agents idle")
    await running.shutdown()
    return recorded


async def _settled(state) -> bool:
    views = await state.node_views()
    return all(c.state.value == "ready" for v in views.values() for c in v.copies) and \
        all(i.state.value == "ready" for v in views.values() for i in v.instances)


def sim_decisions(s, steps=STEPS, scale_window_s: float = 600.0, models=MODELS) -> list[list]:
    """The same steps through the simulator's shell, on a cluster shaped like the fake agents."""
    gpu = GpuProfile(memory_bytes=s.device_memory_bytes, reserved_bytes=0, host_to_gpu_bytes_s=1e9,
                     ssd_bytes_s=1e9, host_cache_bytes_per_node=1 << 40, engine_start_s=0.1, eager_engine_start_s=0.1,
                     promote_s=0.1,
                     worker_start_s=0.1, demote_s=0.01)
    fake = ModelProfile(size_bytes=8 * MiB, tp=1, kv_bytes_per_token=1024, prefill_s_per_token=1e-4,
                        prefill_overhead_s=0.001, decode_s_per_token=0.001, decode_batch_slowdown=0.0)
    loop = EventLoop(1000.0)
    sim = Cluster(loop, TimingProfile("fake", gpu, {"fake": fake}), 2, s.devices, {m: "fake" for m in models})
    none = np.zeros(0)
    serving = Serving(loop, sim, Requests(none, none, none, none), list(models))
    spec = {m: adapter.model_spec(fake_info(m), None, s) for m in models}
    shell = PlacerShell(sim, serving, s.max_inflight_per_instance,
                        {m: spec[m].kv_bytes + spec[m].engine_bytes for m in models})
    config = adapter.core_config(s.with_overrides(scale_window_s=scale_window_s))
    forecasts: dict[str, tuple[float, float]] = {}
    recorded = []
    for what, arg in steps:
        if what == "tick":
            forecasts.update(arg)
            effects = tick(shell.snapshot(forecasts, {}), loop.now, config)
        else:
            effects = list(allocate(shell.snapshot(forecasts, {}), arg, loop.now, config).effects)
        shell.execute(effects, loop.now)
        recorded.append(effects)
        loop.run(none, lambda i: None, loop.now + 60.0)  # loads and starts finish
    assert not shell.refused
    return recorded


def fake_info(name: str):
    from tests.agent_helpers import fake_model
    return fake_model(name, 8 * MiB)


async def test_live_and_simulated_placer_decide_the_same(cluster):  # noqa: F811
    s, state, bus, agents, start_placer = cluster
    live = normalised(await live_decisions(s, state))
    simulated = normalised(sim_decisions(s))
    kinds = [sorted({type(e).__name__ for e in step}) for step in live]
    assert kinds == [["Prewarm"], ["Promote"], ["Prewarm"], []], live
    assert live == simulated


@pytest.fixture
async def tight_cluster(settings):
    """Like test_placer_service's cluster, with GPUs that hold two copies or one instance."""
    s = settings.with_overrides(engine="fake", devices=2, fake_token_s=0.001, fake_load_bytes_s=1e9, heartbeat_s=0.2,
                                heartbeat_ttl_s=1.0, kv_cache_bytes=2 * MiB, request_timeout_s=2.0,
                                device_memory_bytes=TIGHT["device_memory_bytes"])
    state = await State.connect(s)
    for name in TIGHT_MODELS:
        await state.register_model(fake_info(name))
    agents = [await Running.start(AgentService(s.with_overrides(node=node)), with_health=False)
              for node in ("n0", "n1")]
    yield s, state
    for running in agents:
        await running.shutdown()
    await state.close()


async def test_evictions_and_a_displacement_decide_the_same(tight_cluster):
    s, state = tight_cluster
    live = normalised(await live_decisions(s, state, TIGHT_STEPS, TIGHT["scale_window_s"]))
    simulated = normalised(sim_decisions(s, TIGHT_STEPS, TIGHT["scale_window_s"], TIGHT_MODELS))
    needs = [step for (what, _), step in zip(TIGHT_STEPS, live) if what == "need"]
    assert any(type(e).__name__ == "Prewarm" for step in needs for e in step), live  # copies re-placed at once
    reasons = {(type(e).__name__, e.reason) for step in live for e in step}
    assert {("Evict", "evicted_for"), ("Demote", "displaced_for")} <= reasons, live
    assert live == simulated
