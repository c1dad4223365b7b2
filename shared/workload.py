"""Multi-model workloads built from the real traces, for backtests, the simulator and benchmarks.

Model rule: ServeGen clients active in at least `min_active` of their 600 s windows, ranked by mean
rate (descending, ties by id; option order="quiet": by the share of windows where the client is
(nearly) idle, descending, so the burstiest clients come first); model i replays the client ranked i mod K (K such clients), rolled
cyclically by i // K whole days, so more models than clients still get distinct realistic series.
Popularity: model i gets share (i+1)^-alpha / sum of all shares of `total_rate_rps`; each series is
rescaled to that mean, keeping its shape. Inside each 600 s window arrivals form a renewal process
whose inter-arrival law is the window's fitted Gamma/Weibull *shape* (burstiness) rescaled to the
window's rate (the fits' scales do not always match the rates); idle windows have no arrivals,
windows with a rate but no fit are Poisson. Prompt and output tokens are drawn jointly from Azure
requests. Deterministic: the arrivals of (model, day) depend only on (seed, model, day), so any
[start, end) slice is identical however the replay is cut. Time 0 is midnight of trace day 0.

    w = build_workload(n_models=16, alpha=0.5, total_rate_rps=20.0, seed=1)
    w.rate_rps[i, j]                    # model i's mean rate in trace window j (600 s)
    w.mean_rate(window_s=300)           # the same, averaged over windows of another length
    for batch in w.iter_arrivals(7 * 86400, 8 * 86400, chunk_s=3600):
        batch.time_s, batch.model, batch.prompt_tokens, batch.output_tokens   # sorted by time
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from scipy.special import gamma as gamma_fn

from shared.traces import (AZURE_DIR, LAW_NONE, LAW_WEIBULL, SERVEGEN_DIR, SERVEGEN_WINDOW_S,
                           ClientTrace, RequestLengths, load_azure_lengths, load_servegen)

DAY_S = 86400.0
WINDOWS_PER_DAY = int(DAY_S // SERVEGEN_WINDOW_S)


@dataclass(frozen=True)
class Arrivals:
    """Requests sorted by arrival time; parallel arrays."""

    time_s: np.ndarray  # arrival time, seconds since midnight of trace day 0
    model: np.ndarray  # model index (into Workload.models)
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray

    def __len__(self) -> int:
        return len(self.time_s)

    @staticmethod
    def merge(parts: list["Arrivals"]) -> "Arrivals":
        if not parts:
            return Arrivals(np.zeros(0), np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0, np.int64))
        time_s = np.concatenate([p.time_s for p in parts])
        order = np.argsort(time_s, kind="stable")
        return Arrivals(time_s[order], np.concatenate([p.model for p in parts])[order],
                        np.concatenate([p.prompt_tokens for p in parts])[order],
                        np.concatenate([p.output_tokens for p in parts])[order])


QUIET_FRACTION = 0.1  # order="quiet": a window is quiet when its rate is below this fraction of the mean


def quiet_share(trace: ClientTrace) -> float:
    """Share of a client's windows with a rate below QUIET_FRACTION of its mean (idle or nearly)."""
    return float(np.mean(trace.rate_rps < QUIET_FRACTION * trace.mean_rate_rps))


def rank_clients(traces: dict[int, ClientTrace], min_active: float = 0.5, order: str = "rate") -> list[int]:
    """The workload rule's client order: active in >= min_active of windows, by mean rate desc;
    order="quiet": by quiet_share desc instead (the clients that most often go quiet, then burst)."""
    eligible = [c for c, t in traces.items() if t.active_fraction >= min_active and t.mean_rate_rps > 0]
    if order == "quiet":
        return sorted(eligible, key=lambda c: (-quiet_share(traces[c]), c))
    if order != "rate":
        raise ValueError(f"unknown client order {order!r} (rate | quiet)")
    return sorted(eligible, key=lambda c: (-traces[c].mean_rate_rps, c))


def popularity_shares(n_models: int, alpha: float) -> np.ndarray:
    weights = (np.arange(n_models) + 1.0) ** -alpha
    return weights / weights.sum()


@dataclass(frozen=True)
class Workload:
    models: list[str]  # model names, index = popularity rank
    clients: list[int]  # ServeGen client replayed by each model
    day_shift: list[int]  # whole days each model's client series is rolled by
    share: np.ndarray  # popularity share of the total rate per model
    rate_rps: np.ndarray  # [model, trace window] mean arrival rate
    law: np.ndarray  # [model, trace window] LAW_* code
    shape: np.ndarray  # [model, trace window] shape of the inter-arrival law
    lengths: RequestLengths  # the Azure requests token counts are drawn from
    seed: int

    @property
    def duration_s(self) -> float:
        return self.rate_rps.shape[1] * SERVEGEN_WINDOW_S

    @property
    def days(self) -> int:
        return self.rate_rps.shape[1] // WINDOWS_PER_DAY

    def mean_rate(self, window_s: float) -> np.ndarray:
        """[model, window] mean rate over windows of `window_s` (time-weighted over trace windows)."""
        n_out = int(self.duration_s // window_s)
        edges = np.arange(n_out + 1) * window_s
        cumulative = np.concatenate([np.zeros((len(self.models), 1)),
                                     np.cumsum(self.rate_rps * SERVEGEN_WINDOW_S, axis=1)], axis=1)
        trace_edges = np.arange(self.rate_rps.shape[1] + 1) * SERVEGEN_WINDOW_S
        at_edges = np.stack([np.interp(edges, trace_edges, row) for row in cumulative])
        return np.diff(at_edges, axis=1) / window_s

    def model_arrivals(self, model: int, start_s: float, end_s: float) -> Arrivals:
        """One model's requests in [start_s, end_s)."""
        first_day = max(int(start_s // DAY_S), 0)
        last_day = min(int(np.ceil(end_s / DAY_S)), self.days)
        parts = [self._day(model, day) for day in range(first_day, last_day)]
        merged = Arrivals.merge(parts) if len(parts) != 1 else parts[0]
        keep = (merged.time_s >= start_s) & (merged.time_s < end_s)
        return Arrivals(merged.time_s[keep], merged.model[keep], merged.prompt_tokens[keep],
                        merged.output_tokens[keep])

    def arrivals(self, start_s: float, end_s: float, models: list[int] | None = None) -> Arrivals:
        """All (or the listed) models' requests in [start_s, end_s), merged in time order."""
        chosen = range(len(self.models)) if models is None else models
        return Arrivals.merge([self.model_arrivals(m, start_s, end_s) for m in chosen])

    def iter_arrivals(self, start_s: float, end_s: float, chunk_s: float = 3600.0) -> Iterator[Arrivals]:
        """The same requests as `arrivals(start_s, end_s)`, in time-ordered chunks (bounded memory)."""
        at = start_s
        while at < end_s:
            upto = min(at + chunk_s, end_s)
            yield self.arrivals(at, upto)
            at = upto

    def _day(self, model: int, day: int) -> Arrivals:
        rng = np.random.default_rng((self.seed, model, day))
        window = slice(day * WINDOWS_PER_DAY, (day + 1) * WINDOWS_PER_DAY)
        offsets = (np.arange(WINDOWS_PER_DAY) + day * WINDOWS_PER_DAY) * SERVEGEN_WINDOW_S
        times = renewal_arrivals(rng, self.rate_rps[model, window], self.law[model, window],
                                 self.shape[model, window], offsets, SERVEGEN_WINDOW_S)
        pick = rng.integers(0, len(self.lengths.prompt_tokens), size=len(times))
        return Arrivals(times, np.full(len(times), model, np.int32),
                        self.lengths.prompt_tokens[pick], self.lengths.output_tokens[pick])


def unit_mean_draws(rng: np.random.Generator, law: np.ndarray, shape: np.ndarray) -> np.ndarray:
    """One inter-arrival draw per entry, from the entry's law rescaled to mean 1."""
    valid = np.isfinite(shape) & (shape > 0) & (law != LAW_NONE)
    k = np.where(valid, shape, 1.0)
    weibull = valid & (law == LAW_WEIBULL)
    draws = rng.gamma(k, 1.0 / k)  # Gamma with mean 1 (shape 1: exponential)
    if weibull.any():
        kw = k[weibull]
        draws[weibull] = rng.weibull(kw) / gamma_fn(1.0 + 1.0 / kw)
    return draws


def renewal_arrivals(rng: np.random.Generator, rate_rps: np.ndarray, law: np.ndarray, shape: np.ndarray,
                     window_start_s: np.ndarray, window_s: float) -> np.ndarray:
    """Sorted arrival times of a renewal process restarted in each window (vectorised)."""
    active = np.flatnonzero(rate_rps > 0)
    found: list[np.ndarray] = []
    elapsed = np.zeros(len(active))  # time reached in each active window (window-relative)
    while len(active):
        expected = rate_rps[active] * window_s
        count = np.ceil(expected * 1.2 + 3 * np.sqrt(expected) + 4).astype(np.int64)
        owner = np.repeat(np.arange(len(active)), count)
        gaps = unit_mean_draws(rng, law[active][owner], shape[active][owner]) / rate_rps[active][owner]
        ends = np.cumsum(count)
        cumulative = np.cumsum(gaps)
        before = np.concatenate([[0.0], cumulative[ends[:-1] - 1]]) if len(ends) else np.zeros(0)
        relative = cumulative - np.repeat(before, count) + np.repeat(elapsed, count)
        inside = relative < window_s
        found.append(window_start_s[active][owner[inside]] + relative[inside])
        reached = relative[ends - 1]
        unfinished = reached < window_s
        active, elapsed = active[unfinished], reached[unfinished]
    return np.sort(np.concatenate(found)) if found else np.zeros(0)


def build_workload(n_models: int, alpha: float, total_rate_rps: float, seed: int,
                   servegen_dir: Path | str = SERVEGEN_DIR, azure_dir: Path | str = AZURE_DIR,
                   azure_kinds: tuple[str, ...] = ("code", "conv"), min_active: float = 0.5,
                   order: str = "rate") -> Workload:
    """N models from ServeGen clients by the module's rule (`order`: see rank_clients), at
    `total_rate_rps` in all."""
    if n_models < 1 or total_rate_rps <= 0:
        raise ValueError("n_models must be >= 1 and total_rate_rps > 0")
    traces = load_servegen(servegen_dir)
    ranked = rank_clients(traces, min_active, order)
    if not ranked:
        raise ValueError(f"no ServeGen client in {servegen_dir} is active in {min_active:.0%} of windows")
    n_windows = min(len(t.rate_rps) for t in traces.values()) // WINDOWS_PER_DAY * WINDOWS_PER_DAY
    share = popularity_shares(n_models, alpha)
    clients, shifts, rates, laws, shapes = [], [], [], [], []
    for i in range(n_models):
        trace = traces[ranked[i % len(ranked)]]
        roll = -(i // len(ranked)) * WINDOWS_PER_DAY
        rate = np.roll(trace.rate_rps[:n_windows], roll)
        rates.append(rate * (total_rate_rps * share[i] / rate.mean()))
        laws.append(np.roll(trace.law[:n_windows], roll))
        shapes.append(np.roll(trace.shape[:n_windows], roll))
        clients.append(trace.client)
        shifts.append(i // len(ranked))
    return Workload(models=[f"model-{i:03d}" for i in range(n_models)], clients=clients, day_shift=shifts,
                    share=share, rate_rps=np.array(rates), law=np.array(laws), shape=np.array(shapes),
                    lengths=load_azure_lengths(azure_kinds, azure_dir), seed=seed)
