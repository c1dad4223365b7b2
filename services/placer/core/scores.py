"""The paper's arithmetic (DESIGN §3.2-3.4): replica counts, copy scores, windowed load, KV reserve.

Pure functions of numbers; no cluster state here.
"""

from __future__ import annotations

import functools
import math
import sys
from dataclasses import dataclass
from typing import Iterable

from services.placer.core.snapshot import PAGE_BYTES, Config, ModelSpec


@dataclass(frozen=True)
class LoadPoint:
    """One load sample: mean outstanding requests over (at_s - interval_s, at_s] at one source."""

    at_s: float
    interval_s: float
    avg: float
    source: str = ""  # the gateway that measured it (each sees only its own requests)


def pages(nbytes: float) -> int:
    """Bytes rounded up to whole 2 MiB pages."""
    return max(0, math.ceil(nbytes / PAGE_BYTES))


def copy_pages(model: ModelSpec) -> int:
    """Pages one copy of `model` takes on each device of its TP group."""
    return pages(model.size_bytes / model.tp)


def instance_pages(model: ModelSpec) -> int:
    """Pages per device an instance needs on top of its copy's weights: KV cache and engine."""
    return pages(model.kv_bytes) + pages(model.engine_bytes)


def replica_counts(avg: float, peak: float, current: int, capacity: int) -> tuple[int, int]:
    """(n_f, n_b): foundation copies for the average load, burst copies for the peak."""
    foundation = max(math.ceil(avg / capacity) - current, 0)
    burst = max(math.ceil(peak / capacity) - current - foundation, 0)
    return foundation, burst


@functools.lru_cache(maxsize=4096)  # pure; the simulator rescoring every copy on every call repeats it a lot
def copy_scores(model: ModelSpec, current: int, config: Config) -> tuple[tuple[float, str], ...]:
    """Score and kind (foundation/burst/standby) of the j-th wanted copy, j = 0, 1, ... (descending).

    cold-start cost c = size / tp / bandwidth; foundation j: exp(-j/n) * c; burst j:
    exp(-(n_f+j)/n) * c * peak/avg with n = n_f + n_b. avg below one request counts as one
    (the ratio guard for avg = 0). With standby copies, a model without either and without an
    instance wants one standby copy of score chance * c (the cold start it saves, times how likely).
    """
    n_f, n_b = replica_counts(model.avg, model.peak, current, config.capacity)
    total = n_f + n_b
    cost = model.size_bytes / model.tp / config.load_bandwidth_bytes_s
    if total == 0:
        standby = config.standby_copies and current == 0 and model.chance > 0
        return ((model.chance * cost, "standby"),) if standby else ()
    ratio = model.peak / max(model.avg, 1.0)
    out = [(math.exp(-j / total) * cost, "foundation") for j in range(n_f)]
    out += [(math.exp(-(n_f + j) / total) * cost * ratio, "burst") for j in range(n_b)]
    return tuple(out)


def windowed_load(points: Iterable[LoadPoint], now_s: float, window_s: float) -> float:
    """Outstanding requests over (now_s - window_s, now_s]: each source's time-weighted mean, summed
    (every gateway sees only its own requests).

    Each sample weighs by how much of its interval lies in the window; time no sample of a source
    covers does not count for it (0.0 when nothing covers the window). Samples with a non-finite
    field are skipped, and the sum is finite: no sample can break the arithmetic downstream.
    """
    start = now_s - window_s
    weighted: dict[str, float] = {}
    covered: dict[str, float] = {}
    for p in points:
        if not all(map(math.isfinite, (p.at_s, p.interval_s, p.avg))):
            continue
        overlap = min(p.at_s, now_s) - max(p.at_s - p.interval_s, start)
        if overlap > 0:
            weighted[p.source] = weighted.get(p.source, 0.0) + p.avg * overlap
            covered[p.source] = covered.get(p.source, 0.0) + overlap
    return min(sum(weighted[s] / covered[s] for s in weighted), sys.float_info.max)


def kv_reserve_bytes(capacity_bytes: int, requests: int, used_bytes: int, max_requests: int) -> int:
    """R = max(C*Q/B, T + C/B), at most C: the KV an instance keeps for itself (§3.4)."""
    reserve = max(capacity_bytes * requests / max_requests, used_bytes + capacity_bytes / max_requests)
    return min(capacity_bytes, math.ceil(reserve))


def kv_lendable_pages(capacity_bytes: int, requests: int, used_bytes: int, max_requests: int) -> int:
    """Whole pages of KV space (per device) an instance can lend to prewarmed copies."""
    spare = capacity_bytes - kv_reserve_bytes(capacity_bytes, requests, used_bytes, max_requests)
    return spare // PAGE_BYTES
