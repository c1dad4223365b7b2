"""ServerlessLLM-like baseline: reactive autoscaling with fast checkpoint loading and keep-alive.

A model with requests waiting beyond the capacity of its starting instances gets a new instance
on a free TP group (preferring a node whose host memory caches the checkpoint), evicting the
least-recently idle instances if needed; idle instances stop after `keep_alive_s`. No forecast.
Each instance is a new engine: as ServerlessLLM's vLLM backend creates one per instance, with vLLM's
defaults ("engine"); the "eager_engine" variant gives it a process started ahead, in eager mode.
"""

from __future__ import annotations

from sim.cluster import Instance
from sim.systems.base import Context, aligned_groups, full_kv_bytes


ENGINES = {"serverlessllm": "engine", "serverlessllm-eager-engine": "eager_engine"}  # system -> GpuProfile.start_s


class ServerlessLLM:
    def __init__(self, keep_alive_s: float = 60.0, name: str = "serverlessllm"):
        self.name = name
        self.keep_alive_s = keep_alive_s
        self.engine = ENGINES[name]
        self.idle_since: dict[str, float] = {}
        self.blocked: set[int] = set()

    def start(self, ctx: Context) -> None:
        self.ctx = ctx
        ctx.serving.on_waiting = self._waiting
        ctx.serving.on_request_done = self._request_done
        ctx.cluster.on_instance_gone = lambda inst: ctx.loop.after(0.0, self._retry_blocked)

    def _waiting(self, m: int) -> None:
        ctx = self.ctx
        starting = sum(1 for i in ctx.cluster.instances.values()
                       if i.model == ctx.models[m] and i.state == "starting")
        if len(ctx.serving.queues[m]) > ctx.capacity * starting:
            if not self._start_instance(m):
                self.blocked.add(m)

    def _start_instance(self, m: int) -> bool:
        ctx, model = self.ctx, self.ctx.models[m]
        choice = self._choose_group(model)
        if choice is None:
            return False
        node, devices, victims = choice
        for victim in victims:
            ctx.serving.retire(victim, "stop")
        gpus = [ctx.cluster.gpus[node][d] for d in devices]
        weights = ctx.cluster.profile(model).bytes_per_gpu
        inst = ctx.cluster.cold_start(model, node, devices, ctx.new_instance_id(model),
                                      full_kv_bytes(gpus, weights), ctx.capacity, engine=self.engine)
        self._idle_from(inst, inst.ready_at)
        return True

    def _choose_group(self, model: str):
        """(node, devices, idle instances to stop): free groups first, cached checkpoint first,
        else the group whose instances have all been idle the longest."""
        cluster = self.ctx.cluster
        prof = cluster.profile(model)
        best, best_key = None, None
        for node in range(cluster.nodes):
            cached = model in cluster.host_cache[node]
            for devices in aligned_groups(cluster.gpus_per_node, prof.tp):
                gpus = [cluster.gpus[node][d] for d in devices]
                victims = {id(i): i for g in gpus for i in g.instances}.values()
                if any(v.inflight or v.state != "ready" for v in victims):
                    continue
                room = min(g.free_bytes + sum(v.weights_per_gpu + v.kv_bytes_per_gpu for v in g.instances) for g in gpus)
                if room < prof.bytes_per_gpu + prof.kv_bytes_per_gpu(4096):
                    continue
                idle = max((self.idle_since.get(v.instance_id, 0.0) for v in victims), default=float("-inf"))
                key = (len(victims) > 0, idle, not cached, node, devices)
                if best_key is None or key < best_key:
                    best, best_key = (node, devices, list(victims)), key
        return best

    def _request_done(self, inst: Instance) -> None:
        if inst.inflight == 0 and inst.state == "ready":
            self._idle_from(inst, self.ctx.loop.now)
            self._retry_blocked()

    def _idle_from(self, inst: Instance, at_s: float) -> None:
        self.idle_since[inst.instance_id] = at_s
        self.ctx.loop.at(at_s + self.keep_alive_s, self._expire, inst, at_s)

    def _expire(self, inst: Instance, idle_from_s: float) -> None:
        if inst.state == "ready" and inst.inflight == 0 and self.idle_since.get(inst.instance_id) == idle_from_s:
            del self.idle_since[inst.instance_id]
            self.ctx.serving.retire(inst, "stop")

    def _retry_blocked(self) -> None:
        for m in sorted(self.blocked):
            self.blocked.discard(m)
            self._waiting(m)
