"""MuxServe-like baseline: static GPU sharing. Before the replay, models are placed once from their
popularity over the learning days: GPUs are split between TP classes by compute demand, every
model gets one replica and popular ones more, each replica on the least-loaded group of its class
with room; colocated models split the group's compute (see serving) and its KV memory.
"""

from __future__ import annotations

import math

from sim.systems.base import Context, aligned_groups

MIN_KV_TOKENS = 8192  # a replica is placed only where it keeps at least this much KV


class MuxServe:
    name = "muxserve"

    def start(self, ctx: Context) -> None:
        self.ctx = ctx
        placement = self.place()
        for (node, devices), replicas in placement.items():
            self._deploy(node, devices, replicas)

    def demand(self) -> dict[int, float]:
        """Compute demand per model: learned arrival rate x weight bytes (work per request ~ params)."""
        ctx = self.ctx
        return {m: max(ctx.history_rate_rps[m], 1e-6) * ctx.cluster.profile(name).size_bytes
                for m, name in enumerate(ctx.models)}

    def place(self) -> dict[tuple[int, tuple[int, ...]], list[int]]:
        ctx, cluster = self.ctx, self.ctx.cluster
        demand = self.demand()
        by_tp: dict[int, list[int]] = {}
        for m, name in enumerate(ctx.models):
            by_tp.setdefault(cluster.profile(name).tp, []).append(m)
        groups = self._split_gpus({tp: sum(demand[m] for m in ms) for tp, ms in by_tp.items()})
        placement: dict[tuple[int, tuple[int, ...]], list[int]] = {g: [] for gs in groups.values() for g in gs}
        for tp, models in by_tp.items():
            load = {g: 0.0 for g in groups[tp]}
            free = {g: cluster.timing.gpu.usable_bytes for g in groups[tp]}
            total = sum(demand[m] for m in models)
            replicas = {m: max(1, round(len(groups[tp]) * demand[m] / total)) for m in models}
            order = sorted(((demand[m] / replicas[m], m, r) for m in models for r in range(replicas[m])), reverse=True)
            for share, m, r in order:
                need = cluster.profile(ctx.models[m]).bytes_per_gpu + cluster.profile(ctx.models[m]).kv_bytes_per_gpu(MIN_KV_TOKENS)
                fits = [g for g in groups[tp] if free[g] >= need and m not in placement[g]]
                if not fits:
                    continue  # popular models' extra replicas may not fit; a first replica always tries
                group = min(fits, key=lambda g: (load[g], g))
                placement[group].append(m)
                load[group] += share
                free[group] -= need
        return placement

    def _split_gpus(self, demand_by_tp: dict[int, float]) -> dict[int, list[tuple[int, tuple[int, ...]]]]:
        """Give each TP class whole groups on nodes, in proportion to its demand (at least one group)."""
        cluster = self.ctx.cluster
        total_gpus = cluster.nodes * cluster.gpus_per_node
        total = sum(demand_by_tp.values())
        want = {tp: max(tp, math.floor(total_gpus * d / total / tp) * tp) for tp, d in demand_by_tp.items()}
        free = {n: list(range(cluster.gpus_per_node)) for n in range(cluster.nodes)}
        groups: dict[int, list] = {tp: [] for tp in want}
        for tp in sorted(want, reverse=True):  # big groups first, so they find aligned room
            for node in range(cluster.nodes):
                for devices in aligned_groups(cluster.gpus_per_node, tp):
                    if want[tp] > 0 and all(d in free[node] for d in devices):
                        groups[tp].append((node, devices))
                        free[node] = [d for d in free[node] if d not in devices]
                        want[tp] -= tp
        leftovers = [(n, (d,)) for n, ds in free.items() for d in ds]
        if 1 in groups:
            groups[1] += leftovers
        return groups

    def _deploy(self, node: int, devices: tuple[int, ...], replicas: list[int]) -> None:
        """Start the colocated replicas; they split the KV room left by all their weights."""
        ctx, cluster = self.ctx, self.ctx.cluster
        if not replicas:
            return
        weights = sum(cluster.profile(ctx.models[m]).bytes_per_gpu for m in replicas)
        kv_each = (min(cluster.gpus[node][d].free_bytes for d in devices) - weights) // len(replicas)
        for m in replicas:
            name = ctx.models[m]
            cluster.cold_start(name, node, devices, ctx.new_instance_id(name), kv_each, ctx.capacity,
                               start_kind="static")
