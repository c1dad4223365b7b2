"""Routing and holding policy of the gateway: which instance serves a request, which requests wait.

A pure state machine. It keeps the routable instances (from agent heartbeats and events), this
gateway's in-flight count per instance and a bounded FIFO per model with deadlines. Every method
takes the time as an argument and returns effects for the shell to apply; nothing here does I/O.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from services.gateway.core.load import LoadMeter
from shared.schemas import LoadSample

QUEUE_FULL_RETRY_S = 1.0  # Retry-After of a 429 (the queue drains at engine speed)
DEADLINE_RETRY_S = 5.0  # Retry-After of a 503 (the model is still warming up)
INSTANCE_STATES = ("starting", "ready", "draining")  # "stopped" removes the instance
TOMBSTONE_S = 60.0  # how long a removed instance ignores older observations (a stale view in Redis)


@dataclass(frozen=True)
class Policy:
    max_inflight: int  # B: requests in flight per instance (from this gateway)
    queue_limit: int  # requests a model may hold waiting
    queue_deadline_s: float  # how long a request may wait for an instance
    ask_interval_s: float = 5.0  # at most one placer ask per model in this time (while requests wait), unless
    #                              every instance of the model stopped or began draining since
    ask_retry_s: float = 1.0  # wait before asking again after the placer failed or did not answer


@dataclass(frozen=True)
class InstanceSeen:
    """One observation of an instance: from a heartbeat, an event or a placer answer."""

    instance_id: str
    model: str
    node: str
    state: str  # starting | ready | draining | stopped
    as_of_s: float  # the observer's time stamp: an older observation never overrides a newer one


# ---------------------------------------------------------------- effects


@dataclass(frozen=True)
class Dispatch:
    """Send the request to this instance now."""

    request_id: str
    instance_id: str
    queue_wait_s: float  # waiting behind other requests or for a free slot
    start_wait_s: float  # waiting while the model had no ready instance


@dataclass(frozen=True)
class Refuse:
    """Answer the request with an error: its queue was full or its deadline passed."""

    request_id: str
    status: int
    reason: str
    retry_after_s: float


@dataclass(frozen=True)
class Abort:
    """The request's instance is gone after it answered in part: fail it (it cannot be resumed)."""

    request_id: str
    instance_id: str


@dataclass(frozen=True)
class Requeue:
    """The request's instance is gone (or refused it) before any output: it waits again, keeping its
    place by arrival and its deadline; a later Dispatch sends it elsewhere."""

    request_id: str
    instance_id: str


@dataclass(frozen=True)
class AskPlacer:
    """Ask the placer for an instance of the model (never two pending, at most one per ask_interval_s)."""

    model: str
    waiting: int


Effect = Dispatch | Refuse | Abort | Requeue | AskPlacer


# ---------------------------------------------------------------- state


@dataclass
class _Instance:
    model: str
    node: str
    state: str
    as_of_s: float
    running: set[str] = field(default_factory=set)  # this gateway's requests on it


@dataclass
class _Request:
    model: str
    arrived_s: float
    deadline_s: float
    cold: bool  # the model had no ready instance when the request arrived
    instance_id: str = ""  # set once dispatched
    answering: bool = False  # its instance has sent output: it can no longer be sent elsewhere


@dataclass
class _Model:
    queue: deque[str] = field(default_factory=deque)
    instances: set[str] = field(default_factory=set)
    ready_since_s: float | None = None  # since when the model has had a ready instance
    ask_pending: bool = False  # an ask is on its way to the placer
    next_ask_s: float = -math.inf  # no new ask before this time


class Scheduler:
    def __init__(self, policy: Policy, now_s: float, source: str = ""):
        self.policy = policy
        self.load = LoadMeter(now_s, source)
        self._instances: dict[str, _Instance] = {}
        self._requests: dict[str, _Request] = {}
        self._models: dict[str, _Model] = {}
        self._gone: dict[str, float] = {}  # removed instance -> as_of_s of the observation that removed it

    # ------------------------------------------------------------ requests

    def admit(self, request_id: str, model: str, now_s: float) -> list[Effect]:
        """A new request: dispatch it, queue it (maybe asking the placer) or refuse it (429)."""
        m = self._model(model)
        if len(m.queue) >= self.policy.queue_limit:
            return [Refuse(request_id, 429, f"{len(m.queue)} requests already wait for {model}",
                           QUEUE_FULL_RETRY_S)]
        self._requests[request_id] = _Request(model, now_s, now_s + self.policy.queue_deadline_s,
                                              cold=m.ready_since_s is None)
        m.queue.append(request_id)
        self.load.change(model, +1, now_s, arrival=True)
        return self._release(model, now_s) + self._maybe_ask(model, now_s)

    def finish(self, request_id: str, now_s: float) -> list[Effect]:
        """The request ended (answered, failed, or its client left): free its place or slot."""
        request = self._requests.pop(request_id, None)
        if request is None:
            return []
        self.load.change(request.model, -1, now_s)
        instance = self._instances.get(request.instance_id)
        if instance is not None:
            instance.running.discard(request_id)
        elif not request.instance_id:
            self._models[request.model].queue.remove(request_id)
        return self._release(request.model, now_s)

    def answering(self, request_id: str) -> None:
        """The request's instance sent its first output: from now on it cannot be re-dispatched."""
        request = self._requests.get(request_id)
        if request is not None:
            request.answering = True

    def instance_refused(self, request_id: str, instance_id: str, now_s: float) -> list[Effect]:
        """The instance said it does not serve (stopping, or gone from its worker): stop routing to it
        until a newer observation says otherwise, and send the request elsewhere."""
        instance = self._instances.get(instance_id)
        if instance is not None and self._sent_to(request_id, instance_id):
            instance.state = "draining"
        return self.unacknowledged(request_id, instance_id, now_s)

    def unacknowledged(self, request_id: str, instance_id: str, now_s: float) -> list[Effect]:
        """The instance never acknowledged the request (lost in a bus outage): send it again, to
        whichever instance is free then (the same one, if it still is)."""
        if not self._sent_to(request_id, instance_id) or self._requests[request_id].answering:
            return []
        instance = self._instances[instance_id]
        instance.running.discard(request_id)
        requeued = self._requeue(instance.model, [request_id])
        return requeued + self._instances_changed(instance.model, now_s) + self._maybe_ask(instance.model, now_s)

    def _sent_to(self, request_id: str, instance_id: str) -> bool:
        request = self._requests.get(request_id)
        return request is not None and request.instance_id == instance_id and instance_id in self._instances

    def tick(self, now_s: float) -> list[Effect]:
        """Refuse requests whose deadline passed (503) and retry failed placer asks."""
        effects: list[Effect] = []
        for model, m in self._models.items():
            while m.queue and self._requests[m.queue[0]].deadline_s <= now_s:
                effects.append(self._refuse_head(model, f"no instance of {model} became free within "
                                                        f"{self.policy.queue_deadline_s:g} s", DEADLINE_RETRY_S, now_s))
            effects += self._maybe_ask(model, now_s)
        return effects

    def refuse_waiting(self, reason: str, now_s: float) -> list[Effect]:
        """Refuse every held request (503), e.g. when the gateway shuts down."""
        return [self._refuse_head(model, reason, QUEUE_FULL_RETRY_S, now_s)
                for model, m in self._models.items() for _ in range(len(m.queue))]

    def next_deadline_s(self) -> float | None:
        heads = [self._requests[m.queue[0]].deadline_s for m in self._models.values() if m.queue]
        return min(heads, default=None)

    def queued(self, model: str) -> int:
        m = self._models.get(model)
        return len(m.queue) if m else 0

    def outstanding(self, model: str) -> int:
        return self.load.outstanding(model)

    def sample(self, now_s: float, at_s: float) -> list[LoadSample]:
        return self.load.sample(now_s, at_s)

    # ------------------------------------------------------------ instances

    def observe(self, seen: InstanceSeen, now_s: float) -> list[Effect]:
        """An event or placer answer about one instance (ignored if older than what we know)."""
        known = self._instances.get(seen.instance_id)
        if known is not None and known.as_of_s > seen.as_of_s:
            return []  # older than what we know
        if seen.as_of_s <= self._gone.get(seen.instance_id, -math.inf):
            return []  # made before the observation that removed the instance
        if seen.state not in INSTANCE_STATES:
            return self._remove(seen.instance_id, seen.as_of_s, now_s)
        if known is None or known.model != seen.model:
            effects = self._remove(seen.instance_id, -math.inf, now_s)
            self._instances[seen.instance_id] = _Instance(seen.model, seen.node, seen.state, seen.as_of_s)
            self._model(seen.model).instances.add(seen.instance_id)
        else:
            effects = []
            known.state, known.node, known.as_of_s = seen.state, seen.node, seen.as_of_s
        if seen.state == "draining":
            self._unserved(seen.model, now_s)
        return effects + self._instances_changed(seen.model, now_s)

    def observe_node(self, node: str, instances: list[InstanceSeen], as_of_s: float, now_s: float) -> list[Effect]:
        """A node's full view: its listed instances are the truth, unlisted older ones are gone."""
        listed = {seen.instance_id for seen in instances}
        effects: list[Effect] = []
        for instance_id, instance in list(self._instances.items()):
            if instance.node == node and instance_id not in listed and instance.as_of_s <= as_of_s:
                effects += self._remove(instance_id, as_of_s, now_s)
        self._gone = {i: gone_s for i, gone_s in self._gone.items() if gone_s > as_of_s - TOMBSTONE_S}
        for seen in instances:
            effects += self.observe(seen, now_s)
        return effects

    def forget_dead_nodes(self, alive: set[str], stale_before_s: float, now_s: float) -> list[Effect]:
        """Drop instances of nodes without a live heartbeat (unless seen after `stale_before_s`)."""
        effects: list[Effect] = []
        for instance_id, instance in list(self._instances.items()):
            if instance.node not in alive and instance.as_of_s < stale_before_s:
                effects += self._remove(instance_id, stale_before_s, now_s)
        return effects

    def placer_answered(self, model: str, ok: bool, instances: list[InstanceSeen], now_s: float) -> list[Effect]:
        """The placer's answer to an ask: ready instances are usable now; a failure is retried sooner."""
        m = self._model(model)
        m.ask_pending = False
        if not ok:
            m.next_ask_s = now_s + self.policy.ask_retry_s
        effects: list[Effect] = []
        for seen in instances:
            effects += self.observe(seen, now_s)
        return effects

    def ready_instances(self, model: str) -> list[str]:
        m = self._models.get(model)
        return sorted(i for i in m.instances if self._instances[i].state == "ready") if m else []

    def instance_load(self, instance_id: str) -> int:
        instance = self._instances.get(instance_id)
        return len(instance.running) if instance else 0

    # ------------------------------------------------------------ internals

    def _model(self, model: str) -> _Model:
        m = self._models.get(model)
        if m is None:
            m = self._models[model] = _Model()
        return m

    def _pick(self, model: str) -> str | None:
        """The least-loaded ready instance with a free slot (ties: the smallest id, for determinism)."""
        best, best_load = None, self.policy.max_inflight
        for instance_id in sorted(self._models[model].instances):
            instance = self._instances[instance_id]
            if instance.state == "ready" and len(instance.running) < best_load:
                best, best_load = instance_id, len(instance.running)
        return best

    def _release(self, model: str, now_s: float) -> list[Effect]:
        """Dispatch queued requests in arrival order while the model has free slots."""
        m = self._models[model]
        effects: list[Effect] = []
        while m.queue:
            instance_id = self._pick(model)
            if instance_id is None:
                break
            request_id = m.queue.popleft()
            request = self._requests[request_id]
            request.instance_id = instance_id
            self._instances[instance_id].running.add(request_id)
            waited_s = now_s - request.arrived_s
            start_wait_s = min(max(m.ready_since_s - request.arrived_s, 0.0), waited_s) if request.cold else 0.0
            effects.append(Dispatch(request_id, instance_id, waited_s - start_wait_s, start_wait_s))
        return effects

    def _maybe_ask(self, model: str, now_s: float) -> list[Effect]:
        """Requests wait with no free slot (the queue is released before this is asked)."""
        m = self._models[model]
        if m.queue and not m.ask_pending and now_s >= m.next_ask_s:
            m.ask_pending, m.next_ask_s = True, now_s + self.policy.ask_interval_s
            return [AskPlacer(model, len(m.queue))]
        return []

    def _refuse_head(self, model: str, reason: str, retry_after_s: float, now_s: float) -> Refuse:
        request_id = self._models[model].queue.popleft()
        del self._requests[request_id]
        self.load.change(model, -1, now_s)
        return Refuse(request_id, 503, reason, retry_after_s)

    def _remove(self, instance_id: str, gone_as_of_s: float, now_s: float) -> list[Effect]:
        """Forget an instance; observations up to `gone_as_of_s` can no longer bring it back."""
        if gone_as_of_s > -math.inf:
            self._gone[instance_id] = max(gone_as_of_s, self._gone.get(instance_id, -math.inf))
        instance = self._instances.pop(instance_id, None)
        if instance is None:
            return []
        self._models[instance.model].instances.discard(instance_id)
        running = sorted(instance.running)
        aborts: list[Effect] = [Abort(r, instance_id) for r in running if self._requests[r].answering]
        requeued = self._requeue(instance.model, [r for r in running if not self._requests[r].answering])
        self._unserved(instance.model, now_s)
        effects = aborts + requeued + self._instances_changed(instance.model, now_s)
        return effects + self._maybe_ask(instance.model, now_s)

    def _unserved(self, model: str, now_s: float) -> None:
        """No instance of the model is starting or ready any more: what the last ask got is gone, so
        the next waiting request asks at once (the ask interval spaces out asks for one need)."""
        m = self._models[model]
        if not any(self._instances[i].state in ("starting", "ready") for i in m.instances):
            m.next_ask_s = min(m.next_ask_s, now_s)

    def _requeue(self, model: str, request_ids: list[str]) -> list[Effect]:
        """Put dispatched requests back in the model's queue, in arrival order among the waiting."""
        if not request_ids:
            return []
        effects: list[Effect] = []
        for request_id in request_ids:
            request = self._requests[request_id]
            effects.append(Requeue(request_id, request.instance_id))
            request.instance_id = ""
        m = self._models[model]
        m.queue = deque(sorted([*m.queue, *request_ids], key=lambda r: (self._requests[r].arrived_s, r)))
        return effects

    def _instances_changed(self, model: str, now_s: float) -> list[Effect]:
        m = self._models[model]
        has_ready = any(self._instances[i].state == "ready" for i in m.instances)
        if not has_ready:
            m.ready_since_s = None
        elif m.ready_since_s is None:
            m.ready_since_s = now_s
        return self._release(model, now_s)
