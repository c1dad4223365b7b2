"""Forecaster service over real NATS and Redis, in-process, with an injected clock: a restart
mid-window loses no history, forecasts are published as events and answered on request, every
registered model is forecast whether or not it had requests, imported history (a CSV through the
CLI, refused when it does not fit) is learnt at once and exported back, and
malformed samples and those of unregistered models are rejected with a logged reason while
serving goes on."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from services.forecaster.core.windows import PartialWindows, WindowStats
from services.forecaster.service import FORECAST_EVENT, ForecasterService
from shared.bus import Bus
from shared.runner import Running
from shared.schemas import CommandResult, Event, Forecast, ForecastQuery, ForecastSet, HistoryImport, LoadSample, WindowLoad
from shared.state import State
from tests.agent_helpers import fake_model


class FakeClock:
    def __init__(self, now_s: float):
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


async def wait_for(condition, timeout_s: float = 10.0) -> None:
    """Poll an observable condition (sync or async) until it holds."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


@pytest.fixture
async def harness(settings):
    s = settings.with_overrides(window_s=10.0, sample_interval_s=1.0)
    client = await Bus.connect(s, "test-client")
    state = await State.connect(s)
    for name in ("a", "good", "bad"):
        await state.register_model(fake_model(name))
    events: list[Event] = []

    async def collect(event: Event) -> None:
        events.append(event)

    await client.subscribe(client.subjects.event("forecast", FORECAST_EVENT), Event, collect)
    yield s, client, state, events
    await client.close()
    await state.close()


async def start(settings, clock) -> Running:
    return await Running.start(ForecasterService(settings, clock, tick_s=0.02), with_health=False)


async def send(client: Bus, at_s: list[float], avg: float, peak: float, model: str = "a") -> None:
    for at in at_s:
        await client.publish(client.subjects.load_samples(),
                             LoadSample(model=model, at_s=at, interval_s=1.0, avg_outstanding=avg, peak_outstanding=peak))
    await client.nc.flush()


def covered(state: State, model: str, window_start_s: float, seconds: float):
    async def check() -> bool:
        partial = await state.hget(state.keys.partial_window(), model, PartialWindows)
        return partial is not None and any(w.window_start_s == window_start_s and w.covered_s == pytest.approx(seconds)
                                           for w in partial.windows)
    return check


def published(events: list[Event], window_start_s: float):
    return lambda: any(e.detail.get("window_start_s") == window_start_s for e in events)


async def test_restart_mid_window_loses_nothing(harness):
    settings, client, state, events = harness
    clock = FakeClock(1000.5)
    running = await start(settings, clock)
    await send(client, [1001.0 + k for k in range(10)], avg=2.0, peak=3.0)  # window [1000, 1010)
    await wait_for(covered(state, "a", 1000.0, 10.0))
    clock.now_s = 1013.2  # window 100 is due (1 s grace)
    await wait_for(published(events, 1010.0))
    await send(client, [1011.0, 1012.0, 1013.0], avg=4.0, peak=6.0)  # first 3 s of [1010, 1020)
    await wait_for(covered(state, "a", 1010.0, 3.0))
    await running.shutdown()

    clock.now_s = 1013.5
    running = await start(settings, clock)
    await send(client, [1014.0 + k for k in range(7)], avg=4.0, peak=6.0)  # the rest of [1010, 1020)
    await wait_for(covered(state, "a", 1010.0, 10.0))
    clock.now_s = 1021.5
    await wait_for(published(events, 1020.0))

    history = await state.hgetall(state.keys.window_history("a"), WindowStats)
    assert (history["100"].avg, history["100"].peak, history["100"].covered_s) == (2.0, 3.0, 10.0)
    assert (history["101"].avg, history["101"].peak, history["101"].covered_s) == (4.0, 6.0, 10.0)
    service = running.service
    history_of_a = service.forecaster.history.lags(service.forecaster.history.avg, 102, np.array([1, 2]))
    assert history_of_a[service.forecaster.history.rows["a"]].tolist() == [4.0, 2.0]
    answer = await client.request(client.subjects.forecast_query(), ForecastQuery(models=["a"]), ForecastSet)
    assert [f.model for f in answer.forecasts] == ["a"]
    current = answer.forecasts[0]
    assert current.window_start_s == 1020.0 and current.window_s == 10.0 and current.method.startswith("ours:")
    last_event = [e for e in events if e.detail["window_start_s"] == 1020.0 and e.model == "a"][-1]
    assert Forecast.model_validate(last_event.detail) == current
    await running.shutdown()


async def test_malformed_samples_rejected_and_serving_goes_on(harness, capsys):
    settings, client, state, events = harness
    clock = FakeClock(2000.5)
    running = await start(settings, clock)
    await client.nc.publish(client.subjects.load_samples(), b"\xc1garbage")
    await send(client, [2001.0], avg=5.0, peak=1.0, model="bad")  # peak below average
    await send(client, [9000.0], avg=1.0, peak=1.0, model="bad")  # from the future
    await send(client, [2001.0], avg=1.0, peak=1.0, model="stranger")  # not registered
    await send(client, [2001.0, 2002.0], avg=1.0, peak=2.0, model="good")
    await wait_for(covered(state, "good", 2000.0, 2.0))
    err = capsys.readouterr().err
    assert "message_rejected" in err
    assert "load_sample_rejected" in err and "peak_outstanding below avg_outstanding" in err and "future" in err
    assert "model not registered" in err
    assert await state.hget(state.keys.partial_window(), "bad", PartialWindows) is None
    assert await state.hget(state.keys.partial_window(), "stranger", PartialWindows) is None

    clock.now_s = 2011.5
    await wait_for(published(events, 2010.0))
    answer = await client.request(client.subjects.forecast_query(), ForecastQuery(models=["good", "nope"]), ForecastSet)
    assert [f.model for f in answer.forecasts] == ["good"]
    assert answer.forecasts[0].avg > 0
    await running.shutdown()


async def test_windows_missed_while_down_stay_unknown(harness):
    settings, client, state, events = harness
    clock = FakeClock(3000.5)
    running = await start(settings, clock)
    await send(client, [3001.0, 3002.0], avg=3.0, peak=3.0)
    await wait_for(covered(state, "a", 3000.0, 2.0))
    clock.now_s = 3011.5
    await wait_for(published(events, 3010.0))
    await running.shutdown()

    clock.now_s = 3039.5  # down during windows 301..303, nothing was saved for them
    running = await start(settings, clock)
    clock.now_s = 3051.5
    await wait_for(published(events, 3050.0))
    history = await state.hgetall(state.keys.window_history("a"), WindowStats)
    assert sorted(history) == ["300", "304"]  # 304 was watched (no samples: zero load)
    assert history["304"].avg == 0.0
    await running.shutdown()


async def test_every_registered_model_is_forecast_without_requests(harness):
    settings, client, state, events = harness
    clock = FakeClock(4000.5)
    running = await start(settings, clock)
    await state.register_model(fake_model("late"))  # registered while running, never requested
    clock.now_s = 4011.5
    await wait_for(published(events, 4010.0))
    answer = await client.request(client.subjects.forecast_query(), ForecastQuery(), ForecastSet)
    assert [f.model for f in answer.forecasts] == ["a", "bad", "good", "late"]
    assert all(f.window_start_s == 4010.0 and f.window_s == 10.0 and f.avg == 0.0 for f in answer.forecasts)
    history = await state.hgetall(state.keys.window_history("late"), WindowStats)
    assert sorted(history) == ["400"] and history["400"].avg == 0.0
    await running.shutdown()


async def test_imported_periodic_history_is_forecast_at_once_and_exported(harness, tmp_path):
    from warmserve import history as cli

    settings, client, state, events = harness
    clock = FakeClock(5000.5)  # windows before 499 are closed
    running = await start(settings, clock)
    rows = ["model,window_start_s,avg,peak"] + [f"a,{10.0 * i},{10.0 if i % 5 == 4 else 0.0},{20.0 if i % 5 == 4 else 0.0}"
                                                for i in range(400, 500)]
    (tmp_path / "in.csv").write_text("\n".join(rows) + "\n")
    flags = ["--namespace", settings.namespace, "--nats-url", settings.nats_url, "--redis-url", settings.redis_url,
             "--window-s", "10"]
    assert await asyncio.to_thread(cli.main, ["import", "--csv", str(tmp_path / "in.csv"), *flags]) == 0
    history = await state.hgetall(state.keys.window_history("a"), WindowStats)
    assert len(history) == 99 and "499" not in history  # window 499 is still open: skipped
    await wait_for(published(events, 4990.0))
    current = (await client.request(client.subjects.forecast_query(), ForecastQuery(models=["a"]), ForecastSet)).forecasts[0]
    assert current.window_start_s == 4990.0 and current.peak == pytest.approx(20.0)  # 499 % 5 == 4: a burst
    assert current.method.startswith("ours:period")

    assert await asyncio.to_thread(cli.main, ["export", "--csv", str(tmp_path / "out.csv"), "--models", "a", *flags]) == 0
    with open(tmp_path / "out.csv") as out:
        exported = cli.read_csv(out, 10.0)["a"]
    assert [(w.window_start_s, w.avg, w.peak) for w in exported] == [
        (10.0 * i, 10.0 if i % 5 == 4 else 0.0, 20.0 if i % 5 == 4 else 0.0) for i in range(400, 499)]

    assert await asyncio.to_thread(cli.main, ["import", "--workload", "--models", "good,bad", "--compress", "600",
                                              "--learn-days", "1", "--rate", "2", "--end-s", "5000.5", *flags]) == 0
    assert len(await state.hgetall(state.keys.window_history("good"), WindowStats)) == 13  # a day: 14 windows, one open

    for bad, reason in ((HistoryImport(model="a", window_s=5.0, windows=[]), "not the forecaster's window"),
                        (HistoryImport(model="a", window_s=10.0, windows=[WindowLoad(window_start_s=4003.0, avg=1, peak=1)]),
                         "not a multiple"),
                        (HistoryImport(model="stranger", window_s=10.0), "not registered")):
        answer = await client.request(client.subjects.forecast_import(), bad, CommandResult)
        assert not answer.ok and reason in answer.reason
    await running.shutdown()
