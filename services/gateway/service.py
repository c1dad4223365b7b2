"""The gateway service: the runtime plus a uvicorn server running inside the service's own loop.

Shutdown follows the runner: stop being ready, stop accepting connections, let in-flight answers
finish (bounded by drain_timeout_s), then stop the runtime. No policy here.
"""

from __future__ import annotations

import asyncio
import contextlib

import uvicorn

from services.gateway.app import create_app
from services.gateway.metrics import GatewayMetrics
from services.gateway.runtime import GatewayRuntime
from shared.listen import BACKLOG, inherited_socket, listening_socket
from shared.runner import Service


ABORT_BEFORE_DRAIN_END_S = 1.0  # requests still open this long before the drain ends get a clean error


class EmbeddedServer(uvicorn.Server):
    """uvicorn inside a service: the runner owns the signal handlers."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class GatewayService(Service):
    name = "gateway"

    def __init__(self, settings):
        super().__init__(settings)
        self.metrics = GatewayMetrics()
        self.runtime: GatewayRuntime | None = None
        self.port: int | None = None
        self._server: EmbeddedServer | None = None
        self._serving: asyncio.Task | None = None

    async def start(self) -> None:
        s = self.settings
        self.runtime = GatewayRuntime(s, self.bus, self.state, self.metrics)
        await self.runtime.start()
        app = create_app(s, self.runtime, self.metrics, self.is_ready)
        if s.gateway_socket_fd >= 0:
            sock = inherited_socket(s.gateway_socket_fd)
        else:
            sock = listening_socket(s.gateway_host, s.gateway_port)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off",
                                timeout_graceful_shutdown=s.drain_timeout_s, backlog=BACKLOG)
        self._server = EmbeddedServer(config)
        self._serving = asyncio.create_task(self._server.serve(sockets=[sock]))
        self.log.info("gateway_listening", host=s.gateway_host, port=self.port, gateway_id=self.runtime.gateway_id)

    async def run(self, stopping: asyncio.Event) -> None:
        await self.runtime.run(stopping)

    def is_ready(self) -> bool:
        return self._server is not None and not self._server.should_exit and not self._serving.done()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True  # no new connections; answers in flight finish
            self.runtime.close_admission()
            grace_s = max(self.settings.drain_timeout_s - ABORT_BEFORE_DRAIN_END_S, 0.0)
            if not (await asyncio.wait({self._serving}, timeout=grace_s))[0]:
                self.runtime.end_open()  # before uvicorn cancels them into plain-text 500s
            await self._serving
        if self.runtime is not None:
            await self.runtime.close()
