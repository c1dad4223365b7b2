"""vLLM's own OpenAI server next to a warm engine: its FastAPI app (chat, completions, tokenize,
detokenize, validation and errors) built over an EngineClient adapter of our engine slot and called
in-process with the body the gateway forwarded; the answer goes back as the bytes vLLM wrote.

The one module that reaches into vLLM's server internals (EngineClient, build_app, init_app_state,
the serve argument parser): they move between vLLM releases, so the version is checked at import.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import inspect
import json
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

import vllm
from vllm.engine.protocol import EngineClient
from vllm.entrypoints.launchers.api_server.app_state import init_app_state
from vllm.entrypoints.launchers.app import build_app
from vllm.entrypoints.launchers.cli_args import make_arg_parser
from vllm.outputs import RequestOutput
from vllm.utils.argparse_utils import FlexibleArgumentParser
from vllm.v1.engine.llm_engine import LLMEngine

from services.gpuagent.engine_api import Piece

SUPPORTED_VLLM = "0.32."
if not vllm.__version__.startswith(SUPPORTED_VLLM):
    raise ImportError(f"services/gpuagent/vllm_openai.py is written against vLLM {SUPPORTED_VLLM}x (its server "
                      f"internals change between releases); found vLLM {vllm.__version__}: check this module")

ENGINE_ADD_ARGS = frozenset(inspect.signature(LLMEngine.add_request).parameters)  # what generate() may pass on

# add(request_id, prompt, params, extra add_request kwargs) -> the request's outputs (deltas), ending when it does
AddRequest = Callable[[str, Any, Any, dict], AsyncIterator[RequestOutput]]


@dataclass
class Usage:
    """What one HTTP call generated, seen by the adapter (the gateway's logs and metrics use it)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None


_usage: contextvars.ContextVar[Usage] = contextvars.ContextVar("warmserve_usage")


def _unsupported(name: str):
    async def method(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(f"{name} is not offered by a WarmServe engine slot")
    return method


_Unsupported = type("_Unsupported", (EngineClient,), {n: _unsupported(n) for n in EngineClient.__abstractmethods__})


class SlotClient(_Unsupported):
    """EngineClient over one LLMEngine stepped by its host's thread: generation goes through `add`."""

    def __init__(self, engine: LLMEngine, add: AddRequest, abort: Callable[[str], None]):
        self.vllm_config, self.model_config = engine.vllm_config, engine.model_config
        self.renderer, self.input_processor = engine.renderer, engine.input_processor
        self._add, self._abort = add, abort

    is_running = property(lambda self: True)
    is_stopped = property(lambda self: False)
    errored = property(lambda self: False)
    dead_error = property(lambda self: RuntimeError("engine slot failed"))

    async def is_paused(self) -> bool:
        return False

    async def is_sleeping(self) -> bool:
        return False

    async def is_tracing_enabled(self) -> bool:
        return False

    async def do_log_stats(self) -> None:
        return None

    async def generate(self, prompt, sampling_params, request_id: str, **kwargs: Any) -> AsyncIterator[RequestOutput]:
        usage = _usage.get(None) or Usage()
        passed = {k: v for k, v in kwargs.items() if k in ENGINE_ADD_ARGS and v is not None}
        first = True
        async for out in self._add(request_id, prompt, sampling_params, passed):
            if first:
                usage.prompt_tokens += len(out.prompt_token_ids or [])
                first = False
            usage.completion_tokens += sum(len(c.token_ids) for c in out.outputs)
            if out.finished:
                usage.finish_reason = next((c.finish_reason for c in out.outputs if c.finish_reason), "stop")
            yield out

    async def abort(self, request_id) -> None:
        for one in [request_id] if isinstance(request_id, str) else request_id:
            self._abort(one)


def serve_args(tool_parser: str) -> tuple[str, ...]:
    """What every engine serves a model with, here and in the conformance test's plain vLLM server."""
    return ("--enable-auto-tool-choice", "--tool-call-parser", tool_parser)


async def serving_app(client: SlotClient, tasks: tuple[str, ...], served_name: str, model_path: str,
                      tool_parser: str):
    """vLLM's OpenAI app for one served model name over `client` (its routes, handlers and state)."""
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(
        ["--model", model_path, "--served-model-name", served_name, *serve_args(tool_parser)])
    app = build_app(args, tasks, client.model_config)
    await init_app_state(client, app.state, args, tasks)
    return app


async def call(app, path: str, body: bytes) -> AsyncIterator[Piece]:
    """POST `body` to `path` on the app in this process; its answer as pieces: the bytes it wrote
    (`data`), tokens generated so far, and on the last piece the finish reason, or the error status.
    What the app wrote while the previous piece was being sent goes out as one piece."""
    usage, parts, written = Usage(), collections.deque(), asyncio.Event()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0), "state": {}}
    received = asyncio.Event()

    async def receive() -> dict:
        if not received.is_set():
            received.set()
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Future()  # nobody disconnects: a cancelled call cancels the app's task

    async def send(message: dict) -> None:
        parts.append(message)
        written.set()

    async def run() -> None:
        _usage.set(usage)
        try:
            await app(scope, receive, send)
        finally:
            parts.append(None)
            written.set()

    task = asyncio.create_task(run())
    status, reported, error, ended = 500, 0, b"", False
    try:
        while not ended:
            await written.wait()
            written.clear()
            data, last = b"", False
            while parts and not last:
                message = parts.popleft()
                if message is None:
                    ended = True
                elif message["type"] == "http.response.start":
                    status = message["status"]
                else:
                    data += message.get("body", b"")
                    last = not message.get("more_body", False)
            if status != 200:
                error += data
                if last:
                    yield Piece(data=error, error=_message(error), error_code=status)
                    return
                continue
            if not data and not last:
                continue
            new, reported = usage.completion_tokens - reported, usage.completion_tokens
            yield Piece(data=data, prompt_tokens=usage.prompt_tokens, new_tokens=new,
                        finish_reason=(usage.finish_reason or "stop") if last else None)
            if last:
                return
        await task  # the app ended without answering: its exception is the error
        yield Piece(error="the OpenAI layer ended without an answer", error_code=500)
    finally:
        task.cancel()


def _message(error_body: bytes) -> str:
    """The message of vLLM's error body (for logs), else the body's start."""
    try:
        return str(json.loads(error_body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return error_body.decode(errors="replace")[:500]
