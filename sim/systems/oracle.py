"""Oracle: the physical limit, every model always warm on GPUs to spare. Each model serves from an
instance ready at the start; a request that finds its model's instances full gets another one at
once (nothing loaded, nothing started), so only prefill, decode and batching remain. Give it a
cluster with a GPU group for every instance it may want: with none free, the request waits.
"""

from __future__ import annotations

from sim.systems.base import Context, aligned_groups, full_kv_bytes


class Oracle:
    name = "oracle"

    def start(self, ctx: Context) -> None:
        self.ctx = ctx
        ctx.serving.on_waiting = self._add
        for m in range(len(ctx.models)):
            self._add(m)

    def _add(self, m: int) -> None:
        ctx, cluster = self.ctx, self.ctx.cluster
        name = ctx.models[m]
        prof = cluster.profile(name)
        for node in range(cluster.nodes):
            for devices in aligned_groups(cluster.gpus_per_node, prof.tp):
                gpus = [cluster.gpus[node][d] for d in devices]
                if not any(g.instances for g in gpus):
                    cluster.start_warm(name, node, devices, ctx.new_instance_id(name),
                                       full_kv_bytes(gpus, prof.bytes_per_gpu), ctx.capacity)
                    return
