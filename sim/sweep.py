"""Max request rate per system with P99 TTFT under an SLO: bisection over the workload's total
rate (same seed, so only the rate changes). A run with unfinished requests fails the SLO."""

from __future__ import annotations

from typing import Callable


def meets_slo(summary: dict, slo_p99_s: float) -> bool:
    p99 = summary["ttft_p99_s"]
    return summary["unfinished"] == 0 and isinstance(p99, float) and p99 <= slo_p99_s


def max_rate(run_at: Callable[[float], dict], slo_p99_s: float, low_rps: float, high_rps: float,
             steps: int = 6) -> dict:
    """Largest rate in [low, high] whose run meets the SLO, to (high-low)/2^steps; 0 if low fails."""
    tried = {}

    def ok(rate: float) -> bool:
        tried[rate] = run_at(rate)
        return meets_slo(tried[rate], slo_p99_s)

    if not ok(low_rps):
        return {"max_rate_rps": 0.0, "tried": _table(tried)}
    if ok(high_rps):
        return {"max_rate_rps": high_rps, "tried": _table(tried), "note": "meets the SLO at the top of the range"}
    for _ in range(steps):
        mid = (low_rps + high_rps) / 2
        low_rps, high_rps = (mid, high_rps) if ok(mid) else (low_rps, mid)
    return {"max_rate_rps": round(low_rps, 3), "tried": _table(tried)}


def _table(tried: dict) -> list[dict]:
    return [{"rate_rps": r, "ttft_p99_s": s["ttft_p99_s"], "unfinished": s["unfinished"]}
            for r, s in sorted(tried.items())]
