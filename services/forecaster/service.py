"""The forecaster service: load samples in, per-model forecasts out (thin shell over core/).

Samples are validated (those of unregistered models refused), spread over the open windows (kept
in Redis per sample, so a restart loses nothing), and at each window boundary every registered model's
window is recorded in its Redis history and its forecast for the new window is stored
(Keys.forecasts) and published as a `forecast.evt.forecast_published` event whose `detail` is the
Forecast. ForecastQuery is answered with the current ForecastSet. A HistoryImport adds closed
windows to a model's history; its last message makes the forecaster relearn from the whole history
and publish again. The clock is injected; all decisions are in core/.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable

from services.forecaster.core.online import OnlineForecaster
from services.forecaster.core.windows import (PartialWindows, WindowStats, add_sample, close_window,
                                              import_problem, sample_problem, window_index)
from services.forecaster.metrics import ForecasterMetrics
from shared.runner import Service, pause
from shared.schemas import CommandResult, Event, Forecast, ForecastQuery, ForecastSet, HistoryImport, LoadSample
from shared.settings import Settings

FORECAST_EVENT = "forecast_published"


def history_field(index: int) -> str:
    return str(index)


class ForecasterService(Service):
    name = "forecaster"

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.time, tick_s: float | None = None):
        super().__init__(settings)
        self.clock = clock
        self.window_s = settings.window_s
        # a window closes this long after its end, so the samples that end at the boundary are in
        self.grace_s = min(settings.sample_interval_s, settings.window_s / 4)
        self.tick_s = tick_s if tick_s is not None else min(settings.window_s / 10, 1.0)
        self.forecaster = self.new_forecaster()
        self.windows_lock = asyncio.Lock()  # window closing and history imports take turns
        self.partials: dict[str, PartialWindows] = {}
        self.current: dict[str, Forecast] = {}
        self.metrics = ForecasterMetrics()
        self.next_close = 0  # index of the first window not closed yet
        self.up_since_s = 0.0

    def new_forecaster(self) -> OnlineForecaster:
        s = self.settings
        return OnlineForecaster(s.forecast_method, s.window_s, s.csp_days, s.csp_errors, s.season_s)

    # ------------------------------------------------------------ start: rebuild from Redis

    async def start(self) -> None:
        keys = self.state.keys
        self.up_since_s = self.clock()
        self.partials = await self.state.hgetall(keys.partial_window(), PartialWindows)
        self.current = await self.state.hgetall(keys.forecasts(), Forecast)
        if self.current:  # a restart shows the forecasts in force at once, not from the next window on
            self.metrics.published(max(f.window_start_s for f in self.current.values()), self.current)
        latest, count = await self.learn_history()
        self.next_close = latest + 1 if count else window_index(self.up_since_s - self.grace_s, self.window_s)
        self.partials = {m: PartialWindows(windows=[w for w in p.windows
                                                    if w.window_start_s >= self.next_close * self.window_s - 1e-9])
                         for m, p in self.partials.items()}
        self.log.info("history_loaded", models=len(self.partials), windows=count, next_window=self.next_close)
        await self.watch_registered()
        await self.bus.subscribe(self.bus.subjects.load_samples(), LoadSample, self.on_sample, concurrent=False)
        await self.bus.subscribe(self.bus.subjects.forecast_query(), ForecastQuery, self.on_query)
        await self.bus.subscribe(self.bus.subjects.forecast_import(), HistoryImport, self.on_import, concurrent=False)

    async def learn_history(self) -> tuple[int, int]:
        """A fresh forecaster fed, in order, the Redis history of every watched model (the newest
        windows the history holds); returns (newest window index, windows with any history)."""
        self.forecaster = self.new_forecaster()
        windows: dict[int, dict[str, tuple[float, float]]] = {}
        for model in self.partials:
            self.forecaster.add_model(model)
            for stats in (await self.state.hgetall(self.state.keys.window_history(model), WindowStats)).values():
                windows.setdefault(window_index(stats.window_start_s, self.window_s), {})[model] = (stats.avg, stats.peak)
        latest = max(windows, default=-1)
        for index in range(max(min(windows, default=0), latest - self.forecaster.history.capacity + 1), latest + 1):
            self.forecaster.observe(index, windows.get(index, {}))
        return latest, len(windows)

    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            await self.close_due_windows()
            await pause(stopping, self.tick_s)

    # ------------------------------------------------------------ handlers

    async def on_sample(self, sample: LoadSample) -> None:
        problem = sample_problem(sample, self.clock(), self.window_s)
        if problem:
            self.log.warning("load_sample_rejected", model=sample.model, at_s=sample.at_s, reason=problem)
            return None
        if sample.model not in self.partials and await self.state.model(sample.model) is None:
            self.log.warning("load_sample_rejected", model=sample.model, at_s=sample.at_s, reason="model not registered")
            return None
        if sample.model not in self.partials:
            self.forecaster.add_model(sample.model)
            self.log.info("model_seen", model=sample.model, source="load_sample")
        partial, late_s = add_sample(self.partials.get(sample.model, PartialWindows()), sample,
                                     self.window_s, self.next_close * self.window_s)
        if late_s > 0:
            self.log.debug("load_sample_late", model=sample.model, at_s=sample.at_s, late_s=late_s)
        self.partials[sample.model] = partial
        await self.state.hput(self.state.keys.partial_window(), sample.model, partial)
        return None

    async def on_query(self, query: ForecastQuery) -> ForecastSet:
        wanted = query.models or sorted(self.current)
        return ForecastSet(forecasts=[self.current[m] for m in wanted if m in self.current])

    async def on_import(self, imported: HistoryImport) -> CommandResult:
        """Closed windows join the model's history (windows still open are skipped); the last
        message of an import relearns everything and publishes the current window's forecasts."""
        problem = import_problem(imported.window_s, self.window_s, [w.window_start_s for w in imported.windows])
        if problem is None and await self.state.model(imported.model) is None:
            problem = f"model {imported.model!r} is not registered"
        if problem:
            self.log.warning("history_import_rejected", model=imported.model, reason=problem)
            return CommandResult(command_id="import", ok=False, reason=problem)
        async with self.windows_lock:
            keys = self.state.keys
            closed = {window_index(w.window_start_s, self.window_s): w for w in imported.windows}
            closed = {i: w for i, w in closed.items()
                      if self.next_close - self.forecaster.history.capacity <= i < self.next_close}
            await self.state.hput_many(keys.window_history(imported.model), {
                history_field(i): WindowStats(window_start_s=w.window_start_s, window_s=self.window_s, avg=w.avg,
                                              peak=max(w.peak, w.avg), covered_s=self.window_s)
                for i, w in closed.items()})
            if imported.model not in self.partials:
                self.partials[imported.model] = PartialWindows()
                await self.state.hput(keys.partial_window(), imported.model, self.partials[imported.model])
            if imported.last:
                await self.learn_history()
                await self.publish_forecasts(self.next_close)
        self.log.info("history_imported", model=imported.model, windows=len(closed),
                      skipped=len(imported.windows) - len(closed), relearnt=imported.last)
        return CommandResult(command_id="import", ok=True,
                             detail={"windows": len(closed), "skipped": len(imported.windows) - len(closed)})

    # ------------------------------------------------------------ window boundaries

    async def close_due_windows(self) -> None:
        async with self.windows_lock:
            await self.close_windows_until(window_index(self.clock() - self.grace_s, self.window_s))

    async def close_windows_until(self, due: int) -> None:
        """Close every window before `due` (those that have ended) and forecast window `due`."""
        if due <= self.next_close:
            return
        self.next_close = max(self.next_close, due - self.forecaster.history.capacity)
        await self.watch_registered()
        while self.next_close < due:
            await self.close_window(self.next_close)
            self.next_close += 1
        await self.publish_forecasts(due)

    async def watch_registered(self) -> None:
        """Every registered model is watched (and forecast) from its registration on, requests or not."""
        for model in sorted(set(await self.state.models()) - set(self.partials)):
            self.forecaster.add_model(model)
            self.partials[model] = PartialWindows()
            self.log.info("model_seen", model=model, source="registry")

    async def close_window(self, index: int) -> None:
        """Record window `index` for every known model, or leave it unknown if nobody watched it."""
        start_s = index * self.window_s
        watched = start_s >= self.up_since_s - self.grace_s or any(
            w.window_start_s == start_s for p in self.partials.values() for w in p.windows)
        if not watched:
            self.forecaster.observe(index, {})
            self.log.info("window_unobserved", window_start_s=start_s)
            return
        keys = self.state.keys
        loads: dict[str, tuple[float, float]] = {}
        for model, partial in self.partials.items():
            stats, self.partials[model] = close_window(partial, start_s, self.window_s)
            loads[model] = (stats.avg, stats.peak)
            await self.state.hput(keys.window_history(model), history_field(index), stats)
            await self.state.hdel(keys.window_history(model), history_field(index - self.forecaster.history.capacity))
        await self.state.hput_many(keys.partial_window(), dict(self.partials))
        self.metrics.window_closed(start_s, loads, self.current)
        self.forecaster.observe(index, loads)
        self.log.debug("window_closed", window_start_s=start_s, models=len(loads))

    async def publish_forecasts(self, index: int) -> None:
        now = self.clock()
        start_s = index * self.window_s
        self.current = {model: Forecast(model=model, window_start_s=start_s, window_s=self.window_s,
                                        avg=p.avg, peak=p.peak, method=p.method, chance=p.chance)
                        for model, p in self.forecaster.forecast(index).items()}
        await self.state.hput_many(self.state.keys.forecasts(), dict(self.current))
        self.metrics.published(start_s, self.current)
        for forecast in self.current.values():
            await self.bus.publish_event("forecast", Event(name=FORECAST_EVENT, at_s=now, model=forecast.model,
                                                           reason=forecast.method, detail=forecast.model_dump()))
        self.log.info("forecasts_published", window_start_s=start_s, models=len(self.current))
