"""How much of the cluster the workload itself needs, whatever the system: each second, the GPUs of
one instance (its TP) for every model with a request in flight (or one within the last `grace_s`,
the autoscaler's window). When that exceeds the cluster most of the time, every system queues for
GPUs or thrashes, and prewarming cannot help; when it fits, TTFT is decided by the starts.
"""

from __future__ import annotations

import numpy as np

from shared.workload import Workload
from sim.timing import STEADY_BATCH, TimingProfile


def gpu_demand(workload: Workload, kinds: list[str], timing: TimingProfile, start_s: float, end_s: float,
               gpus: int, grace_s: float = 5.0) -> dict:
    """Mean and P95 of the GPUs needed per second over [start_s, end_s), and the share of seconds
    needing more than `gpus`."""
    seconds = int(np.ceil(end_s - start_s))
    demand = np.zeros(seconds)
    for m, kind in enumerate(kinds):
        prof = timing.models[kind]
        arrivals = workload.model_arrivals(m, start_s - 600.0, end_s)
        done = arrivals.time_s + prof.service_s(arrivals.prompt_tokens, arrivals.output_tokens, STEADY_BATCH) + grace_s
        edges = np.zeros(seconds + 1)
        np.add.at(edges, np.clip(np.floor(arrivals.time_s - start_s), 0, seconds).astype(int), 1)
        np.add.at(edges, np.clip(np.ceil(done - start_s), 0, seconds).astype(int), -1)
        demand += (np.cumsum(edges)[:seconds] > 0) * prof.tp
    return {"gpus": gpus, "mean_gpus_needed": round(float(demand.mean()), 2),
            "p95_gpus_needed": float(np.percentile(demand, 95)),
            "share_over_capacity": round(float(np.mean(demand > gpus)), 4)}
