"""Fake engine host: the timing of a real one (load bandwidth, per-token time), no model.

Used by fast tests, by the placer/gateway integration tests and by the simulator parity run.
It still honours the pool (a copy must be loaded before it can serve) and verifies that the
checkpoint's content hash is the registered one when the path exists.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import AsyncIterator, Callable

from services.gpuagent.engine_api import BadRequest, Piece
from shared.model_files import content_hash
from shared.schemas import InferRequest, ModelInfo

PROGRESS_STEPS = 4
ENGINE_INIT_S = 0.05
TOKENIZER_PATHS = ("/tokenize", "/detokenize")  # a warm engine per architecture is created once, like the real host


class FakeHost:
    def __init__(self, load_bytes_s: float, token_s: float):
        self.load_bytes_s = load_bytes_s
        self.token_s = token_s
        self.pool: dict[str, str] = {}  # model -> content hash
        self.archs: set[str] = set()
        self.instances: dict[str, ModelInfo] = {}
        self.streams: dict[str, set[str]] = {}

    async def load_copy(self, info: ModelInfo, on_progress: Callable[[float], None]) -> dict:
        if Path(info.path, "config.json").exists() and content_hash(Path(info.path)) != info.content_hash:
            raise BadRequest(f"checkpoint at {info.path} does not match the registered sha256")
        for step in range(1, PROGRESS_STEPS + 1):
            await asyncio.sleep(info.size_bytes / self.load_bytes_s / PROGRESS_STEPS)
            on_progress(step / PROGRESS_STEPS)
        self.pool[info.name] = info.content_hash
        return {"bytes": info.size_bytes}

    async def drop_copy(self, model: str) -> None:
        self.pool.pop(model, None)

    async def start_instance(self, instance_id: str, info: ModelInfo, kv_bytes: int) -> dict:
        if info.name not in self.pool:
            raise BadRequest(f"no pool copy of {info.name}")
        detail = {"path": "warm_engine"}
        if info.arch not in self.archs:
            await asyncio.sleep(ENGINE_INIT_S)
            self.archs.add(info.arch)
            detail = {"path": "new_engine"}
        self.instances[instance_id] = info
        self.streams[instance_id] = set()
        return detail

    async def stop_instance(self, instance_id: str) -> None:
        self.instances.pop(instance_id, None)
        self.streams.pop(instance_id, None)

    async def warm_engine(self, info: ModelInfo, kv_bytes: int) -> dict:
        if info.arch not in self.archs:
            await asyncio.sleep(ENGINE_INIT_S)
            self.archs.add(info.arch)
        return {}

    async def drop_engine(self, arch: str) -> None:
        self.archs.discard(arch)

    def inflight(self, instance_id: str) -> int:
        return len(self.streams.get(instance_id, ()))

    async def generate(self, instance_id: str, request: InferRequest) -> AsyncIterator[Piece]:
        info = self.instances.get(instance_id)
        if info is None:
            raise BadRequest(f"instance {instance_id} is not serving here", code=503)
        if request.path in TOKENIZER_PATHS:
            raise BadRequest(f"{request.path} needs a real tokenizer: not offered by the fake engine", code=501)
        text = request.prompt if request.prompt is not None else " ".join(
            str(m.get("content", "")) for m in request.messages or [])
        prompt_tokens = max(len(text.split()), 1)
        if prompt_tokens + request.sampling.max_tokens > info.max_model_len:
            raise BadRequest(f"prompt has {prompt_tokens} tokens and max_tokens is "
                             f"{request.sampling.max_tokens}: more than the context of {info.max_model_len}")
        active = self.streams[instance_id]
        active.add(request.request_id)
        try:
            for i in range(request.sampling.max_tokens):
                await asyncio.sleep(self.token_s)
                last = i == request.sampling.max_tokens - 1
                yield Piece(text=f" t{i}", prompt_tokens=prompt_tokens, new_tokens=1,
                            finish_reason="length" if last else None)
        finally:
            active.discard(request.request_id)
