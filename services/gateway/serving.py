"""One OpenAI request from HTTP body to answer: validate, admit, wait for the first token while
watching the client, then answer as JSON or as an SSE stream; one access log line per request.
Engines that speak OpenAI (vLLM's own server) answer in bytes relayed as written; text engines
(fake, simulated) get their answers rendered here.

The response (its headers included) starts only once the first token is there, so even streaming
answers carry `x-warmserve-ttft-ms` and its parts, and an engine refusal (a prompt longer than the
context) is a real HTTP 400. Holding, routing and timing decisions live in the scheduler core.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from services.gateway.core.errors import ApiError
from services.gateway.core.protocol import (DONE_EVENT, ROUTES, STREAMING_MODEL_ROUTES, CompletionRequest, chunk_body,
                                            completion_body, fit_to_context, parse_model_request, parse_request,
                                            sse_event, usage, usage_chunk_body)
from services.gateway.metrics import UNKNOWN_MODEL, GatewayMetrics
from services.gateway.runtime import ClientGone, GatewayRuntime, Generation, Refused
from shared.logs import get_logger
from shared.state import StateError
from shared.schemas import InferChunk

log = get_logger("gateway")
CLIENT_CLOSED = 499  # nginx's code for "the client closed the connection" (access log and metrics only)


@dataclass
class AccessRecord:
    """What the access log line and the metrics say about one request."""

    endpoint: str
    model: str = UNKNOWN_MODEL
    request_id: str = ""
    status: int = 200
    stream: bool = False
    instance: str = ""
    ttft_ms: float = 0.0
    queue_ms: float = 0.0
    start_ms: float = 0.0
    engine_ttft_ms: float = 0.0
    total_ms: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = ""
    error: str = ""

    def timing_headers(self) -> dict[str, str]:
        return {"x-request-id": self.request_id, "x-warmserve-ttft-ms": f"{self.ttft_ms:.2f}",
                "x-warmserve-queue-ms": f"{self.queue_ms:.2f}",
                "x-warmserve-instance-start-ms": f"{self.start_ms:.2f}",
                "x-warmserve-engine-ttft-ms": f"{self.engine_ttft_ms:.2f}"}


class Completion:
    def __init__(self, runtime: GatewayRuntime, metrics: GatewayMetrics, max_body_bytes: int):
        self.runtime, self.metrics, self.max_body_bytes = runtime, metrics, max_body_bytes

    async def __call__(self, http: Request, endpoint: str) -> Response:
        """`endpoint`: a key of ROUTES (chat, completions, responses, tokenize, detokenize)."""
        arrived_s = self.runtime.now()
        record = AccessRecord(endpoint=endpoint)
        generation: Generation | None = None
        streaming: GenerationResponse | None = None
        watcher: asyncio.Task | None = None
        try:
            body = await read_body(http, self.max_body_bytes)
            request = (parse_request(body, endpoint == "chat") if endpoint in ("chat", "completions")
                       else parse_model_request(body, endpoint in STREAMING_MODEL_ROUTES))
            info = await self.runtime.model_info(request.model)
            if info is None:
                raise ApiError(404, f"model {request.model!r} does not exist", param="model", code="model_not_found")
            record.model, record.stream = request.model, request.stream
            request = fit_to_context(request, info.max_model_len)
            generation = self.runtime.submit(request, arrived_s, ROUTES[endpoint])
            record.request_id = generation.request.request_id
            watcher = watch_client(http, generation)
            first = await generation.first_token()
            self._first_token(record, generation, first)
            if request.stream:  # from here on the streaming response owns the generation
                watcher.cancel()  # and watches the client itself
                events = (self._relay if first.data else self._sse)(request, generation, first, record)
                streaming = GenerationResponse(events,
                                               lambda: self._finish(generation, record, arrived_s),
                                               headers=record.timing_headers(), media_type="text/event-stream")
                return streaming
            parts, last = await collect(generation, first)
            self._last_chunk(record, last)
            if first.data:
                return Response(b"".join(parts), media_type="application/json", headers=record.timing_headers())
            body = completion_body(request, record.request_id, int(time.time()), "".join(parts), last.finish_reason,
                                   usage(last.prompt_tokens, last.completion_tokens))
            return JSONResponse(body, headers=record.timing_headers())
        except Refused as exc:
            return self._error(record, ApiError(exc.status, exc.reason, kind="server_busy", code="model_busy",
                                                retry_after_s=exc.retry_after_s))
        except ApiError as exc:
            return self._error(record, exc)
        except ClientGone:
            record.status = CLIENT_CLOSED
            return Response(status_code=CLIENT_CLOSED)
        except StateError as exc:
            return self._error(record, ApiError(503, f"cluster state unavailable: {exc}", kind="server_error",
                                                code="state_unavailable", retry_after_s=1))
        except Exception:
            log.exception("request_failed", request_id=record.request_id, model=record.model)
            return self._error(record, ApiError(500, "internal error", kind="server_error"))
        finally:
            if watcher is not None:
                watcher.cancel()
            if streaming is None:
                self._finish(generation, record, arrived_s)

    def _first_token(self, record: AccessRecord, generation: Generation, first: InferChunk) -> None:
        dispatch = generation.dispatch
        record.instance = dispatch.instance_id if dispatch else ""
        if first.error is not None:
            raise engine_error(first)
        ttft_s = self.runtime.now() - generation.arrived_s
        record.ttft_ms, record.queue_ms = ttft_s * 1000, dispatch.queue_wait_s * 1000
        record.start_ms, record.engine_ttft_ms = dispatch.start_wait_s * 1000, first.engine_ttft_ms
        self.metrics.observe_first_token(record.model, ttft_s, dispatch.queue_wait_s, dispatch.start_wait_s,
                                         first.engine_ttft_ms / 1000)
        self._last_chunk(record, first)

    @staticmethod
    def _last_chunk(record: AccessRecord, chunk: InferChunk) -> None:
        record.prompt_tokens, record.completion_tokens = chunk.prompt_tokens, chunk.completion_tokens
        record.finish_reason = chunk.finish_reason or ""

    async def _sse(self, request: CompletionRequest, generation: Generation, first: InferChunk,
                   record: AccessRecord) -> AsyncIterator[tuple[bytes, bool]]:
        """SSE events as (bytes, is_last); chunks that arrived together leave in one write."""
        created_s, is_first, chunks = int(time.time()), True, [first, *generation.take_ready()]
        while True:
            events = []
            for chunk in chunks:
                if chunk.error is not None:  # mid-stream failure: an OpenAI error event, then the end
                    record.status, record.error = chunk.error_code or 502, chunk.error
                    events.append(sse_event(engine_error(chunk).body()))
                elif chunk.text or chunk.finish_reason or is_first:
                    events.append(sse_event(chunk_body(request, record.request_id, created_s, chunk.text,
                                                       chunk.finish_reason, is_first)))
                    is_first = False
                    self._last_chunk(record, chunk)
                if generation.finished and chunk is chunks[-1]:
                    if request.include_usage and chunk.error is None:
                        events.append(sse_event(usage_chunk_body(request, record.request_id, created_s,
                                                                 usage(chunk.prompt_tokens, chunk.completion_tokens))))
                    yield b"".join(events) + DONE_EVENT, True
                    return
            yield b"".join(events), False
            chunks = [await generation.next_chunk(), *generation.take_ready()]

    async def _relay(self, request: CompletionRequest, generation: Generation, first: InferChunk,
                     record: AccessRecord) -> AsyncIterator[tuple[bytes, bool]]:
        """An OpenAI engine's SSE bytes as (bytes, is_last), its own [DONE] included; a failure
        the gateway sees (instance gone, silence) becomes an error event and the end."""
        chunks = [first, *generation.take_ready()]
        while True:
            data = []
            for chunk in chunks:
                if chunk.error is not None:
                    record.status, record.error = chunk.error_code or 502, chunk.error
                    data.append(chunk.data or sse_event(engine_error(chunk).body()) + DONE_EVENT)
                else:
                    data.append(chunk.data)
                    self._last_chunk(record, chunk)
            if generation.finished:
                yield b"".join(data), True
                return
            yield b"".join(data), False
            chunks = [await generation.next_chunk(), *generation.take_ready()]

    def _error(self, record: AccessRecord, error: ApiError) -> Response:
        record.status, record.error = error.status, error.message
        headers = {"retry-after": str(math.ceil(error.retry_after_s))} if error.retry_after_s is not None else None
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    def _finish(self, generation: Generation | None, record: AccessRecord, arrived_s: float) -> None:
        if generation is not None:
            if not generation.finished and record.status == 200:
                record.status = CLIENT_CLOSED
            self.runtime.finish(generation)
        record.total_ms = (self.runtime.now() - arrived_s) * 1000
        self.log(record)

    def log(self, record: AccessRecord) -> None:
        self.metrics.requests.labels(record.model, record.endpoint, str(record.status)).inc()
        log.info("request_served", **vars(record))


class GenerationResponse(StreamingResponse):
    """A streaming response that always runs `on_close` (even if the client left before it started)."""

    def __init__(self, content: AsyncIterator[tuple[bytes, bool]], on_close, **kwargs: Any):
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()

    async def stream_response(self, send) -> None:
        """Like Starlette's, but the last piece ends the body in the same write (one syscall less)."""
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        try:
            async for data, last in self.body_iterator:
                await send({"type": "http.response.body", "body": data, "more_body": not last})
        except ClientGone:  # noticed while reading ahead: nobody is left to answer
            return


def engine_error(chunk: InferChunk) -> ApiError:
    """An engine's error chunk as an API error: an OpenAI engine's own error body is kept (status,
    message, type, param); otherwise 400 keeps its meaning (bad input), others are upstream errors."""
    code = chunk.error_code if 400 <= chunk.error_code < 600 else 502
    if chunk.data:
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            error = json.loads(chunk.data)["error"]
            return ApiError(code, str(error["message"]), kind=str(error.get("type")), param=error.get("param"),
                            code=error.get("code"))
    if code == 400:
        return ApiError(400, chunk.error or "invalid input", code="invalid_value")
    return ApiError(code, chunk.error or "engine failed", kind="server_error", code="engine_error")


async def collect(generation: Generation, first: InferChunk) -> tuple[list, InferChunk]:
    """A non-streaming answer's parts (an OpenAI engine's bytes, else text) and its last chunk."""
    parts, chunk = [first.data or first.text], first
    while chunk.finish_reason is None:
        chunk = await generation.next_chunk()
        if chunk.error is not None:
            raise engine_error(chunk)
        parts.append(chunk.data or chunk.text)
    return parts, chunk


async def read_body(http: Request, limit_bytes: int) -> bytes:
    too_large = ApiError(413, f"request body larger than {limit_bytes} bytes", code="request_too_large")
    declared = http.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit_bytes:
        raise too_large
    parts, size = [], 0
    async for part in http.stream():
        size += len(part)
        if size > limit_bytes:
            raise too_large
        parts.append(part)
    return b"".join(parts)


def watch_client(http: Request, generation: Generation) -> asyncio.Task:
    """A task that tells the generation when its client disconnects (cancel it when done)."""
    watcher = asyncio.ensure_future(_disconnected(http))
    watcher.add_done_callback(lambda task: task.cancelled() or generation.client_left())
    return watcher


async def _disconnected(http: Request) -> None:
    while (await http.receive())["type"] != "http.disconnect":
        pass
