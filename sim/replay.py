"""The simulator beside a live replay (`bench live`): the same compressed trace slice (lengths capped
as the replay sends them), the same cluster and the same imported forecast history, in live seconds,
through the same placer and forecaster cores; metrics in the live run's shape. Pure: no clock, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from services.forecaster.core.replay import Compression
from shared.workload import Workload
from sim.cluster import Cluster
from sim.engine import EventLoop
from sim.metrics import ttft_s
from sim.run import RunResult
from sim.serving import Requests, Serving
from sim.systems.base import Context
from sim.timing import TimingProfile


@dataclass(frozen=True)
class Slice:
    workload: Workload
    names: list[str]  # model i of the workload is served as names[i]
    compression: Compression  # trace -> live seconds; its anchor is the replay's first instant
    replay_s: float
    drain_s: float
    prompt_cap: int  # tokens per prompt and per answer, as the replay sends them
    output_cap: int
    history_end_s: float  # where the imported history ends (the simulation starts there, idle until the anchor)

    @property
    def start_s(self) -> float:
        return self.compression.anchor_live_s

    def requests(self) -> Requests:
        c = self.compression
        a = self.workload.arrivals(c.anchor_trace_s, c.trace(self.start_s + self.replay_s))
        return Requests(np.asarray(c.live(a.time_s)), a.model, np.minimum(a.prompt_tokens, self.prompt_cap),
                        np.clip(a.output_tokens, 1, self.output_cap))


@dataclass(frozen=True)
class Cell:
    """One simulated system on one cluster: `kinds` maps each model name to its profile kind."""

    system: object  # sim.systems.base.System
    timing: TimingProfile
    nodes: int
    gpus_per_node: int
    kinds: dict[str, str]
    capacity: int  # B: requests in flight per instance
    config: dict  # what the system reads (WarmServe: history, kv_bytes_per_gpu, csp_days, ...)


def run(sl: Slice, cell: Cell, timeline: bool = True) -> tuple[dict, RunResult]:
    requests = sl.requests()
    start, end = sl.start_s, sl.start_s + sl.replay_s
    loop = EventLoop(min(sl.history_end_s, start))
    cluster = Cluster(loop, cell.timing, cell.nodes, cell.gpus_per_node, cell.kinds, record_timeline=timeline)
    serving = Serving(loop, cluster, requests, sl.names)
    ctx = Context(loop, cluster, serving, requests, sl.names, cell.capacity, [0.0] * len(sl.names), start, end,
                  cell.config, sl.workload)
    cluster.books = (start, end)
    cell.system.start(ctx)
    loop.run(requests.arrival_s, serving.arrive, end + sl.drain_s)
    cluster.close_books()
    result = RunResult(cell.system.name, {}, ttft_s(requests), cluster.timeline, start, end, cluster.spans())
    return summary(requests, cluster), result


def summary(req: Requests, cluster: Cluster) -> dict:
    """bench live's figures: percentiles over the requests that finished, starts by what they found."""
    ok = ~np.isnan(req.finish_s)
    ttft = percentiles((req.first_token_s - req.arrival_s)[ok])
    wait = percentiles((req.admitted_s - req.arrival_s)[ok])
    s = cluster.starts
    return {"requests": len(req), "ok": int(ok.sum()), "unfinished": int((~ok).sum()),
            "ttft_p50_s": ttft["p50"], "ttft_p95_s": ttft["p95"], "ttft_p99_s": ttft["p99"],
            "wait_p50_s": wait["p50"], "wait_p95_s": wait["p95"], "wait_p99_s": wait["p99"],
            "starts": {"forecast_prewarm": s["hit"] - cluster.kept_hits, "kept_copy": cluster.kept_hits,
                       "loading": s["loading"], "miss": s["miss"]},
            "bytes_loaded": int(cluster.bytes_loaded), "device_seconds": round(cluster.gpu_seconds, 1)}


def percentiles(values) -> dict[str, float | None]:
    if not len(values):
        return {"p50": None, "p95": None, "p99": None}
    p = np.percentile(values, [50, 95, 99])
    return {"p50": round(float(p[0]), 3), "p95": round(float(p[1]), 3), "p99": round(float(p[2]), 3)}
