"""WarmServe in the simulator: the live services' forecaster core (OnlineForecaster) and placer
core (tick, allocate) driven on the virtual clock. History for the forecaster comes from the
learning days of the workload (each request outstanding for its prefill + decode time); then every
window the simulated load is observed and forecast, every placer tick the core plans, and a model
whose requests wait asks the core for an instance once per waiting episode (as the gateway does).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from services.forecaster.core.online import OnlineForecaster
from services.forecaster.core.windows import trace_windows
from services.placer.core.planner import allocate, tick
from services.placer.core.cluster import Reuse
from services.placer.core.scores import LoadPoint, windowed_load
from services.placer.core.snapshot import Config
from shared.workload import DAY_S
from sim.cache import cached
from sim.serving import LoadMeter
from sim.systems.base import Context
from sim.systems.placer_shell import PlacerShell
from sim.timing import STEADY_BATCH

ASK_RETRY_S = 1.0  # the gateway's wait before asking the placer again after "no capacity"


@dataclass(frozen=True)
class Variant:
    name: str
    forecast: str = "csp"  # forecaster method: csp | ours | seasonal_naive
    placement: str = "paper"  # placer core placement: paper | evict_aware | round_robin
    allocation: str = "paper"  # placer core allocation: paper | hit_first
    scale_up_at: float = 0.8  # autoscaler thresholds, fractions of B per instance (DESIGN §3.3: 0.8 / 0.5)
    scale_down_at: float = 0.5
    keep_s: float = 0.0  # placer core Config.keep_s: scale-downs spare younger instances
    promotable_copies: bool = False  # placer core Config.promotable_copies
    promotable_max_tp: int = Config.promotable_max_tp  # placer core Config.promotable_max_tp (same default)
    unserved_first: bool = False  # placer core Config.unserved_first
    standby_copies: bool = False  # placer core Config.standby_copies
    universal_workers: bool = True  # an engine process runs ahead on every GPU: a cold start skips the engine start
    prewarm: bool = True
    kv_prewarm: bool = True
    window_s: float = 300.0
    season_s: float = DAY_S  # the forecaster's season (shorter when a replay compresses time)
    tick_s: float = 0.0  # placer tick, loads windowed over the scale window as the live placer does (0: one
    #                      tick per scale window, each with the mean load since the last)
    ask_interval_s: float = 0.0  # at most one ask per model in this time, as the live gateway (its Policy)


VARIANTS = {v.name: v for v in (
    Variant("warmserve-paper"),
    Variant("ours", forecast="ours", allocation="hit_first", promotable_copies=True, unserved_first=True),
    # ours with standby copies, as the live placer runs by default (not yet measured on the configs here)
    Variant("ours-standby", forecast="ours", allocation="hit_first", promotable_copies=True, unserved_first=True,
            standby_copies=True),
    # ours trading GPU-seconds for the tail: scale up early (0.25*B per instance), down late (0.1*B),
    # and keep a new instance for 30 s (fewer demote/promote round trips for sporadic models)
    Variant("ours-lowlat", forecast="ours", allocation="hit_first", promotable_copies=True,
            unserved_first=True, scale_up_at=0.25, scale_down_at=0.1, keep_s=30.0),
    Variant("ours-no-promotable", forecast="ours", allocation="hit_first", unserved_first=True),
    Variant("paper-no-prewarm", prewarm=False),
    Variant("paper-fresh-engines", universal_workers=False),  # every cold start also starts an engine
    Variant("paper-round-robin", placement="round_robin"),
    Variant("paper-no-kv-prewarm", kv_prewarm=False),
    Variant("paper-window-3min", window_s=180.0),
    Variant("paper-window-40min", window_s=2400.0),
)}


def core_config(v: Variant, capacity: int, cfg: dict) -> Config:
    """The placer core's Config of a variant (B = `capacity`; the run config's score bandwidth)."""
    return Config(capacity=capacity, load_bandwidth_bytes_s=cfg.get("score_bandwidth_bytes_s", 32e9),
                  prewarm=v.prewarm, placement=v.placement, kv_prewarm=v.kv_prewarm, allocation=v.allocation,
                  scale_up_at=v.scale_up_at, scale_down_at=v.scale_down_at, keep_s=v.keep_s,
                  promotable_copies=v.promotable_copies, promotable_max_tp=v.promotable_max_tp,
                  unserved_first=v.unserved_first, standby_copies=v.standby_copies)


class WarmServe:
    def __init__(self, variant: Variant):
        self.variant = variant
        self.name = variant.name

    def start(self, ctx: Context) -> None:
        v, cfg = self.variant, ctx.config
        self.ctx = ctx
        self.config = core_config(v, ctx.capacity, cfg)
        kv = cfg.get("kv_bytes_per_gpu") or {  # given: what an instance takes besides its copy, as a live agent books it
            name: ctx.cluster.profile(name).kv_bytes_per_gpu(ctx.capacity * cfg["kv_tokens_per_request"])
            for name in ctx.models}
        self.shell = PlacerShell(ctx.cluster, ctx.serving, ctx.capacity, kv, v.universal_workers)
        self.reuse = Reuse()  # the core's index carries over between ticks and asks (same decisions)
        self.forecaster = OnlineForecaster(v.forecast, v.window_s, cfg.get("csp_days", 3), cfg.get("csp_errors", 10),
                                           v.season_s)
        for name in ctx.models:
            self.forecaster.add_model(name)
        self.window = math.floor(ctx.loop.now / v.window_s)
        self._learn_history(cfg.get("history_days", 7))
        self.forecasts = self._forecast(self.window)
        self.window_meter, self.tick_meter = LoadMeter(ctx.serving), LoadMeter(ctx.serving)
        self.asked = [False] * len(ctx.models)
        self.next_ask_s = [ctx.loop.now] * len(ctx.models)
        self.ask_found = [False] * len(ctx.models)  # the model's last ask got an instance
        self.loads: dict[str, float] = {}
        self.points: dict[str, list[LoadPoint]] = {name: [] for name in ctx.models}  # with tick_s: the last window's
        ctx.serving.on_waiting = self._waiting
        ctx.loop.at((self.window + 1) * v.window_s, self._window_closed)
        ctx.loop.after(0.0, self._tick)

    def _learn_history(self, days: int) -> None:
        """Windows of the learning days before the simulation, from the workload's own requests, or
        the config's `history` ({model: [WindowLoad]}, what a live replay imported) when given."""
        ctx, w = self.ctx, self.variant.window_s
        if ctx.config.get("history") is not None:
            by_window: dict[int, dict[str, tuple[float, float]]] = {}
            for name, loads in ctx.config["history"].items():
                for load in loads:
                    by_window.setdefault(round(load.window_start_s / w), {})[name] = (load.avg, load.peak)
            for t in sorted(by_window):
                self.forecaster.observe(t, by_window[t])
            return
        first = max(math.floor((ctx.loop.now - days * DAY_S) / w), 0)
        if first >= self.window:
            return
        cfg = ctx.config
        key = {"what": "history", "models": len(ctx.models), "alpha": cfg["alpha"], "rate": cfg["total_rate_rps"],
               "seed": cfg["seed"], "order": cfg.get("client_order", "rate"), "window_s": w, "first": first,
               "last": self.window, "batch": STEADY_BATCH,
               "profiles": [dataclasses.asdict(ctx.cluster.profile(name)) for name in ctx.models]}
        history = cached(cfg.get("cache_dir"), key, lambda: self._history_windows(first))
        for t in range(first, self.window):
            self.forecaster.observe_rows(t, history["avg"][:, t - first], history["peak"][:, t - first])

    def _history_windows(self, first: int) -> dict[str, np.ndarray]:
        """[model, window] average and peak outstanding requests, each request outstanding for its
        prefill + decode time at batch STEADY_BATCH."""
        ctx, w = self.ctx, self.variant.window_s
        avg = np.zeros((len(ctx.models), self.window))
        peak = np.zeros_like(avg)
        for m, name in enumerate(ctx.models):
            arrivals = ctx.workload.model_arrivals(m, first * w, self.window * w)
            prof = ctx.cluster.profile(name)
            duration = prof.service_s(arrivals.prompt_tokens, arrivals.output_tokens, STEADY_BATCH)
            avg[m], peak[m] = trace_windows(arrivals.time_s, duration, w, self.window)
        return {"avg": avg[:, first:], "peak": peak[:, first:]}

    def _forecast(self, t: int) -> dict[str, tuple[float, float, float]]:
        return {name: (p.avg, p.peak, p.chance) for name, p in self.forecaster.forecast(t).items()}

    def _window_closed(self) -> None:
        loads = self.window_meter.take()
        self.forecaster.observe_rows(self.window, np.array([a for a, _, _ in loads]),
                                     np.array([max(p, a) for a, p, _ in loads], float))
        self.window += 1
        self.forecasts = self._forecast(self.window)
        self.ctx.loop.at((self.window + 1) * self.variant.window_s, self._window_closed)

    def _tick(self) -> None:
        ctx = self.ctx
        self.loads = self._loads(ctx.loop.now)
        snapshot = self.shell.snapshot(self.forecasts, self.loads)
        self.shell.execute(tick(snapshot, ctx.loop.now, self.config, self.reuse), ctx.loop.now)
        if ctx.loop.now < ctx.replay_end_s:
            ctx.loop.after(self.variant.tick_s or self.config.scale_window_s, self._tick)

    def _loads(self, now_s: float) -> dict[str, float]:
        taken = self.tick_meter.take()
        if not self.variant.tick_s:
            return {name: avg for name, (avg, _, _) in zip(self.ctx.models, taken)}
        window = self.config.scale_window_s
        for name, (avg, _, _) in zip(self.ctx.models, taken):
            self.points[name] = [p for p in self.points[name] if p.at_s > now_s - window] + \
                [LoadPoint(now_s, self.variant.tick_s, avg)]
        return {name: windowed_load(points, now_s, window) for name, points in self.points.items()}

    def _waiting(self, m: int) -> None:
        """Like the gateway: ask once when a model's queue starts (not sooner than ask_interval_s after
        the last ask, unless what that ask got is gone), retry after "no capacity"."""
        queue = self.ctx.serving.queues[m]
        if len(queue) == 1:
            self.asked[m] = False
            name = self.ctx.models[m]
            if self.ask_found[m] and not any(i.model == name and i.state in ("starting", "ready")
                                             for i in self.ctx.cluster.instances.values()):
                self.next_ask_s[m] = min(self.next_ask_s[m], self.ctx.loop.now)
        if not self.asked[m]:
            if self.ctx.loop.now >= self.next_ask_s[m]:
                self._ask(m)
            else:
                self.asked[m] = True
                self.ctx.loop.at(self.next_ask_s[m], self._ask, m)

    def _ask(self, m: int) -> None:
        ctx = self.ctx
        if not ctx.serving.queues[m]:
            return
        self.asked[m] = True
        self.next_ask_s[m] = ctx.loop.now + self.variant.ask_interval_s
        snapshot = self.shell.snapshot(self.forecasts, self.loads)  # the last tick's loads, as the live placer keeps them
        allocation = allocate(snapshot, ctx.models[m], ctx.loop.now, self.config, self.reuse)
        self.ask_found[m] = allocation.found
        self.shell.execute(allocation.effects, ctx.loop.now)
        if not allocation.found:
            ctx.loop.after(ASK_RETRY_S, self._ask, m)
