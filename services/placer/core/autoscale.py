"""Autoscaler (DESIGN §3.3) and KV-space reclaim (§3.4). Scale up above 0.8*B*n, down below
0.5*B*n to the count that keeps load under the scale-up line (zero without load), never touching
instances younger than `protect_s` (nor, for scale-downs, `keep_s`), nor models whose load is
unmeasured; a scale-down demotes (drain, the weights stay as a copy).
"""

from __future__ import annotations

from typing import Mapping

from services.placer.core import effects as fx
from services.placer.core.allocate import allocate_in
from services.placer.core.cluster import Cluster


def autoscale(cluster: Cluster, loads: Mapping[str, float], now_s: float,
              unmeasured: frozenset[str] = frozenset()) -> list[fx.Effect]:
    config = cluster.config
    effects: list[fx.Effect] = []
    for model in sorted(cluster.models):
        load = loads.get(model, 0.0)
        serving = cluster.serving(model)
        n = len(serving)
        target = config.instances_for(load)
        if config.over_scale_up_line(load, n):
            for _ in range(target - n):
                allocation = allocate_in(cluster, model, now_s, fx.SCALE_UP)
                if not allocation.found:
                    break
                effects += allocation.effects
        elif n and model not in unmeasured and load < config.scale_down_at * config.capacity * n:
            keep = max(config.protect_s, config.keep_s)
            removable = sorted((o for o in serving if o.instance.ready and now_s - o.instance.started_at_s >= keep),
                               key=lambda o: (o.instance.inflight, -o.instance.started_at_s, o.instance.instance_id))
            for occ in removable[:n - target]:
                cluster.demote(occ)
                effects.append(fx.Demote(model, occ.node, occ.devices, occ.instance.instance_id, fx.SCALE_DOWN))
    return effects


def reclaim_kv(cluster: Cluster) -> list[fx.Effect]:
    """Evict copies borrowing an instance's KV space, lowest score first, until the instance's
    reserve R fits again (before any of its requests waits for KV space)."""
    effects: list[fx.Effect] = []
    for node in cluster.nodes.values():
        for gpu in node.gpus.values():
            if gpu.kv_spare >= 0:
                continue  # its host's reserve fits: nothing to reclaim
            hosted = sorted((o for o in gpu.occupants if gpu.index in o.kv_devices), key=lambda o: (o.score, o.devices))
            for occ in hosted:
                if gpu.kv_spare >= 0:
                    break
                cluster.evict(occ)
                effects.append(fx.Evict(occ.model, occ.node, occ.devices, fx.KV_RECLAIMED,
                                        for_model=gpu.host.model if gpu.host else ""))
    return effects
