"""A (re)started placer reconciles before it acts: it scales nothing down until it has heard a whole
scale window of load (the core rule, then a restart under load with real agents), and no load
sample breaks a tick: non-finite values are skipped and samples of unregistered models ignored."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time

import pytest

from services.placer.core import (Config, Demote, Gpu, Instance, LoadPoint, ModelSpec, Node, snapshot_of, tick,
                                  windowed_load)
from shared.schemas import Event, LoadSample
from tests.test_placer_service import _collect, _stop, cluster, eventually  # noqa: F401 (cluster is a fixture)

GIB = 1 << 30


def idle_instances(count: int) -> tuple[Instance, ...]:
    return tuple(Instance(f"a{i}", "a", "n0", (i,), started_at_s=0.0, inflight=3) for i in range(count))


@pytest.mark.parametrize("unmeasured,downs", [(frozenset(), 3), (frozenset({"a"}), 0), (frozenset({"b"}), 3)])
def test_unmeasured_models_are_never_scaled_down(unmeasured, downs):
    nodes = (Node("n0", tuple(Gpu(d, 20 * GIB) for d in range(4))),)
    snap = snapshot_of(nodes, (ModelSpec("a", 4 * GIB, 1),), (), idle_instances(3), {"a": 0.0})
    snap = dataclasses.replace(snap, unmeasured=unmeasured)
    demotes = [e for e in tick(snap, 100, Config(prewarm=False)) if isinstance(e, Demote)]
    assert len(demotes) == downs


def test_unmeasured_models_still_scale_up():
    nodes = (Node("n0", tuple(Gpu(d, 20 * GIB) for d in range(4))),)
    snap = snapshot_of(nodes, (ModelSpec("a", 4 * GIB, 1),), (), idle_instances(1), {"a": 60.0})
    snap = dataclasses.replace(snap, unmeasured=frozenset({"a"}))
    assert len(tick(snap, 100, Config(prewarm=False))) == 2


@pytest.mark.parametrize("points,expected", [
    ([(10, 1, math.inf), (10, 1, 4.0)], 4.0),
    ([(10, 1, math.nan)], 0.0),
    ([(math.inf, 1, 4.0), (10, math.nan, 4.0), (10, 1, 2.0)], 2.0),
    ([(10, 1, 1e308), (9, 1, 1e308)], 1.7976931348623157e308),  # finite even when the sum overflows
])
def test_windowed_load_skips_non_finite_samples(points, expected):
    assert windowed_load([LoadPoint(*p) for p in points], 10, 5) == expected


def test_a_tick_survives_an_absurd_load():
    nodes = (Node("n0", tuple(Gpu(d, 20 * GIB) for d in range(2))),)
    load = windowed_load([LoadPoint(10, 1, 1e308), LoadPoint(9, 1, 1e308)], 10, 5)
    snap = snapshot_of(nodes, (ModelSpec("a", 4 * GIB, 1),), (), (), {"a": load})
    assert len(tick(snap, 10, Config(prewarm=False))) == 2  # every GPU, then no more room


async def test_restarted_placer_does_not_scale_down_busy_instances(cluster):
    s, state, bus, agents, start_placer = cluster
    window_s = 1.5

    async def gateway_samples():  # steady load for two instances
        while True:
            await bus.publish(bus.subjects.load_samples(), LoadSample(
                model="m1", at_s=time.time(), interval_s=0.2, avg_outstanding=40.0, peak_outstanding=40.0))
            await asyncio.sleep(0.2)

    sampler = asyncio.create_task(gateway_samples())
    first = await start_placer(scale_window_s=window_s)

    async def serving():
        views = await state.node_views()
        found = [i for v in views.values() for i in v.instances if i.state.value == "ready"]
        return found if len(found) == 2 else None

    await eventually(serving, what="two instances of m1")
    await asyncio.sleep(window_s)  # older than the protection: a scale-down could take them
    await first.shutdown()
    demotes: list[Event] = []
    watcher = asyncio.create_task(_collect(bus, "demote_ordered", demotes))
    await asyncio.sleep(0.1)
    second = await start_placer(scale_window_s=window_s)
    await eventually(lambda: asyncio.sleep(0, second.service.ticks >= 1), what="the first tick")
    await asyncio.sleep(2 * window_s)  # past the first window: the measured load keeps both
    assert [e.reason for e in demotes] == []
    assert len(await serving()) == 2
    await _stop(watcher)
    await _stop(sampler)


async def test_absurd_and_unknown_samples_do_not_break_ticks(cluster):
    s, state, bus, agents, start_placer = cluster
    running = await start_placer(scale_window_s=0.5)
    placer = running.service
    await placer.on_sample(LoadSample(model="m1", at_s=time.time(), interval_s=0.2, avg_outstanding=1e308,
                                      peak_outstanding=1e308))
    await placer.on_sample(LoadSample(model="m1", at_s=time.time(), interval_s=0.2, avg_outstanding=1e308,
                                      peak_outstanding=1e308))
    await placer.on_sample(LoadSample(model="nope", at_s=time.time(), interval_s=0.2, avg_outstanding=5.0,
                                      peak_outstanding=5.0))
    assert "nope" not in placer.samples
    ticks = placer.ticks
    assert await placer.tick() is not None and placer.ticks == ticks + 1


async def test_hearing_starts_again_after_a_nats_outage(cluster, monkeypatch):
    s, state, bus, agents, start_placer = cluster
    placer = (await start_placer(scale_window_s=0.5)).service
    started = placer.hearing_since_s
    with monkeypatch.context() as patch:
        patch.setattr(type(placer.bus.nc), "is_connected", property(lambda nc: False))
        await placer.keep_lease()
    assert placer.hearing_since_s > started  # a whole window after the outage before any scale-down
