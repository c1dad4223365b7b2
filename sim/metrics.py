"""Summary metrics of one simulated run: TTFT percentiles, share under 100 ms, GPU-seconds,
prewarm hit rate, bytes loaded, and the requests that did not finish (counted, never dropped:
a request without a first token counts as an infinite TTFT in the percentiles)."""

from __future__ import annotations

import numpy as np

from sim.cluster import Cluster
from sim.serving import Requests

FAST_TTFT_S = 0.1


def ttft_s(req: Requests) -> np.ndarray:
    """TTFT of every request; +inf for those that never got a first token."""
    ttft = req.first_token_s - req.arrival_s
    return np.where(np.isnan(ttft), np.inf, ttft)


def summarize(req: Requests, cluster: Cluster, replay_s: float, measured: np.ndarray) -> dict:
    """Metrics over the `measured` requests (a mask: those arriving in the replay window)."""
    ttft = ttft_s(req)[measured]
    finish = req.finish_s[measured]
    n = len(ttft)
    pct = np.percentile(ttft, [50, 95, 99], method="inverted_cdf") if n else np.full(3, np.nan)
    starts = cluster.starts
    n_starts = sum(starts.values())
    return {
        "requests": n,
        "finished": int(np.count_nonzero(~np.isnan(finish))),
        "unfinished": int(np.count_nonzero(np.isnan(finish))),
        "no_first_token": int(np.count_nonzero(np.isinf(ttft))),
        "ttft_p50_s": _num(pct[0]),
        "ttft_p95_s": _num(pct[1]),
        "ttft_p99_s": _num(pct[2]),
        "ttft_mean_finite_s": _num(ttft[np.isfinite(ttft)].mean()) if np.isfinite(ttft).any() else None,
        "share_ttft_under_100ms": float(np.mean(ttft < FAST_TTFT_S)) if n else None,
        "gpu_seconds": round(cluster.gpu_seconds, 1),
        "gpu_share": round(cluster.gpu_seconds / max(replay_s * cluster.nodes * cluster.gpus_per_node, 1e-9), 4),
        "instance_starts": dict(starts),
        "prewarm_hit_rate": round(starts["hit"] / n_starts, 4) if n_starts else None,
        "bytes_loaded": int(cluster.bytes_loaded),
    }


def _num(x: float) -> float | str | None:
    """JSON-friendly: None for NaN, the string "inf" for infinity (strict JSON has no Infinity)."""
    if np.isnan(x):
        return None
    return "inf" if np.isinf(x) else round(float(x), 4)
