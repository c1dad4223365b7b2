"""Service runner: connect, serve /livez, /readyz and /metrics, run until a signal, then shut down in order.

Shutdown is a sequence: stop being ready, drain subscriptions, let the service finish its
in-flight work (bounded by `drain_timeout_s`), close NATS and Redis. Signal handlers only set an
event. A service implements `start`, optionally `run` (its loops) and `stop`.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Awaitable, Callable

from prometheus_client import CONTENT_TYPE_LATEST

from shared.bus import Bus
from shared.logs import configure_logging, get_logger
from shared.settings import Settings
from shared.state import State


class Service:
    """Base class: subclasses set `name` and override the hooks they need."""

    name = "service"
    metrics = None  # set by a service with metrics: an object whose render() gives Prometheus text (/metrics)

    def __init__(self, settings: Settings):
        self.settings = settings
        self.log = get_logger(self.name)
        self.bus: Bus | None = None
        self.state: State | None = None

    async def start(self) -> None:
        """Subscribe and load state; `self.bus` and `self.state` are connected."""

    async def run(self, stopping: asyncio.Event) -> None:
        """Background loops; return when `stopping` is set."""
        await stopping.wait()

    async def stop(self) -> None:
        """Finish in-flight work; subscriptions are already drained."""

    def is_ready(self) -> bool:
        return True


async def pause(stopping: asyncio.Event, seconds: float) -> None:
    """Sleep `seconds`, returning early when the service is stopping."""
    try:
        await asyncio.wait_for(stopping.wait(), seconds)
    except asyncio.TimeoutError:
        pass


async def every(seconds: float, stopping: asyncio.Event, step: Callable[[], Awaitable[None]], log,
                failure_event: str) -> None:
    """Run `step` every `seconds` until stopping; a failing step is logged, never fatal."""
    while not stopping.is_set():
        try:
            await step()
        except Exception:
            log.exception(failure_event)
        await pause(stopping, seconds)


class HealthServer:
    """Minimal HTTP server for /livez, /readyz and /metrics (no framework needed for three GET routes).
    With `api_keys`, /metrics requires one of them as a bearer token."""

    def __init__(self, host: str, port: int, ready: Callable[[], bool],
                 metrics: Callable[[], bytes] | None = None, api_keys: frozenset[str] = frozenset()):
        self.host, self.port, self.ready = host, port, ready
        self.metrics, self.api_keys = metrics, api_keys
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    def answer(self, path: str, authorization: str) -> tuple[str, str, bytes]:
        """(status, content type, body) for a GET of `path`."""
        text = "text/plain"
        if path == "/livez":
            return "200 OK", text, b"ok"
        if path == "/readyz":
            return ("200 OK", text, b"ready") if self.ready() else ("503 Service Unavailable", text, b"not ready")
        if path == "/metrics" and self.metrics is not None:
            scheme, _, key = authorization.partition(" ")
            if self.api_keys and (scheme.lower() != "bearer" or key.strip() not in self.api_keys):
                return "401 Unauthorized", text, b"missing or invalid API key (Authorization: Bearer ...)"
            return "200 OK", CONTENT_TYPE_LATEST, self.metrics()
        return "404 Not Found", text, b"not found"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            authorization = ""
            while (header := await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                name, _, value = header.decode("latin-1").partition(":")
                if name.strip().lower() == "authorization":
                    authorization = value.strip()
            path = line.split(b" ")[1].decode() if line.count(b" ") >= 2 else ""
            status, kind, body = self.answer(path.split("?", 1)[0], authorization)
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
                         f"Connection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (asyncio.TimeoutError, ConnectionError, IndexError, UnicodeDecodeError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self._server:
            self._server.close()
            await self._server.wait_closed()


class Running:
    """A started service: used by `serve` and by in-process tests."""

    def __init__(self, service: Service, health: HealthServer | None):
        self.service, self.health = service, health
        self.stopping = asyncio.Event()
        self.accepting = False
        self._run_task: asyncio.Task | None = None

    def ready(self) -> bool:
        return self.accepting and self.service.is_ready()

    @classmethod
    async def start(cls, service: Service, with_health: bool = True) -> "Running":
        s = service.settings
        service.bus = await Bus.connect(s, service.name)
        service.state = await State.connect(s)
        metrics = service.metrics.render if service.metrics is not None else None
        keys = s.accepted_api_keys if s.metrics_auth else frozenset()
        running = cls(service, HealthServer(s.health_host, s.health_port, lambda: running.ready(), metrics, keys)
                      if with_health else None)
        if running.health:
            port = await running.health.start()
            service.log.info("health_listening", host=s.health_host, port=port)
        await service.start()
        running._run_task = asyncio.create_task(service.run(running.stopping))
        running.accepting = True
        service.log.info("service_ready")
        return running

    async def wait(self) -> None:
        """Until stop is requested or the service's loops end (an error there is fatal)."""
        stop_wait = asyncio.create_task(self.stopping.wait())
        done, _ = await asyncio.wait({stop_wait, self._run_task}, return_when=asyncio.FIRST_COMPLETED)
        stop_wait.cancel()
        if self._run_task in done and self._run_task.exception():
            raise self._run_task.exception()

    async def shutdown(self) -> None:
        svc = self.service
        svc.log.info("service_stopping")
        self.accepting = False
        self.stopping.set()
        await svc.bus.drain_subscriptions()
        try:
            await asyncio.wait_for(svc.stop(), svc.settings.drain_timeout_s)
        except asyncio.TimeoutError:
            svc.log.warning("drain_timeout", timeout_s=svc.settings.drain_timeout_s)
        if self._run_task:
            try:
                await asyncio.wait_for(self._run_task, 5)
            except (asyncio.TimeoutError, asyncio.CancelledError, Exception):
                self._run_task.cancel()
        if self.health:
            await self.health.close()
        await svc.bus.close()
        await svc.state.close()
        svc.log.info("service_stopped")


async def serve(service: Service) -> None:
    """Run a service until SIGTERM/SIGINT, then shut it down in order."""
    running = await Running.start(service)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, running.stopping.set)
    try:
        await running.wait()
    finally:
        await running.shutdown()


def main(factory: Callable[[Settings], Service], settings: Settings) -> None:
    configure_logging(settings.log_level, settings.log_json)
    asyncio.run(serve(factory(settings)))
