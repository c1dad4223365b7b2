"""Request lifecycle in the simulator: route each arrival to the least-loaded ready instance of its
model (fewer than B in flight, KV room), else hold it in the model's queue and tell the system;
a batched service model (serialised prefills, decode slowed by batch size) gives TTFT and finish
without per-token events. Also the per-model outstanding-load meters the policies consume.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

import numpy as np

from sim.cluster import Cluster, Instance
from sim.engine import EventLoop


class Requests:
    """The replayed requests (sorted by arrival) and what happened to each; NaN = not yet."""

    def __init__(self, arrival_s: np.ndarray, model: np.ndarray, prompt_tokens: np.ndarray,
                 output_tokens: np.ndarray):
        order = np.argsort(arrival_s, kind="stable")
        self.arrival_s = np.asarray(arrival_s, float)[order]
        self.model = np.asarray(model, np.int64)[order]
        self.prompt_tokens = np.asarray(prompt_tokens, np.int64)[order]
        self.output_tokens = np.maximum(np.asarray(output_tokens, np.int64)[order], 1)
        self.admitted_s = np.full(len(order), np.nan)  # sent to an instance (queue and instance start over)
        self.first_token_s = np.full(len(order), np.nan)
        self.finish_s = np.full(len(order), np.nan)

    def __len__(self) -> int:
        return len(self.arrival_s)


class LoadMeter:
    """Time-weighted mean and peak of one model's outstanding requests since the last `take`."""

    def __init__(self, serving: "Serving"):
        self.serving = serving
        n = len(serving.outstanding)
        self.since_s = serving.loop.now
        self.area0 = [0.0] * n
        self.arrivals0 = [0] * n
        self.peak = list(serving.outstanding)
        serving.meters.append(self)

    def take(self) -> list[tuple[float, int, int]]:
        """Per model (avg, peak, arrivals) since the last take; starts a new interval."""
        s, now = self.serving, self.serving.loop.now
        span = max(now - self.since_s, 1e-9)
        out = []
        for m in range(len(s.outstanding)):
            area = s.area[m] + s.outstanding[m] * (now - s.area_t[m])
            out.append(((area - self.area0[m]) / span, self.peak[m], s.arrivals[m] - self.arrivals0[m]))
            self.area0[m], self.arrivals0[m], self.peak[m] = area, s.arrivals[m], s.outstanding[m]
        self.since_s = now
        return out


class Serving:
    def __init__(self, loop: EventLoop, cluster: Cluster, requests: Requests, model_names: list[str]):
        self.loop, self.cluster, self.req = loop, cluster, requests
        self.names = model_names
        self.index = {name: m for m, name in enumerate(model_names)}
        n = len(model_names)
        self.routable: list[list[Instance]] = [[] for _ in range(n)]
        self.queues: list[deque[int]] = [deque() for _ in range(n)]
        self.outstanding = [0] * n
        self.arrivals = [0] * n
        self.area = [0.0] * n  # integral of outstanding over time, up to area_t
        self.area_t = [loop.now] * n
        self.meters: list[LoadMeter] = []
        self.on_waiting: Callable[[int], None] = lambda m: None  # a request waits for capacity
        self.on_request_done: Callable[[Instance], None] = lambda inst: None
        self.on_kv_short: Callable[[Instance], None] = lambda inst: None  # reclaim KV lent to copies
        self._arrival = requests.arrival_s.tolist()
        self._model = requests.model.tolist()
        self._prompt = requests.prompt_tokens.tolist()
        self._output = requests.output_tokens.tolist()
        cluster.on_instance_ready = self._instance_ready

    # ------------------------------------------------------------ events

    def arrive(self, i: int) -> None:
        m = self._model[i]
        self.arrivals[m] += 1
        self._count(m, +1)
        inst = self._pick(m, self._prompt[i] + self._output[i])
        if inst is not None and not self.queues[m]:
            self._admit(i, inst)
        else:
            self.queues[m].append(i)
            self.on_waiting(m)

    def retire(self, inst: Instance, then: str) -> None:
        """Take an instance out of routing, then drain it (cluster.retire)."""
        if inst in self.routable[self.index[inst.model]]:
            self.routable[self.index[inst.model]].remove(inst)
        self.cluster.retire(inst, then)

    def instances(self, m: int) -> list[Instance]:
        return self.routable[m]

    # ------------------------------------------------------------ internals

    def _instance_ready(self, inst: Instance) -> None:
        m = self.index[inst.model]
        self.routable[m].append(inst)
        self._drain_queue(m)

    def _pick(self, m: int, tokens: int) -> Instance | None:
        best = short = None
        for inst in self.routable[m]:
            if inst.inflight < inst.capacity:
                if inst.kv_tokens_used + tokens <= inst.kv_tokens or inst.inflight == 0:
                    if best is None or inst.inflight < best.inflight:
                        best = inst
                elif inst.kv_lent_bytes:
                    short = inst
        if best is None and short is not None:
            self.on_kv_short(short)  # lent KV space comes back before a request waits for it
            return short if short.kv_tokens_used + tokens <= short.kv_tokens else None
        return best

    def _drain_queue(self, m: int) -> None:
        queue = self.queues[m]
        while queue:
            i = queue[0]
            inst = self._pick(m, self._prompt[i] + self._output[i])
            if inst is None:
                return
            queue.popleft()
            self._admit(i, inst)

    def _admit(self, i: int, inst: Instance) -> None:
        now = self.loop.now
        prof = self.cluster.profile(inst.model)
        slow = _slowdown(self.cluster, inst)
        first = max(now, inst.prefill_free_at) + prof.prefill_s(self._prompt[i]) * slow
        inst.prefill_free_at = first
        inst.inflight += 1
        inst.kv_tokens_used += self._prompt[i] + self._output[i]
        self.cluster.served_nodes.add(inst.node)
        self.req.admitted_s[i] = now
        self.req.first_token_s[i] = first
        done = first + self._output[i] * prof.decode_step_s(inst.inflight) * slow
        self.loop.at(done, self._finish, i, inst)

    def _finish(self, i: int, inst: Instance) -> None:
        m = self._model[i]
        self.req.finish_s[i] = self.loop.now
        inst.inflight -= 1
        inst.kv_tokens_used -= self._prompt[i] + self._output[i]
        self.cluster.served_nodes.add(inst.node)
        self._count(m, -1)
        if inst.state == "ready":
            self._drain_queue(m)
        self.cluster.request_done(inst)
        self.on_request_done(inst)

    def _count(self, m: int, delta: int) -> None:
        now = self.loop.now
        self.area[m] += self.outstanding[m] * (now - self.area_t[m])
        self.area_t[m] = now
        self.outstanding[m] += delta
        if delta > 0:
            for meter in self.meters:
                if self.outstanding[m] > meter.peak[m]:
                    meter.peak[m] = self.outstanding[m]


def _slowdown(cluster: Cluster, inst: Instance) -> float:
    """Colocated busy instances split the GPUs' compute (static sharing), else 1 / compute_share."""
    colocated = cluster.gpus[inst.node][inst.devices[0]].instances
    busy = 1 + sum(1 for o in colocated if o is not inst and o.inflight > 0) if len(colocated) > 1 else 1
    return busy / inst.compute_share
