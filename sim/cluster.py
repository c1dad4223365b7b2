"""Simulated GPU cluster: nodes x GPUs with memory, prewarmed copies, engine instances and the load
path SSD -> host-memory cache -> GPU. Executes agent-like commands (prewarm, evict, promote, demote,
cold start, stop) with timings from sim.timing and keeps the books (bytes loaded, GPU-seconds, a
per-GPU state timeline). It decides nothing: which command to run is the systems' business.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

from sim.engine import EventLoop
from sim.timing import ModelProfile, TimingProfile

# GPU states on the timeline, in display priority order
EMPTY, PREWARMED, LOADING, STARTING, SERVING = range(5)
STATE_NAMES = ("empty", "prewarmed", "loading", "starting", "serving")


class OverCommit(RuntimeError):
    """A command would use more GPU memory than there is: a bug in the system that issued it."""


@dataclass(eq=False, slots=True)
class Copy:
    model: str
    node: int
    devices: tuple[int, ...]
    bytes_per_gpu: int
    ready_at: float
    state: str = "loading"  # "loading" | "ready"
    kv_host: Instance | None = None  # the instance whose idle KV space holds it (None: pool memory)
    kept: bool = False  # left by a demoted instance (not placed by a prewarm since), as the agent's KEPT_COPY


@dataclass(eq=False, slots=True)
class Instance:
    instance_id: str
    model: str
    node: int
    devices: tuple[int, ...]
    weights_per_gpu: int
    kv_bytes_per_gpu: int
    kv_tokens: int  # KV capacity in tokens
    capacity: int  # most requests in flight
    created_at: float
    ready_at: float
    start_kind: str  # "hit" (ready copy), "loading" (copy still loading), "miss" (cold), "static"
    state: str = "starting"  # "starting" | "ready" | "draining"
    inflight: int = 0
    kv_tokens_used: int = 0
    prefill_free_at: float = 0.0
    compute_share: float = 1.0  # fraction of the GPUs' compute this instance gets
    kv_lent_bytes: int = 0  # KV space per device lent to prewarmed copies
    then: str = ""  # after draining: "demote" (keep weights) or "stop"


@dataclass(eq=False, slots=True)
class Gpu:
    node: int
    device: int
    usable_bytes: int
    used_bytes: int = 0
    copies: list[Copy] = field(default_factory=list)
    instances: list[Instance] = field(default_factory=list)
    link_free_at: float = 0.0
    busy_since: float = 0.0  # when it last went from no instance to some
    state: int = EMPTY

    @property
    def free_bytes(self) -> int:
        return self.usable_bytes - self.used_bytes


class Cluster:
    def __init__(self, loop: EventLoop, timing: TimingProfile, nodes: int, gpus_per_node: int,
                 model_kinds: dict[str, str], record_timeline: bool = False):
        self.loop, self.timing = loop, timing
        self.nodes, self.gpus_per_node = nodes, gpus_per_node
        self.kind_of = model_kinds  # model name -> profile kind
        self.gpus = [[Gpu(n, d, timing.gpu.usable_bytes) for d in range(gpus_per_node)] for n in range(nodes)]
        self.host_cache: list[OrderedDict[str, int]] = [OrderedDict() for _ in range(nodes)]
        self.ssd_free_at = [0.0] * nodes
        self.instances: dict[str, Instance] = {}
        self.bytes_loaded = 0
        self.gpu_seconds = 0.0
        self.books = (loop.now, float("inf"))  # GPU-seconds (GPUs holding an instance) count in this window
        self.starts = {"hit": 0, "loading": 0, "miss": 0}
        self.kept_hits = 0  # of the hits, promotions of a copy a demote left (the rest found a prewarmed copy that
        #                     no instance has served from yet), as the agent labels them
        self.timeline: list[tuple[float, int, int, int]] | None = [] if record_timeline else None
        self._spans: dict[str, list] = {}  # instance id -> [start, end (inf: still there), node, devices, model]
        self.changed_nodes: set[int] = set()  # nodes whose memory, copies or instances changed (shells clear it)
        self.served_nodes: set[int] = set()  # nodes whose instances' requests changed (Serving adds, shells clear it)
        self.on_instance_ready: Callable[[Instance], None] = lambda inst: None
        self.on_instance_gone: Callable[[Instance], None] = lambda inst: None

    def profile(self, model: str) -> ModelProfile:
        return self.timing.models[self.kind_of[model]]

    def copies_of(self, model: str) -> list[Copy]:
        return [c for row in self.gpus for g in row for c in g.copies if c.model == model and c.devices[0] == g.device]

    def find_copy(self, model: str, node: int, devices: tuple[int, ...]) -> Copy | None:
        for c in self.gpus[node][devices[0]].copies:
            if c.model == model and c.devices == devices:
                return c
        return None

    # ------------------------------------------------------------ commands

    def prewarm(self, model: str, node: int, devices: tuple[int, ...], in_kv_of: Instance | None = None) -> Copy:
        """Load a copy into free pool memory, or into the idle KV space of instance `in_kv_of`."""
        size = self.profile(model).bytes_per_gpu
        copy = Copy(model, node, devices, size, ready_at=self._load_done_at(model, node, devices), kv_host=in_kv_of)
        if in_kv_of is None:
            self._take(node, devices, size)
        else:
            self._lend_kv(in_kv_of, size)
        for d in devices:
            self.gpus[node][d].copies.append(copy)
        self.loop.at(copy.ready_at, self._copy_loaded, copy)
        self._touch(node, devices)
        return copy

    def evict(self, copy: Copy) -> None:
        self._release(copy)
        copy.state = "evicted"
        self._touch(copy.node, copy.devices)

    def lent_copies(self, inst: Instance) -> list[Copy]:
        return [c for c in {id(c): c for d in inst.devices for c in self.gpus[inst.node][d].copies}.values()
                if c.kv_host is inst]

    def promote(self, copy: Copy, instance_id: str, kv_bytes_per_gpu: int, capacity: int) -> Instance:
        """Serve from a prewarmed copy (ready or still loading); the copy's memory becomes the instance's."""
        self._release(copy)
        kind = "hit" if copy.state == "ready" else "loading"
        self.kept_hits += kind == "hit" and copy.kept
        copy.state = "promoted"
        ready_at = max(copy.ready_at, self.loop.now) + self.timing.gpu.promote_s
        inst = self._new_instance(instance_id, copy.model, copy.node, copy.devices, kv_bytes_per_gpu,
                                  capacity, ready_at, kind)
        return inst

    def cold_start(self, model: str, node: int, devices: tuple[int, ...], instance_id: str,
                   kv_bytes_per_gpu: int, capacity: int, start_kind: str = "miss", engine: str = "engine") -> Instance:
        """Load the weights, then start the instance (see GpuProfile.start_s for `engine`)."""
        ready_at = self._load_done_at(model, node, devices) + self.timing.gpu.start_s(engine)
        return self._new_instance(instance_id, model, node, devices, kv_bytes_per_gpu, capacity,
                                  ready_at, start_kind)

    def start_warm(self, model: str, node: int, devices: tuple[int, ...], instance_id: str,
                   kv_bytes_per_gpu: int, capacity: int) -> Instance:
        """An instance ready at once with nothing loaded: a model that is always warm (the oracle)."""
        return self._new_instance(instance_id, model, node, devices, kv_bytes_per_gpu, capacity,
                                  self.loop.now, "static")

    def retire(self, inst: Instance, then: str) -> None:
        """Stop taking requests; once drained, "demote" keeps the weights as a copy, "stop" frees all."""
        inst.state, inst.then = "draining", then
        self._touch(inst.node, inst.devices)
        if inst.inflight == 0:
            self._drained(inst)

    def request_done(self, inst: Instance) -> None:
        """Serving calls this when a request leaves an instance."""
        if inst.state == "draining" and inst.inflight == 0:
            self._drained(inst)

    def spans(self) -> list[tuple] | None:
        """Every instance's (start, end or inf, node, devices, model), when the timeline is recorded."""
        return None if self.timeline is None else [tuple(span) for span in self._spans.values()]

    def close_books(self) -> None:
        """Count the GPU-seconds of the GPUs still holding instances."""
        for row in self.gpus:
            for gpu in row:
                if gpu.instances:
                    self._book(gpu)

    def _book(self, gpu: Gpu) -> None:
        """Add the time since `gpu.busy_since` (clipped to the books window) and restart it."""
        held = min(self.loop.now, self.books[1]) - max(gpu.busy_since, self.books[0])
        self.gpu_seconds += max(held, 0.0)
        gpu.busy_since = self.loop.now

    # ------------------------------------------------------------ internals

    def _new_instance(self, instance_id, model, node, devices, kv_bytes_per_gpu, capacity, ready_at, kind):
        weights = self.profile(model).bytes_per_gpu
        self._take(node, devices, weights + kv_bytes_per_gpu)
        inst = Instance(instance_id, model, node, devices, weights, kv_bytes_per_gpu,
                        self._kv_tokens(model, kv_bytes_per_gpu), capacity, self.loop.now, ready_at, kind)
        if kind in self.starts:
            self.starts[kind] += 1
        self.instances[instance_id] = inst
        if self.timeline is not None:
            self._spans[instance_id] = [self.loop.now, float("inf"), node, devices, model]
        for d in devices:
            gpu = self.gpus[node][d]
            if not gpu.instances:
                gpu.busy_since = self.loop.now
            gpu.instances.append(inst)
        self.loop.at(ready_at, self._instance_started, inst)
        self._touch(node, devices)
        return inst

    def _release(self, copy: Copy) -> None:
        for d in copy.devices:
            self.gpus[copy.node][d].copies.remove(copy)
            if copy.kv_host is None:
                self.gpus[copy.node][d].used_bytes -= copy.bytes_per_gpu
        if copy.kv_host is not None:
            self._lend_kv(copy.kv_host, -copy.bytes_per_gpu)

    def _lend_kv(self, inst: Instance, n_bytes: int) -> None:
        inst.kv_lent_bytes += n_bytes
        inst.kv_tokens = self._kv_tokens(inst.model, inst.kv_bytes_per_gpu - inst.kv_lent_bytes)

    def _kv_tokens(self, model: str, kv_bytes_per_gpu: int) -> int:
        prof = self.profile(model)
        return kv_bytes_per_gpu * prof.tp // prof.kv_bytes_per_token

    def _instance_started(self, inst: Instance) -> None:
        if inst.state == "starting":
            inst.state = "ready"
            self._touch(inst.node, inst.devices)
            self.on_instance_ready(inst)

    def _drained(self, inst: Instance) -> None:
        """A stop frees the GPUs at once; a demote takes demote_s (the engine parks its weights)."""
        if inst.then == "stop":
            self._finish_retire(inst)
        else:
            self.loop.after(self.timing.gpu.demote_s, self._finish_retire, inst)

    def _finish_retire(self, inst: Instance) -> None:
        if inst.instance_id not in self.instances:
            return
        del self.instances[inst.instance_id]
        if inst.instance_id in self._spans:
            self._spans[inst.instance_id][1] = self.loop.now
        for d in inst.devices:
            gpu = self.gpus[inst.node][d]
            gpu.instances.remove(inst)
            if not gpu.instances:
                self._book(gpu)
            gpu.used_bytes -= inst.kv_bytes_per_gpu + inst.weights_per_gpu
        for copy in self.lent_copies(inst):
            copy.kv_host = None  # the KV space is gone: the copy now holds pool memory
            self._take(copy.node, copy.devices, copy.bytes_per_gpu)
        if inst.then == "demote":
            copy = Copy(inst.model, inst.node, inst.devices, inst.weights_per_gpu, self.loop.now, "ready", kept=True)
            self._take(inst.node, inst.devices, inst.weights_per_gpu)
            for d in inst.devices:
                self.gpus[inst.node][d].copies.append(copy)
        self._touch(inst.node, inst.devices)
        self.on_instance_gone(inst)

    def _copy_loaded(self, copy: Copy) -> None:
        if copy.state == "loading":
            copy.state = "ready"
            self._touch(copy.node, copy.devices)

    def _take(self, node: int, devices: tuple[int, ...], n_bytes: int) -> None:
        row = self.gpus[node]
        if any(row[d].free_bytes < n_bytes for d in devices):
            raise OverCommit(f"node {node} devices {devices}: need {n_bytes} bytes, "
                             f"free {[row[d].free_bytes for d in devices]}")
        for d in devices:
            row[d].used_bytes += n_bytes

    def _load_done_at(self, model: str, node: int, devices: tuple[int, ...]) -> float:
        """When a load of the model's weights onto these GPUs completes, booking the links it uses.

        From the node's host-memory cache when the checkpoint is there, else SSD -> host memory
        (serialised per node) pipelined with host -> GPU."""
        now, prof = self.loop.now, self.profile(model)
        row = self.gpus[node]
        start = max([now] + [row[d].link_free_at for d in devices])
        done = start + self.timing.host_load_s(self.kind_of[model])
        cache = self.host_cache[node]
        if model in cache:
            cache.move_to_end(model)
        else:
            ssd_done = max(now, self.ssd_free_at[node]) + self.timing.ssd_load_s(self.kind_of[model])
            self.ssd_free_at[node] = ssd_done
            done = max(done, ssd_done)
            cache[model] = prof.size_bytes
            while sum(cache.values()) > self.timing.gpu.host_cache_bytes_per_node and len(cache) > 1:
                cache.popitem(last=False)
        for d in devices:
            row[d].link_free_at = done
        self.bytes_loaded += prof.size_bytes
        return done

    def _touch(self, node: int, devices: tuple[int, ...]) -> None:
        self.changed_nodes.add(node)
        if self.timeline is None:
            return
        for d in devices:
            gpu = self.gpus[node][d]
            state = _gpu_state(gpu)
            if state != gpu.state:
                gpu.state = state
                self.timeline.append((self.loop.now, node, d, state))


def _gpu_state(gpu: Gpu) -> int:
    return state_of([i.state for i in gpu.instances], [c.state for c in gpu.copies])


def state_of(instance_states: list[str], copy_states: list[str]) -> int:
    """A device's timeline state from its instances' ("starting", ...) and copies' ("loading", ...)."""
    if instance_states:
        return SERVING if any(s != "starting" for s in instance_states) else STARTING
    if "loading" in copy_states:
        return LOADING
    return PREWARMED if copy_states else EMPTY
