"""What a device worker needs from an engine host (vLLM or the fake timing engine).

`Piece` is one step of a generation stream; `BadRequest` is a refusal that goes back to the
caller with a status code (400: bad input, 503: instance gone) instead of crashing anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Protocol

from shared.schemas import InferRequest, ModelInfo


class BadRequest(Exception):
    def __init__(self, reason: str, code: int = 400):
        super().__init__(reason)
        self.code = code


@dataclass(frozen=True)
class Piece:
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    new_tokens: int = 0
    error: str | None = None
    error_code: int = 0
    data: bytes = b""  # OpenAI requests: the answer's bytes as the engine's server wrote them


class EngineHost(Protocol):
    pool: dict[str, Any]  # model -> its resident copy (the worker reports the names in `status`)

    async def load_copy(self, info: ModelInfo, on_progress: Callable[[float], None]) -> dict: ...

    async def drop_copy(self, model: str) -> None: ...

    async def start_instance(self, instance_id: str, info: ModelInfo, kv_bytes: int) -> dict: ...

    async def stop_instance(self, instance_id: str) -> None: ...

    async def drop_engine(self, arch: str) -> None: ...

    async def warm_engine(self, info: ModelInfo, kv_bytes: int) -> dict: ...

    def inflight(self, instance_id: str) -> int: ...

    def generate(self, instance_id: str, request: InferRequest) -> AsyncIterator[Piece]: ...
