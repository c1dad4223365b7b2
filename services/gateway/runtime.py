"""The gateway's cluster side: feeds the scheduler core with what agents and the placer say, applies
its effects (send to an instance, refuse, abort, ask the placer), demultiplexes the engines' token
streams into per-request mailboxes and publishes load samples.

Shell only: every routing and holding decision is made by `core.scheduler.Scheduler`.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid

import pydantic

from services.gateway.core.errors import ApiError
from services.gateway.core.protocol import CompletionRequest
from services.gateway.core.scheduler import (Abort, AskPlacer, Dispatch, Effect, InstanceSeen, Policy, Refuse, Requeue,
                                             Scheduler)
from services.gateway.metrics import GatewayMetrics
from shared.bus import Bus
from shared.codec import EncodeError, encode
from shared.logs import get_logger
from shared.runner import pause
from shared.schemas import (CancelInference, Event, InferChunk, InferRequest, InstanceAnswer, InstanceNeed,
                            ModelInfo, NodeView)
from shared.settings import Settings
from shared.state import State

log = get_logger("gateway")
INSTANCE_EVENTS = {"instance_starting": "starting", "instance_ready": "ready", "instance_draining": "draining",
                   "instance_stopped": "stopped", "instance_failed": "stopped"}
CLIENT_LEFT = object()  # mailbox marker: the HTTP client disconnected
RECONNECTED = object()  # mailbox marker: NATS reconnected, chunks in flight then may be lost
RECONNECT_GRACE_S = 5.0  # after a reconnect, an answer whose engine sends nothing this long has lost its stream
INSTANCE_GONE_CODE = 503  # an engine's refusal that means "not serving this instance": send the request elsewhere
SHUTTING_DOWN = "the gateway is shutting down: retry"
PUBLISH_RETRY_S = (0.05, 0.1, 0.2, 0.5, 1.0)  # pauses between tries of a publish the bus refused (then 1 s each)


class Refused(Exception):
    """The scheduler refused the request: its model's queue is full or its deadline passed."""

    def __init__(self, refuse: Refuse):
        super().__init__(refuse.reason)
        self.status, self.reason, self.retry_after_s = refuse.status, refuse.reason, refuse.retry_after_s


class ClientGone(Exception):
    """The HTTP client disconnected before its answer was complete."""


class Generation:
    """One request's mailbox: its dispatch notice, the engine's chunks or a refusal arrive in order."""

    def __init__(self, request: InferRequest, payload: bytes, arrived_s: float, idle_timeout_s: float):
        self.request = request
        self.payload = payload  # the request, encoded once at admission (so it is known to be sendable)
        self.arrived_s = arrived_s
        self.idle_timeout_s = idle_timeout_s
        self.wait_s = idle_timeout_s  # the current wait for the next chunk (shorter right after a reconnect)
        self.mailbox: asyncio.Queue[Dispatch | Refuse | Requeue | InferChunk | object] = asyncio.Queue()
        self.dispatch: Dispatch | None = None
        self.routed_to = ""  # the instance whose chunks are accepted (set when dispatched, cleared when requeued)
        self.attempt = -1  # how often it was sent before the current send (chunks of other attempts are dropped)
        self.acked = False  # the current send was acknowledged by its instance
        self.answering = False  # its instance has sent output
        self.finished = False  # the engine sent its last chunk

    async def next_chunk(self) -> InferChunk:
        """The next chunk from the engine; raises Refused or ClientGone; a silent engine yields an error chunk."""
        while True:
            if self.dispatch is None:
                item = await self.mailbox.get()  # the scheduler's deadline bounds this wait
            else:
                try:
                    async with asyncio.timeout(self.wait_s):
                        item = await self.mailbox.get()
                except TimeoutError:
                    item = self.error(504, f"instance {self.dispatch.instance_id} sent nothing for {self.wait_s:g} s"
                                           + (" after a NATS reconnect" if self.wait_s < self.idle_timeout_s else ""))
            if item is RECONNECTED:
                self.wait_s = min(self.wait_s, RECONNECT_GRACE_S)
            elif isinstance(item, Dispatch):
                self.dispatch = item
            elif isinstance(item, Requeue):
                self.dispatch = None  # waiting again: the scheduler's deadline bounds the wait
            elif isinstance(item, Refuse):
                raise Refused(item)
            elif item is CLIENT_LEFT:
                raise ClientGone()
            else:
                return self._accept(item)

    async def first_token(self) -> InferChunk:
        """The first chunk with output (or the last chunk): empty progress chunks do not count as TTFT."""
        chunk = await self.next_chunk()
        while not chunk.text and not chunk.data and not self.finished:
            chunk = await self.next_chunk()
        return chunk

    def client_left(self) -> None:
        self.mailbox.put_nowait(CLIENT_LEFT)

    def take_ready(self) -> list[InferChunk]:
        """The chunks already received (up to the last one), to be answered in one write."""
        ready = []
        while not self.finished and not self.mailbox.empty():
            item = self.mailbox.get_nowait()
            if item is CLIENT_LEFT:
                raise ClientGone()
            if isinstance(item, InferChunk):  # (once answering, no dispatch notice can follow)
                ready.append(self._accept(item))
        return ready

    def _accept(self, chunk: InferChunk) -> InferChunk:
        self.finished = chunk.finish_reason is not None or chunk.error is not None
        self.wait_s = self.idle_timeout_s  # its engine is heard: the stream is alive
        return chunk

    def error(self, code: int, reason: str) -> InferChunk:
        return InferChunk(request_id=self.request.request_id, seq=0, error=reason, error_code=code)


class GatewayRuntime:
    """`bus` is the service's control connection (drained first at shutdown); requests and their
    replies use a data connection of their own, so answers in flight survive that drain."""

    def __init__(self, settings: Settings, bus: Bus, state: State, metrics: GatewayMetrics):
        self.settings, self.bus, self.state, self.metrics = settings, bus, state, metrics
        self.subjects = bus.subjects
        self.gateway_id = "gw" + uuid.uuid4().hex[:8]
        self.loop = asyncio.get_running_loop()
        self.now = self.loop.time  # the gateway's clock (monotonic seconds)
        self.scheduler = Scheduler(Policy(settings.max_inflight_per_instance, settings.queue_limit,
                                          settings.queue_deadline_s), self.now(), self.gateway_id)
        self._open: dict[str, Generation] = {}
        self._models: dict[str, ModelInfo] = {}
        self._ids = itertools.count()
        self._outbox: asyncio.Queue[tuple[str, bytes, str]] = asyncio.Queue()  # subject, payload, request id
        self._tasks: set[asyncio.Task] = set()
        self._deadline: asyncio.TimerHandle | None = None
        self.data: Bus | None = None
        self.closing = False  # shutting down: no new request is admitted
        self._reconnects = 0  # the data connection's reconnects handled so far

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self.data = await Bus.connect(self.settings, "gateway-data")
        await self.data.subscribe(self.subjects.infer_replies(self.gateway_id), InferChunk, self._on_reply,
                                  concurrent=False)
        self._spawn(self._send_outbox())
        await self.bus.subscribe(self.subjects.agent_heartbeat(), NodeView, self._on_node_view, concurrent=False)
        for name in INSTANCE_EVENTS:
            await self.bus.subscribe(self.subjects.event("agent", name), Event, self._on_instance_event,
                                     concurrent=False)
        await self.refresh()

    async def run(self, stopping: asyncio.Event) -> None:
        """Every sample interval: publish load samples, re-read the cluster from Redis, retry asks."""
        interval_s = self.settings.sample_interval_s
        while not stopping.is_set():
            await pause(stopping, interval_s)
            for sample in self.scheduler.sample(self.now(), time.time()):
                self.metrics.outstanding.labels(sample.model).set(self.scheduler.outstanding(sample.model))
                self.metrics.queued.labels(sample.model).set(self.scheduler.queued(sample.model))
                try:
                    await self.bus.publish(self.subjects.load_samples(), sample)
                except Exception as exc:  # noqa: BLE001 - NATS away: this interval's sample is lost, not the loop
                    log.warning("load_sample_lost", model=sample.model, reason=f"{type(exc).__name__}: {exc}")
            try:
                await self.refresh()
            except Exception as exc:  # noqa: BLE001 - Redis away: keep routing on what we know
                log.warning("cluster_refresh_failed", reason=f"{type(exc).__name__}: {exc}")
            if self.data.reconnects != self._reconnects:
                self._reconnects = self.data.reconnects
                self._after_reconnect()
            self._apply(self.scheduler.tick(self.now()))

    def _after_reconnect(self) -> None:
        """NATS came back: what was sent or answered meanwhile may be lost. A request without output
        is sent again at once; an answer under way gets RECONNECT_GRACE_S to be heard again."""
        for generation in list(self._open.values()):
            if not generation.routed_to or generation.finished:
                continue
            if generation.answering:
                generation.mailbox.put_nowait(RECONNECTED)
            else:
                self._resend(generation, "nats_reconnected")

    def close_admission(self) -> None:
        """Shutting down: refuse new requests (503, retry); held ones are still sent as slots free up."""
        self.closing = True

    def end_open(self) -> None:
        """The drain is running out: answer every request still held (503, retry) and end every one
        still being answered with a 503 (an error event in a stream) rather than a cut connection."""
        self._apply(self.scheduler.refuse_waiting(SHUTTING_DOWN, self.now()))
        for generation in list(self._open.values()):
            if generation.routed_to and not generation.finished:
                generation.mailbox.put_nowait(generation.error(503, SHUTTING_DOWN))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._deadline:
            self._deadline.cancel()
        if self.data is not None:
            await self.data.drain_subscriptions()
            await self.data.close()

    async def refresh(self) -> None:
        """Heartbeats in Redis are the truth: re-read them (and the registry)."""
        views = await self.state.node_views(alive_only=True)
        now = self.now()
        for view in views.values():
            self._apply(self.scheduler.observe_node(view.node, _instances_of(view), view.at_s, now))
        stale_before_s = time.time() - self.settings.heartbeat_ttl_s
        self._apply(self.scheduler.forget_dead_nodes(set(views), stale_before_s, now))
        self._models = await self.state.models()

    # ------------------------------------------------------------ requests

    async def model_info(self, name: str) -> ModelInfo | None:
        info = self._models.get(name)
        if info is None:
            info = await self.state.model(name)  # registered since the last refresh?
            if info is not None:
                self._models[name] = info
        return info

    def submit(self, request: CompletionRequest, arrived_s: float, path: str) -> Generation:
        """Admit a request for the OpenAI route `path`; its mailbox receives the dispatch, then the
        engine's chunks (or a refusal)."""
        if self.closing:
            raise ApiError(503, SHUTTING_DOWN, kind="server_error", code="shutting_down", retry_after_s=1)
        request_id = f"{'chatcmpl' if request.chat else 'cmpl'}-{self.gateway_id}-{next(self._ids):08d}"
        try:
            infer = InferRequest(request_id=request_id, model=request.model,
                                 reply_to=self.subjects.infer_reply(self.gateway_id, request_id),
                                 prompt=request.prompt, messages=request.messages, sampling=request.sampling,
                                 path=path, body=request.body)
            payload = encode(infer)
        except (pydantic.ValidationError, EncodeError) as exc:  # the parser should have caught it: still a 400
            raise ApiError(400, f"request cannot be sent to an engine: {exc}", code="invalid_value") from exc
        generation = Generation(infer, payload, arrived_s, self.settings.infer_idle_timeout_s)
        self._open[request_id] = generation
        self._apply(self.scheduler.admit(request_id, request.model, self.now()))
        return generation

    def finish(self, generation: Generation) -> None:
        """The request is over: cancel its engine work if unfinished and free its slot."""
        request_id = generation.request.request_id
        if self._open.pop(request_id, None) is None:
            return
        if generation.routed_to and not generation.finished:
            self._outbox.put_nowait((self.subjects.infer_cancel(generation.routed_to),
                                     encode(CancelInference(request_id=request_id)), request_id))
        self._apply(self.scheduler.finish(request_id, self.now()))

    # ------------------------------------------------------------ effects

    def _apply(self, effects: list[Effect]) -> None:
        for effect in effects:
            if isinstance(effect, Dispatch):
                generation = self._open[effect.request_id]
                generation.routed_to, generation.acked = effect.instance_id, False
                generation.attempt += 1
                payload = generation.payload if generation.attempt == 0 else encode(
                    generation.request.model_copy(update={"attempt": generation.attempt}))
                self._outbox.put_nowait((self.subjects.infer(effect.instance_id), payload, effect.request_id))
                generation.mailbox.put_nowait(effect)
                self.loop.call_later(self.settings.dispatch_ack_timeout_s, self._check_ack, generation,
                                     generation.attempt)
            elif isinstance(effect, Requeue):
                generation = self._open.get(effect.request_id)
                if generation is not None:
                    log.info("request_requeued", request_id=effect.request_id, instance_id=effect.instance_id)
                    self.metrics.requeued.labels(generation.request.model).inc()
                    generation.routed_to = ""
                    generation.mailbox.put_nowait(effect)
            elif isinstance(effect, Refuse):
                generation = self._open.get(effect.request_id)
                if generation is not None:
                    generation.mailbox.put_nowait(effect)
            elif isinstance(effect, Abort):
                generation = self._open.get(effect.request_id)
                if generation is not None:
                    generation.mailbox.put_nowait(generation.error(503, f"instance {effect.instance_id} is gone"))
            elif isinstance(effect, AskPlacer):
                self._spawn(self._ask_placer(effect))
        self._arm_deadline()

    def _check_ack(self, generation: Generation, attempt: int) -> None:
        """A send its instance has not acknowledged in time was lost (a NATS outage): send it again."""
        if (self._open.get(generation.request.request_id) is not generation or generation.attempt != attempt
                or generation.acked or not generation.routed_to):
            return
        self._resend(generation, "dispatch_unacknowledged")

    def _resend(self, generation: Generation, why: str) -> None:
        """Cancel the current send of a request without output and send it again (there or elsewhere)."""
        request_id, instance_id, attempt = generation.request.request_id, generation.routed_to, generation.attempt
        log.warning(why, request_id=request_id, instance_id=instance_id, attempt=attempt)
        self._outbox.put_nowait((self.subjects.infer_cancel(instance_id),
                                 encode(CancelInference(request_id=request_id, attempt=attempt)), request_id))
        self._apply(self.scheduler.unacknowledged(request_id, instance_id, self.now()))

    def _arm_deadline(self) -> None:
        deadline_s = self.scheduler.next_deadline_s()
        if self._deadline is not None and (deadline_s is None or self._deadline.when() != deadline_s):
            self._deadline.cancel()
            self._deadline = None
        if deadline_s is not None and self._deadline is None:
            self._deadline = self.loop.call_at(deadline_s, self._on_deadline)

    def _on_deadline(self) -> None:
        self._deadline = None
        self._apply(self.scheduler.tick(self.now()))

    async def _ask_placer(self, ask: AskPlacer) -> None:
        self.metrics.placer_asks.labels(ask.model).inc()
        log.info("instance_requested", model=ask.model, waiting=ask.waiting)
        try:  # whatever goes wrong, the scheduler hears an answer (else it never asks again)
            await self.bus.publish_event("gateway", Event(name="instance_requested", at_s=time.time(),
                                                          model=ask.model, detail={"waiting": ask.waiting}))
            answer = await self.bus.request(self.subjects.instance_need(),
                                            InstanceNeed(model=ask.model, waiting=ask.waiting), InstanceAnswer)
        except Exception as exc:  # noqa: BLE001 - BusError, or NATS reconnecting
            answer = InstanceAnswer(status="error", reason=f"{type(exc).__name__}: {exc}")
        if answer.status == "error":
            log.warning("instance_request_failed", model=ask.model, reason=answer.reason)
        ready = [InstanceSeen(r.instance_id, r.model, r.node, "ready", time.time())
                 for r in answer.instances] if answer.status == "ready" else []
        self._apply(self.scheduler.placer_answered(ask.model, answer.status != "error", ready, self.now()))

    # ------------------------------------------------------------ NATS inputs

    async def _on_node_view(self, view: NodeView) -> None:
        self._apply(self.scheduler.observe_node(view.node, _instances_of(view), view.at_s, self.now()))

    async def _on_instance_event(self, event: Event) -> None:
        if not event.instance_id or not event.model:
            log.warning("instance_event_incomplete", name=event.name, node=event.node)
            return
        seen = InstanceSeen(event.instance_id, event.model, event.node, INSTANCE_EVENTS[event.name], event.at_s)
        self._apply(self.scheduler.observe(seen, self.now()))

    async def _on_reply(self, chunk: InferChunk) -> None:
        generation = self._open.get(chunk.request_id)
        if (generation is None or not generation.routed_to or chunk.instance_id not in ("", generation.routed_to)
                or chunk.attempt != generation.attempt):
            return  # the request is over or waits again, or the chunk answers an earlier send
        generation.acked = True
        if not generation.answering and chunk.error is not None and chunk.error_code == INSTANCE_GONE_CODE:
            self._apply(self.scheduler.instance_refused(chunk.request_id, generation.routed_to, self.now()))
            return  # "not serving this instance" before any output: it goes elsewhere
        if not generation.answering and (chunk.text or chunk.data or chunk.finish_reason or chunk.error is not None):
            generation.answering = True
            self.scheduler.answering(chunk.request_id)
        generation.mailbox.put_nowait(chunk)

    async def _send_outbox(self) -> None:
        """Publish requests and cancellations in exactly the order the scheduler released them; a
        publish the bus refuses (disconnected, buffer full) is retried while its request is open."""
        while True:
            subject, payload, request_id = await self._outbox.get()
            for attempt in itertools.count():
                try:
                    await self.data.publish_bytes(subject, payload)
                    break
                except Exception as exc:  # noqa: BLE001 - nothing may end this task
                    if request_id not in self._open:
                        break
                    log.warning("publish_failed", subject=subject, request_id=request_id, attempt=attempt,
                                reason=f"{type(exc).__name__}: {exc}")
                    await asyncio.sleep(PUBLISH_RETRY_S[min(attempt, len(PUBLISH_RETRY_S) - 1)])

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _instances_of(view: NodeView) -> list[InstanceSeen]:
    return [InstanceSeen(i.instance_id, i.model, view.node, i.state.value, view.at_s) for i in view.instances]
