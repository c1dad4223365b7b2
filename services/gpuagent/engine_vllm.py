"""Real engine host: vLLM engines (CPU build here, CUDA on GPU nodes) inside one device worker.

The pool holds each prewarmed checkpoint as an engine-ready model module (services/gpuagent/
vllm_modules.py: fused projections, the engine's dtype, CPU packed GEMM handles), built off the
critical path; the checkpoint-layout tensors are dropped once it is built. A warm engine per
architecture is initialised once (KV cache allocated, its own dummy weights freed); promotion makes
it compute with the pool's module in place (zero-copy) and resets the prefix cache; demotion hands
the module back. Each engine is stepped by its own thread; asyncio callers talk to it through a
command queue. Imports vLLM once, at worker start.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

for _name, _value in (("VLLM_ENABLE_V1_MULTIPROCESSING", "0"), ("HF_HUB_OFFLINE", "1"),
                      ("VLLM_NO_USAGE_STATS", "1"), ("VLLM_LOGGING_LEVEL", "WARNING"),
                      ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(_name, _value)  # vLLM reads these at import: in-process engine, offline

import torch  # noqa: E402
from vllm import EngineArgs, SamplingParams  # noqa: E402
from vllm.sampling_params import RequestOutputKind  # noqa: E402
from vllm.v1.engine.llm_engine import LLMEngine  # noqa: E402

from services.gpuagent import vllm_openai  # noqa: E402
from services.gpuagent import vllm_modules  # noqa: E402
from services.gpuagent.engine_api import BadRequest, Piece  # noqa: E402
from services.gpuagent.vllm_modules import EngineModule  # noqa: E402
from shared.model_files import read_verified  # noqa: E402
from shared.schemas import InferRequest, ModelInfo  # noqa: E402

ENGINE_WORKSPACE_BYTES = 2 << 30  # CUDA: activations, sampler and allocator slack of one engine
PARALLEL_STEP_TOKENS = 128  # CPU: a step with fewer tokens computes on one thread (decode of up to
#                             max_num_seqs=64 sequences here: one thread was faster at 4-64 of them)
CPU_THREADS = torch.get_num_threads()  # intra-op threads (OMP_NUM_THREADS), read before any step changes them


@dataclass
class EngineSlot:
    """A live vLLM engine for one architecture, stepped by its own thread."""

    arch: str
    engine: LLMEngine
    placeholders: EngineModule  # the engine's own weightless layers, bound while nothing is served
    serving: str = ""  # instance id, or "" when idle
    bound: EngineModule | None = None  # the pool module the engine computes with while serving
    commands: "queue.Queue" = field(default_factory=queue.Queue)
    wake: threading.Event = field(default_factory=threading.Event)
    streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = field(default_factory=dict)
    thread: threading.Thread | None = None
    apps: dict[tuple[str, str], asyncio.Task] = field(default_factory=dict)  # (model, tool parser) -> vLLM's app


class StepFailed(RuntimeError):
    """The engine's step raised: every request on the engine ends with it."""


class VllmHost:
    def __init__(self, device: str, kv_cache_bytes: int):
        self.device = device  # "cpu" or "cuda:N"
        self.kv_cache_bytes = kv_cache_bytes
        self.pool: dict[str, tuple[str, EngineModule]] = {}  # model -> (content hash, engine-ready module)
        self.slots: dict[str, EngineSlot] = {}  # arch -> warm engine
        self.instances: dict[str, tuple[EngineSlot, ModelInfo]] = {}
        self._engine_lock = asyncio.Lock()  # engine creation, binds and drops one at a time
        self._construction = threading.Lock()  # model constructions (engines and pool modules) one at a time

    # ------------------------------------------------------------ pool

    async def load_copy(self, info: ModelInfo, on_progress) -> dict:
        started = time.perf_counter()
        tensors = await asyncio.to_thread(read_verified, Path(info.path), info.content_hash, on_progress,
                                          self.device != "cpu")  # CUDA: pinned, for fast copies into the module
        read_ms = (time.perf_counter() - started) * 1000
        module = await asyncio.to_thread(self._constructed, vllm_modules.build,
                                         self._engine_args(info, self.kv_cache_bytes), tensors)
        if self.device != "cpu":
            torch.cuda.synchronize()
        del tensors  # the pool keeps only the engine-ready form (on CUDA the only device-resident one)
        self.pool[info.name] = (info.content_hash, module)
        return {"load_ms": (time.perf_counter() - started) * 1000, "read_ms": read_ms, "bytes": info.size_bytes}

    async def drop_copy(self, model: str) -> None:
        self.pool.pop(model, None)
        if self.device != "cpu":
            torch.cuda.empty_cache()

    # ------------------------------------------------------------ instances

    async def start_instance(self, instance_id: str, info: ModelInfo, kv_bytes: int) -> dict:
        """Serve `info` from its pool copy through a warm engine (creating one only if none exists)."""
        detail: dict = {}
        async with self._engine_lock:
            if info.name not in self.pool:
                raise BadRequest(f"no pool copy of {info.name}")
            slot = self.slots.get(info.arch)
            if slot is not None and slot.serving:
                raise BadRequest(f"the {info.arch} engine on this device serves {slot.serving}")
            if slot is None:
                started = time.perf_counter()
                slot = await asyncio.to_thread(self._new_slot, info, kv_bytes or self.kv_cache_bytes)
                detail["engine_init_ms"] = (time.perf_counter() - started) * 1000
            module = self.pool[info.name][1]
            started = time.perf_counter()
            await self._on_engine_thread(slot, lambda: self._bind(slot, module))
            detail["bind_ms"] = (time.perf_counter() - started) * 1000
            detail["copied_bytes"] = 0  # the engine computes with the pool's own tensors
            slot.serving = instance_id
            self.instances[instance_id] = (slot, info)
        detail["path"] = "new_engine" if "engine_init_ms" in detail else "warm_engine"
        return detail

    async def warm_engine(self, info: ModelInfo, kv_bytes: int) -> dict:
        """Initialise an idle engine for the architecture (dummy weights) so promotions skip it."""
        async with self._engine_lock:
            if info.arch in self.slots:
                return {}
            started = time.perf_counter()
            await asyncio.to_thread(self._new_slot, info, kv_bytes or self.kv_cache_bytes)
            return {"engine_init_ms": (time.perf_counter() - started) * 1000}

    def _constructed(self, make, *args):
        """Build a model (an engine's or a pool module) one at a time: vLLM's layers register with the
        process-wide "current" config while they are constructed, so two builds in two threads at once
        mixed their layers up (an engine failed with "Duplicate layer name")."""
        with self._construction:
            return make(*args)

    def _engine_args(self, info: ModelInfo, kv_bytes: int) -> EngineArgs:
        """One recipe for an engine of `info`'s architecture and for the modules it is promoted to."""
        return EngineArgs(model=info.path, load_format="dummy", enforce_eager=True, dtype=info.dtype or "bfloat16",
                          kv_cache_memory_bytes=kv_bytes, distributed_executor_backend="uni",
                          max_model_len=info.max_model_len, max_num_seqs=64, disable_log_stats=True,
                          **self._memory_share(info, kv_bytes))

    def _new_slot(self, info: ModelInfo, kv_bytes: int) -> EngineSlot:
        engine = self._constructed(LLMEngine.from_engine_args, self._engine_args(info, kv_bytes))
        slot = EngineSlot(info.arch, engine, vllm_modules.placeholders(engine))
        if self.device == "cpu" and CPU_THREADS > 1:
            vllm_modules.threads_by_step_size(engine, CPU_THREADS, PARALLEL_STEP_TOKENS)
        gc.collect()  # the engine's dummy weights
        slot.thread = threading.Thread(target=self._run_slot, args=(slot,), daemon=True,
                                       name=f"engine-{info.arch}")
        slot.thread.start()
        self.slots[info.arch] = slot
        return slot

    def _memory_share(self, info: ModelInfo, kv_bytes: int) -> dict:
        """CUDA: vLLM refuses to start unless the GPU has `gpu_memory_utilization` of its memory free,
        by default 0.9; with pool copies and other engines resident that fails, so ask for this
        engine's own share (its dummy weights while it starts, KV cache, activations) instead. The KV
        size is fixed anyway."""
        if self.device == "cpu":
            return {}
        total = torch.cuda.get_device_properties(self.device).total_memory
        return {"gpu_memory_utilization": min(0.9, (info.size_bytes + kv_bytes + ENGINE_WORKSPACE_BYTES) / total)}

    @staticmethod
    async def _on_engine_thread(slot: EngineSlot, work) -> None:
        """Run `work` on the slot's engine thread between two steps (after the aborts queued before
        it): the engine is never stepped and changed at once (that corrupted memory on CPU)."""
        done: concurrent.futures.Future = concurrent.futures.Future()
        slot.commands.put(("call", "", work, done))
        slot.wake.set()
        await asyncio.wrap_future(done)

    @staticmethod
    def _bind(slot: EngineSlot, module: EngineModule) -> None:
        """Make the engine compute with the pool's module, then drop KV computed with other weights."""
        vllm_modules.bind(slot.engine, module)
        slot.bound = module
        slot.engine.reset_prefix_cache()

    @staticmethod
    def _unbind(slot: EngineSlot) -> None:
        if slot.bound is not None:
            vllm_modules.unbind(slot.engine, slot.bound, slot.placeholders)
            slot.bound = None

    async def drop_engine(self, arch: str) -> None:
        """Free an idle warm engine: its thread ends and its weights and KV cache are released."""
        async with self._engine_lock:
            slot = self.slots.get(arch)
            if slot is None or slot.serving:
                return
            del self.slots[arch]
            slot.commands.put(("stop", ""))
            slot.wake.set()
            await asyncio.to_thread(slot.thread.join, 10)
            del slot
            gc.collect()
            if self.device != "cpu":
                torch.cuda.empty_cache()

    def inflight(self, instance_id: str) -> int:
        entry = self.instances.get(instance_id)
        return len(entry[0].streams) if entry else 0

    async def stop_instance(self, instance_id: str) -> None:
        """Demote: the engine hands the pool's module back (after the aborts queued before) and idles."""
        entry = self.instances.pop(instance_id, None)
        if entry:
            slot = entry[0]
            slot.serving = ""
            await self._on_engine_thread(slot, lambda: self._unbind(slot))

    # ------------------------------------------------------------ generation

    async def generate(self, instance_id: str, request: InferRequest) -> AsyncIterator[Piece]:
        """An OpenAI request (`request.path`) goes through vLLM's own server; a bare one (prompt or
        messages and a SamplingSpec: the agent's tests and benches) straight to the engine."""
        entry = self.instances.get(instance_id)
        if entry is None:
            raise BadRequest(f"instance {instance_id} is not serving here", code=503)
        slot, info = entry
        if request.path:
            async for piece in vllm_openai.call(await self._openai_app(slot, info), request.path, request.body):
                yield piece
            return
        prompt = self._prompt(slot, request)
        spec = request.sampling
        try:
            params = SamplingParams(
                max_tokens=spec.max_tokens, temperature=spec.temperature, top_p=spec.top_p, stop=spec.stop or None,
                seed=spec.seed, ignore_eos=spec.ignore_eos, presence_penalty=spec.presence_penalty,
                frequency_penalty=spec.frequency_penalty, repetition_penalty=spec.repetition_penalty,
                top_k=spec.top_k, min_p=spec.min_p, min_tokens=spec.min_tokens,
                stop_token_ids=spec.stop_token_ids or None, logit_bias=spec.logit_bias or None,
                output_kind=RequestOutputKind.DELTA)
        except ValueError as exc:  # vLLM's own checks of the combination
            raise BadRequest(f"invalid sampling parameters: {exc}") from exc
        prompt_tokens = len(slot.engine.get_tokenizer().encode(prompt))
        if prompt_tokens + spec.max_tokens > info.max_model_len:
            raise BadRequest(f"prompt has {prompt_tokens} tokens and max_tokens is {spec.max_tokens}: "
                             f"more than the model's context of {info.max_model_len} tokens")
        try:
            async for out in self._outputs(slot, request.request_id, prompt, params, {}):
                completion = out.outputs[0] if out.outputs else None
                yield Piece(text=completion.text if completion else "",
                            finish_reason=(completion.finish_reason or "stop") if out.finished and completion else None,
                            prompt_tokens=len(out.prompt_token_ids or []),
                            new_tokens=len(completion.token_ids) if completion else 0)
        except StepFailed as exc:
            raise BadRequest(str(exc), code=500) from exc
        except Exception as exc:  # refused by the engine: bad input
            raise BadRequest(str(exc)) from exc

    async def _outputs(self, slot: EngineSlot, request_id: str, prompt, params, kwargs: dict) -> AsyncIterator:
        """Add a request to the slot's engine and yield its outputs (deltas) as the engine thread fans
        them out; the engine's refusal or a failed step is raised here. Leaving early aborts it."""
        stream: asyncio.Queue = asyncio.Queue()
        slot.streams[request_id] = (asyncio.get_running_loop(), stream)
        slot.commands.put(("add", request_id, prompt, params, kwargs))
        slot.wake.set()
        try:
            while True:
                out = await stream.get()
                if isinstance(out, Exception):
                    raise out
                yield out
                if out.finished:
                    return
        finally:
            self._abort(slot, request_id)

    @staticmethod
    def _abort(slot: EngineSlot, request_id: str) -> None:
        if slot.streams.pop(request_id, None) is not None:
            slot.commands.put(("abort", request_id))
            slot.wake.set()

    async def _openai_app(self, slot: EngineSlot, info: ModelInfo):
        """vLLM's OpenAI app serving `info.name` on this slot's engine, built on first use."""
        key = (info.name, info.tool_parser)
        if key not in slot.apps:
            slot.apps[key] = asyncio.ensure_future(self._build_app(slot, info))
        try:
            return await asyncio.shield(slot.apps[key])
        except Exception:
            slot.apps.pop(key, None)
            raise

    async def _build_app(self, slot: EngineSlot, info: ModelInfo):
        tasks: concurrent.futures.Future = concurrent.futures.Future()
        slot.commands.put(("call", "", slot.engine.get_supported_tasks, tasks))
        slot.wake.set()
        client = vllm_openai.SlotClient(slot.engine, lambda *args: self._outputs(slot, *args),
                                        lambda request_id: self._abort(slot, request_id))
        return await vllm_openai.serving_app(client, await asyncio.wrap_future(tasks), info.name,
                                             slot.engine.model_config.model, info.tool_parser)

    @staticmethod
    def _prompt(slot: EngineSlot, request: InferRequest) -> str:
        if request.messages is not None:
            return slot.engine.get_tokenizer().apply_chat_template(
                request.messages, tokenize=False, add_generation_prompt=True)
        return request.prompt or ""

    def _run_slot(self, slot: EngineSlot) -> None:
        """Engine thread: apply queued adds, aborts and calls in order, step while work remains, fan outputs out."""
        engine = slot.engine
        while True:
            while not slot.commands.empty():
                op, request_id, *rest = slot.commands.get()
                if op == "stop":
                    return
                if op == "call":
                    work, done = rest
                    try:
                        done.set_result(work())
                    except Exception as exc:  # noqa: BLE001 - handed to the caller
                        done.set_exception(exc)
                elif op == "add":
                    prompt, params, kwargs = rest
                    try:
                        engine.add_request(request_id, prompt, params, **kwargs)
                    except Exception as exc:  # invalid request: fail that request only
                        self._emit(slot, [(request_id, exc)])
                else:
                    engine.abort_request([request_id])
            if not engine.has_unfinished_requests():
                slot.wake.wait()
                slot.wake.clear()
                continue
            try:
                outputs = engine.step()
            except Exception as exc:
                self._emit(slot, [(request_id, StepFailed(f"engine step failed: {exc}"))
                                  for request_id in list(slot.streams)])
                continue
            self._emit(slot, [(out.request_id, out) for out in outputs])

    @staticmethod
    def _emit(slot: EngineSlot, items: list) -> None:
        """Hand each request's output (or the exception that ends it) to its asyncio caller: one
        wake-up of each callers' loop per step, not one per request (each is a syscall here)."""
        deliveries: dict[asyncio.AbstractEventLoop, list] = {}
        for request_id, item in items:
            target = slot.streams.get(request_id)
            if target:
                deliveries.setdefault(target[0], []).append((target[1], item))
        for loop, pending in deliveries.items():
            loop.call_soon_threadsafe(_deliver, pending)


def _deliver(pending: list) -> None:
    for stream, item in pending:
        stream.put_nowait(item)
