"""Parity of the live placer and the simulator: one scripted scenario (forecasts, an instance need,
changed forecasts, a quiet tick) runs through the live shells (PlacerService and two fake-engine
AgentServices over real NATS and Redis) and through the simulator's PlacerShell with the same
inputs; both must order the same effects, step by step. The live tick reads the wall clock, so
instance ids (which embed the time) are compared by first appearance, and no decision in the
scenario depends on the time (instances stay within their protection window)."""

from __future__ import annotations

import dataclasses

import numpy as np

from services.placer import adapter
from services.placer.core import allocate, tick
from services.placer.service import PlacerService
from shared.runner import Running
from shared.schemas import InstanceNeed
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


async def live_decisions(s, state) -> list[list]:
    placer = PlacerService(s.with_overrides(placer_tick_s=3600.0, scale_window_s=600.0))
    running = await Running.start(placer, with_health=False)  # its first tick has no forecasts: no effects
    recorded: list[list] = []
    submit = placer.dispatcher.submit
    placer.dispatcher.submit = lambda effects: (recorded[-1].extend(effects), submit(effects))
    for what, arg in STEPS:
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


def sim_decisions(s) -> list[list]:
    """The same steps through the simulator's shell, on a cluster shaped like the fake agents."""
    gpu = GpuProfile(memory_bytes=s.device_memory_bytes, reserved_bytes=0, host_to_gpu_bytes_s=1e9,
                     ssd_bytes_s=1e9, host_cache_bytes_per_node=1 << 40, engine_start_s=0.1, promote_s=0.1,
                     demote_s=0.01)
    fake = ModelProfile(size_bytes=8 * MiB, tp=1, kv_bytes_per_token=1024, prefill_s_per_token=1e-4,
                        prefill_overhead_s=0.001, decode_s_per_token=0.001, decode_batch_slowdown=0.0)
    loop = EventLoop(1000.0)
    sim = Cluster(loop, TimingProfile("fake", gpu, {"fake": fake}), 2, s.devices, {m: "fake" for m in MODELS})
    none = np.zeros(0)
    serving = Serving(loop, sim, Requests(none, none, none, none), list(MODELS))
    spec = {m: adapter.model_spec(fake_info(m), None, s) for m in MODELS}
    shell = PlacerShell(sim, serving, s.max_inflight_per_instance,
                        {m: spec[m].kv_bytes + spec[m].engine_bytes for m in MODELS})
    config = adapter.core_config(s.with_overrides(scale_window_s=600.0))
    forecasts: dict[str, tuple[float, float]] = {}
    recorded = []
    for what, arg in STEPS:
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
