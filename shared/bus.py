"""The NATS runtime: the only module that imports nats-py.

Typed publish / subscribe / request-reply over the codec, the JetStream stream that keeps every
lifecycle event, and a drain step for graceful shutdown. A malformed message is logged with its
subject and dropped (or, for a request, answered with an error header); it never kills a loop.
"""

from __future__ import annotations

import asyncio
import datetime
import ssl
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

import nats
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy, RetentionPolicy, StorageType, StreamConfig
from pydantic import BaseModel

from shared.codec import DecodeError, decode, encode
from shared.credentials import nats_options
from shared.logs import get_logger
from shared.schemas import Event
from shared.settings import Settings
from shared.subjects import Subjects

T = TypeVar("T", bound=BaseModel)
ERROR_HEADER = "Warmserve-Error"
EVENT_RETENTION_S = 7 * 24 * 3600
DRAIN_TIMEOUT_S = 2.0  # per subscription: a drain that the server never confirms must not block shutdown
NO_RESPONDERS_RETRIES = (0.02, 0.05, 0.1)  # the server can report "no responders" for a moment after another
#   connection subscribed, even once that subscription was flushed (nats-server issue #2876): ask again

log = get_logger("bus")


class BusError(RuntimeError):
    """A request got no answer, or the other side refused it (the reason is the message)."""


class Bus:
    def __init__(self, nc: nats.NATS, subjects: Subjects, request_timeout_s: float, name: str):
        self.nc = nc
        self.subjects = subjects
        self.request_timeout_s = request_timeout_s
        self.name = name
        self._subscriptions: list[Any] = []
        self._tasks: set[asyncio.Task] = set()

    @classmethod
    async def connect(cls, settings: Settings, name: str) -> "Bus":
        """Connect (waiting for the server as long as it takes) with this process's credentials.
        Refused credentials, or a server certificate the CA does not vouch for, end the wait with a
        BusError: they would be refused forever."""
        nc, connected = nats.NATS(), False

        async def on_error(exc: Exception) -> None:  # also how a permission violation is reported
            if not connected and "authorization violation" in str(exc).lower():
                raise BusError(f"{settings.nats_url} refused the credentials of {name}: {exc} "
                               f"(settings: identity and data_dir, or nats_user, or nats_creds)")
            if not connected and isinstance(exc, ssl.SSLCertVerificationError):
                raise BusError(f"{settings.nats_url} is not the server {name} expects: {exc} (setting: nats_tls_ca)")
            log.warning("nats_error", connection=name, error=str(exc))

        try:
            await nc.connect(settings.nats_url, name=name, max_reconnect_attempts=-1, reconnect_time_wait=0.5,
                             connect_timeout=5, allow_reconnect=True, error_cb=on_error, **nats_options(settings))
        except BusError:
            try:  # a failed TLS handshake can leave nothing to close but a socket that never says so
                await asyncio.wait_for(nc.close(), DRAIN_TIMEOUT_S)
            except (asyncio.TimeoutError, nats.errors.Error):
                pass
            raise
        connected = True
        return cls(nc, Subjects(settings.namespace), settings.request_timeout_s, name)

    # ------------------------------------------------------------ publish

    async def publish(self, subject: str, message: BaseModel) -> None:
        await self.nc.publish(subject, encode(message))

    async def publish_bytes(self, subject: str, payload: bytes) -> None:
        """Publish a message encoded earlier (the caller checked it could be encoded)."""
        await self.nc.publish(subject, payload)

    async def publish_event(self, domain: str, event: Event) -> None:
        """Publish a lifecycle event; the event stream (if set up) keeps it. Yields once, so the client's
        flusher sends it before the caller's next synchronous work (an `instance_ready` is what a held
        request waits on)."""
        await self.nc.publish(self.subjects.event(domain, event.name), encode(event))
        await asyncio.sleep(0)

    async def best_effort(self, publish: Awaitable[None], what: str) -> None:
        """Await a publish; a NATS outage must not abort the caller's work half-way (the client buffers
        while it reconnects; what it cannot take is logged and lost)."""
        try:
            await publish
        except Exception as exc:  # nats-py raises several unrelated error types here
            log.warning("publish_failed", what=what, reason=f"{type(exc).__name__}: {exc}")

    # ------------------------------------------------------------ subscribe

    async def subscribe(self, subject: str, kind: type[T],
                        handler: Callable[[T], Awaitable[BaseModel | None]],
                        queue: str = "", concurrent: bool = True, flush: bool = True) -> Any:
        """Decode each message as `kind` and call `handler`; a returned message is the reply.
        Returns a handle for `unsubscribe`.

        concurrent=True runs each message in its own task (a slow handler never blocks the
        subscription); False handles messages one at a time in arrival order. flush=False leaves
        the round trip that makes the server know the interest to the caller (one for several).
        """

        async def on_message(msg: Msg) -> None:
            if concurrent:
                task = asyncio.create_task(self._handle(msg, kind, handler))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            else:
                await self._handle(msg, kind, handler)

        sub = await self.nc.subscribe(subject, queue=queue, cb=on_message, pending_msgs_limit=65536)
        self._subscriptions.append(sub)
        if flush:
            await self.nc.flush()  # the server knows the interest before we return
        return sub

    async def unsubscribe(self, sub: Any) -> None:
        """Drop one subscription returned by `subscribe` (handlers already running finish)."""
        if sub in self._subscriptions:
            self._subscriptions.remove(sub)
            try:
                await sub.unsubscribe()
            except nats.errors.Error:
                pass

    async def _handle(self, msg: Msg, kind: type[T], handler: Callable[[T], Awaitable[BaseModel | None]]) -> None:
        try:
            message = decode(kind, msg.data)
        except DecodeError as exc:
            log.warning("message_rejected", subject=msg.subject, reason=str(exc))
            await self._reply_error(msg, f"rejected: {exc}")
            return
        try:
            answer = await handler(message)
        except Exception as exc:  # a handler bug must not kill the subscription
            log.exception("handler_failed", subject=msg.subject)
            await self._reply_error(msg, f"failed: {type(exc).__name__}: {exc}")
            return
        if msg.reply and answer is not None:
            await self.nc.publish(msg.reply, encode(answer))

    async def _reply_error(self, msg: Msg, reason: str) -> None:
        if msg.reply:
            await self.nc.publish(msg.reply, b"", headers={ERROR_HEADER: reason[:1000]})

    async def stream(self, subject: str, kind: type[T]) -> AsyncIterator[T]:
        """Iterate over decoded messages on `subject` (malformed ones are logged and skipped)."""
        sub = await self.nc.subscribe(subject, pending_msgs_limit=65536)
        try:
            async for msg in sub.messages:
                try:
                    yield decode(kind, msg.data)
                except DecodeError as exc:
                    log.warning("message_rejected", subject=msg.subject, reason=str(exc))
        finally:
            await sub.unsubscribe()

    # ------------------------------------------------------------ request / reply

    async def request(self, subject: str, message: BaseModel, reply_kind: type[T],
                      timeout_s: float | None = None) -> T:
        payload = encode(message)
        for pause_s in (*NO_RESPONDERS_RETRIES, None):
            try:
                msg = await self.nc.request(subject, payload, timeout=timeout_s or self.request_timeout_s)
                break
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
                if pause_s is None or isinstance(exc, nats.errors.TimeoutError):
                    raise BusError(f"no answer on {subject}: {type(exc).__name__}") from exc
                await asyncio.sleep(pause_s)
        if msg.headers and ERROR_HEADER in msg.headers:
            raise BusError(msg.headers[ERROR_HEADER])
        try:
            return decode(reply_kind, msg.data)
        except DecodeError as exc:
            raise BusError(f"bad answer on {subject}: {exc}") from exc

    # ------------------------------------------------------------ event stream

    async def ensure_event_stream(self) -> None:
        """Create (or update) the JetStream stream that keeps every `*.evt.>` event."""
        js = self.nc.jetstream()
        config = StreamConfig(
            name=self.subjects.stream_name(), subjects=[self.subjects.all_events()],
            retention=RetentionPolicy.LIMITS, storage=StorageType.FILE,
            max_age=EVENT_RETENTION_S, max_msgs=1_000_000,
        )
        try:
            await js.add_stream(config)
        except nats.js.errors.BadRequestError:
            await js.update_stream(config)

    async def replay_events(self, since_s: float | None = None) -> AsyncIterator[tuple[str, bytes]]:
        """Yield stored events (subject, payload) from the stream, oldest first, then stop (at once
        if nobody created the stream yet)."""
        js = self.nc.jetstream()
        try:
            info = await js.stream_info(self.subjects.stream_name())
        except nats.js.errors.NotFoundError:
            return
        last = info.state.last_seq
        if last == 0:
            return
        config = ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
        if since_s is not None:
            start = datetime.datetime.fromtimestamp(since_s, datetime.timezone.utc).isoformat()
            config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_TIME, opt_start_time=start)
        sub = await js.subscribe(self.subjects.all_events(), ordered_consumer=True, config=config)
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=1.0)
                except nats.errors.TimeoutError:
                    return
                yield msg.subject, msg.data
                if msg.metadata.sequence.stream >= last:
                    return
        finally:
            await sub.unsubscribe()

    async def raw_events(self, subject: str) -> AsyncIterator[tuple[str, bytes]]:
        sub = await self.nc.subscribe(subject, pending_msgs_limit=65536)
        try:
            async for msg in sub.messages:
                yield msg.subject, msg.data
        finally:
            await sub.unsubscribe()

    # ------------------------------------------------------------ shutdown

    async def drain_subscriptions(self) -> None:
        """Stop taking new messages, then wait for the handlers already running."""
        for sub in self._subscriptions:
            try:
                await asyncio.wait_for(sub.drain(), DRAIN_TIMEOUT_S)
            except (nats.errors.Error, asyncio.TimeoutError):
                pass
        self._subscriptions.clear()
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    @property
    def connected(self) -> bool:
        """Connected to the server now (False while reconnecting)."""
        return self.nc.is_connected

    @property
    def reconnects(self) -> int:
        """How often this connection was re-established (messages in flight then may be lost)."""
        return self.nc.stats["reconnects"]

    async def close(self) -> None:
        """Flush and close; with the server gone, close anyway (what was not sent is lost)."""
        if not self.nc.is_closed:
            try:
                await self.nc.flush(timeout=2)
            except (nats.errors.Error, asyncio.TimeoutError):
                pass
            try:
                await asyncio.wait_for(self.nc.close(), 5)
            except (nats.errors.Error, OSError, asyncio.TimeoutError):
                pass
