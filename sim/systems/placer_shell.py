"""The simulator's shell around the placer core: builds the core's Snapshot from the simulated
cluster (exactly what the live placer reads from agents' node views) and executes the core's
effects as an agent would (in order per node; a demote holds the node until drained; what cannot
be carried out is refused and counted). It takes no decision of its own; the one agent-side mechanism is
reclaiming KV space lent to prewarmed copies when a request of the hosting instance needs it.
"""

from __future__ import annotations

from collections import deque
from operator import attrgetter

from services.placer.core import effects as fx
from services.placer.core import snapshot as core
from services.placer.core.overlay import apply_effects
from sim.cluster import Cluster, Copy, Instance, OverCommit
from sim.serving import Serving


VIEW_KEY = attrgetter("instance_id", "created_at", "inflight", "kv_tokens_used", "state")  # all a view shows that changes


class Refused(RuntimeError):
    """An effect that names something the cluster does not hold (the agent would refuse it)."""


def node_name(node: int) -> str:
    return f"node{node}"


class PlacerShell:
    def __init__(self, cluster: Cluster, serving: Serving, capacity: int, kv_bytes_per_gpu: dict[str, int],
                 universal_workers: bool = False):
        self.cluster, self.serving, self.capacity = cluster, serving, capacity
        self.universal_workers = universal_workers  # cold starts load into an engine already running on the GPUs
        self.kv_bytes_per_gpu = kv_bytes_per_gpu  # model -> KV per device a new instance gets
        self.decisions: list[tuple[float, fx.Effect]] = []  # every executed effect, in order
        self.refused: list[tuple[float, fx.Effect, str]] = []  # effects the cluster could not carry out
        self.pending: dict[int, deque] = {}  # node -> effects not yet run
        self.blocked: dict[int, Instance] = {}  # node -> the draining instance its queue waits for
        self._gpus: list[tuple[core.Gpu, ...]] = [() for _ in range(cluster.nodes)]  # per node, as last seen
        self._copies: list[tuple[core.Copy, ...]] = [() for _ in range(cluster.nodes)]
        self._members: list[list[Instance]] = [[] for _ in range(cluster.nodes)]  # per node its instances, in order
        self._views: list[dict[tuple, core.Instance]] = [{} for _ in range(cluster.nodes)]  # per node by VIEW_KEY
        self._nodes: list[core.Node] = [core.Node(node_name(n), ()) for n in range(cluster.nodes)]  # the last views
        self._forecasts: dict | None = None
        self._models: tuple[core.ModelSpec, ...] = ()
        self._kv_scale = {name: (cluster.profile(name).kv_bytes_per_token, cluster.profile(name).tp)
                          for name in serving.names}  # model -> what turns its KV tokens into bytes per device
        cluster.changed_nodes.update(range(cluster.nodes))
        serving.on_kv_short = self.reclaim_for
        cluster.on_instance_gone = self._instance_gone

    def snapshot(self, forecasts: dict[str, tuple[float, float, float]], loads: dict[str, float]) -> core.Snapshot:
        """The observed cluster with the effects not yet carried out overlaid (as the live placer does).
        A node the cluster has not touched since the last snapshot, whose instances' figures are
        unchanged, keeps its view (the same object), as do unchanged instances' views; only nodes
        the cluster or its requests touched are looked at."""
        cl = self.cluster
        changed = cl.changed_nodes
        if changed:
            for n in changed:
                row = cl.gpus[n]
                self._gpus[n] = tuple(core.Gpu(g.device, g.free_bytes) for g in row)
                self._copies[n] = tuple(core.Copy(c.model, node_name(c.node), c.devices, c.state == "ready",
                                                  c.kv_host.instance_id if c.kv_host else "")
                                        for g in row for c in g.copies if c.devices[0] == g.device)
                self._members[n] = []
            for inst in cl.instances.values():  # creation order, as the live agents list them
                if inst.node in changed:
                    self._members[inst.node].append(inst)
        if forecasts != self._forecasts:
            self._forecasts = dict(forecasts)
            self._models = tuple(core.ModelSpec(name, cl.profile(name).size_bytes, cl.profile(name).tp,
                                                kv_bytes=self.kv_bytes_per_gpu[name],
                                                **dict(zip(("avg", "peak", "chance"), forecasts.get(name, ()))))
                                 for name in self.serving.names)
        looked = changed | cl.served_nodes
        nodes = tuple(self._node_view(n, n in changed) if n in looked else self._nodes[n] for n in range(cl.nodes))
        changed.clear()
        cl.served_nodes.clear()
        observed = core.Snapshot(nodes, self._models, loads)
        pending = [e for node in sorted(self.blocked) for e in self.pending[node]]  # only held queues keep any
        return apply_effects(observed, pending, cl.loop.now) if pending else observed

    def _node_view(self, n: int, touched: bool) -> core.Node:
        members, last = self._members[n], self._views[n]
        keys = list(map(VIEW_KEY, members))
        views = list(map(last.get, keys))
        if not touched and None not in views:
            return self._nodes[n]
        name = self._nodes[n].name
        for k in [k for k, view in enumerate(views) if view is None]:
            inst = members[k]
            per_token, tp = self._kv_scale[inst.model]
            views[k] = core.Instance(inst.instance_id, inst.model, name, inst.devices, inst.created_at, inst.inflight,
                                     inst.kv_bytes_per_gpu, inst.kv_tokens_used * per_token // tp,
                                     inst.state != "starting", inst.state == "draining")
        self._views[n] = dict(zip(keys, views))
        self._nodes[n] = core.Node(name, self._gpus[n], tuple(views), self._copies[n])
        return self._nodes[n]

    def execute(self, effects, now_s: float) -> None:
        """Queue effects per node; like an agent, a node runs its commands in order and a demote
        holds the node's later commands until the instance has drained."""
        nodes = set()
        for effect in effects:
            node = int(effect.node.removeprefix("node"))
            self.pending.setdefault(node, deque()).append(effect)
            nodes.add(node)
        for node in sorted(nodes):  # the other queues are empty or held by a drain
            self._pump(node)

    def _pump(self, node: int) -> None:
        queue = self.pending[node]
        while queue and node not in self.blocked:
            effect = queue.popleft()
            self.decisions.append((self.cluster.loop.now, effect))
            try:
                self._run(effect, node)
            except (Refused, OverCommit) as exc:
                self.refused.append((self.cluster.loop.now, effect, str(exc)))

    def _instance_gone(self, inst: Instance) -> None:
        if self.blocked.get(inst.node) is inst:
            del self.blocked[inst.node]
            self._pump(inst.node)

    def _run(self, effect, node: int) -> None:
        cluster = self.cluster
        if isinstance(effect, fx.Prewarm):
            host = cluster.instances.get(effect.kv_host) if effect.kv_host else None
            cluster.prewarm(effect.model, node, effect.devices, in_kv_of=host)
        elif isinstance(effect, fx.Evict):
            cluster.evict(self._copy(effect, node))
        elif isinstance(effect, fx.Promote):
            cluster.promote(self._copy(effect, node), effect.instance_id, effect.kv_bytes, self.capacity)
        elif isinstance(effect, fx.ColdStart):
            cluster.cold_start(effect.model, node, effect.devices, effect.instance_id, effect.kv_bytes, self.capacity,
                               engine="worker" if self.universal_workers else "engine")
        elif isinstance(effect, fx.Demote):
            inst = cluster.instances.get(effect.instance_id)
            if inst is None:
                raise Refused(f"no instance {effect.instance_id}")
            self.blocked[node] = inst
            self.serving.retire(inst, "demote")

    def _copy(self, effect, node: int) -> Copy:
        copy = self.cluster.find_copy(effect.model, node, effect.devices)
        if copy is None:
            raise Refused(f"no copy of {effect.model} on node{node} {effect.devices}")
        return copy

    def reclaim_for(self, inst: Instance) -> None:
        """A request of `inst` waits for KV space: evict every copy borrowing it."""
        for copy in self.cluster.lent_copies(inst):
            self.decisions.append((self.cluster.loop.now, fx.Evict(copy.model, node_name(copy.node), copy.devices,
                                                                     fx.KV_RECLAIMED, inst.model)))
            self.cluster.evict(copy)
