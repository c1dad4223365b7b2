"""Device worker: executes its agent's device calls and serves inference for its instances.

One per device. With the vLLM engine it is a long-lived process started by the agent at boot
(vLLM imported and the device initialised once, so no request waits for a spawn or an import);
with the fake engine it runs inside the agent's process unless `fake_worker_processes` is set.
Same code either way. A draining or stopped instance answers requests with a 503, never silence.
A worker process outlives its agent (its instance keeps serving; a restarted agent adopts it from
what `status` reports) and exits by itself once no agent has called it for `worker_orphan_timeout_s`,
or once NATS has been unreachable for `worker_bus_lost_exit_s` (its stack is gone).
`python -m services.gpuagent.worker --device-index N [settings flags]`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time

from services.gpuagent.engine_api import BadRequest, EngineHost
from shared.bus import Bus
from shared.logs import configure_logging, get_logger
from shared.schemas import (CancelInference, CommandResult, DeviceCall, DeviceOp, Event, InferChunk,
                            InferRequest)
from shared.settings import Settings, add_arguments, load_settings

log = get_logger("gpuagent.worker")
CUDA_MEMORY_SHARE = 0.9  # of the GPU memory free at start: the rest is the CUDA context and allocator slack
RETIRED_KEEP_S = 60.0  # a stopped instance answers late requests with a 503 for this long (gateway idle timeout: 30 s)
ORPHAN_CHECK_S = 0.5  # how often a worker process looks at how long ago its agent called


class DeviceWorker:
    def __init__(self, bus: Bus, settings: Settings, index: int, host: EngineHost, memory_bytes: int):
        self.bus, self.settings, self.index, self.host = bus, settings, index, host
        self.memory_bytes = memory_bytes  # the budget this device offers its agent
        self.node = settings.node
        self._instance_subs: dict[str, list] = {}
        self._closing: set[str] = set()  # draining or stopped instances: new requests get a 503
        self._retired: dict[str, tuple[float, list]] = {}  # stopped: (when, subscriptions kept for late requests)
        self._generations: dict[tuple[str, int], asyncio.Task] = {}  # (request id, attempt) -> its generation
        # what the agent's calls put here, with the sizes they gave (what an adopting agent rebuilds its ledger from)
        self._copies: dict[str, dict] = {}  # model -> {model, content_hash, bytes}
        self._engines: dict[str, dict] = {}  # arch -> {arch, model, kv_bytes}: the call that created it
        self._instances: dict[str, dict] = {}  # instance id -> {instance_id, model, arch, started_at_s}
        self._busy: list[str] = []  # ops in progress (an adopting agent waits until none is)
        self.agent_called_s = time.monotonic()  # last call from an agent (monotonic)

    async def start(self) -> None:
        await self.bus.subscribe(self.bus.subjects.device_call(self.node, self.index), DeviceCall, self.on_call)

    async def close(self) -> None:
        await self.bus.drain_subscriptions()
        await self.bus.close()

    # ------------------------------------------------------------ device calls

    async def on_call(self, call: DeviceCall) -> CommandResult:
        started = time.perf_counter()
        if call.agent_boot_id:
            self.agent_called_s = time.monotonic()
        busy = call.op != DeviceOp.status
        if busy:
            self._busy.append(call.op.value)
        try:
            detail = await self._execute(call)
        except BadRequest as exc:
            return CommandResult(command_id=call.op.value, ok=False, reason=str(exc))
        except Exception as exc:  # report, never crash the worker
            log.exception("device_call_failed", op=call.op.value, device=self.index)
            return CommandResult(command_id=call.op.value, ok=False, reason=f"{type(exc).__name__}: {exc}")
        finally:
            if busy:
                self._busy.remove(call.op.value)
        return CommandResult(command_id=call.op.value, ok=True, detail=detail or {},
                             duration_ms=(time.perf_counter() - started) * 1000)

    async def _execute(self, call: DeviceCall) -> dict | None:
        if call.op == DeviceOp.status:
            return {"pid": os.getpid(), "memory_bytes": self.memory_bytes, "copies": sorted(self.host.pool),
                    "inflight": {i: self.host.inflight(i) for i in self._instance_subs},
                    "pool": list(self._copies.values()), "engines": list(self._engines.values()),
                    "instances": list(self._instances.values()), "busy": list(self._busy)}
        info = call.model
        if call.op == DeviceOp.load_copy:
            detail = await self.host.load_copy(info, self._progress_reporter(info.name))
            self._copies[info.name] = {"model": info.name, "content_hash": info.content_hash,
                                       "bytes": info.size_bytes // info.tp}
            return detail
        if call.op == DeviceOp.drop_copy:
            self._copies.pop(info.name, None)
            return await self.host.drop_copy(info.name)
        if call.op == DeviceOp.start_instance:
            # subscribed while the engine binds: the server learns both subjects in the same time
            await self._serve_instance(call.instance_id)
            try:
                detail, _ = await asyncio.gather(self.host.start_instance(call.instance_id, info, call.kv_bytes),
                                                 self.bus.nc.flush())
            except BaseException:
                for sub in self._instance_subs.pop(call.instance_id):
                    await self.bus.unsubscribe(sub)
                raise
            if call.ready_event:  # a NATS outage must not fail a bound instance: the agent's view reports it
                await self.bus.best_effort(self.bus.publish_event("agent", call.ready_event.model_copy(update={
                    "at_s": time.time(), "detail": {**call.ready_event.detail, **detail}})), "instance_ready")
            self._held_engine(info, call.kv_bytes)
            self._instances[call.instance_id] = {"instance_id": call.instance_id, "model": info.name,
                                                 "arch": info.arch, "started_at_s": time.time()}
            return detail
        if call.op == DeviceOp.warm_engine:
            detail = await self.host.warm_engine(info, call.kv_bytes)
            self._held_engine(info, call.kv_bytes)
            return detail
        if call.op == DeviceOp.drop_engine:
            self._engines.pop(call.arch, None)
            return await self.host.drop_engine(call.arch)
        if call.op == DeviceOp.stop_instance:
            await self._drain_instance(call.instance_id, call.drain_timeout_s)
            detail = await self.host.stop_instance(call.instance_id)
            self._instances.pop(call.instance_id, None)
            await self._retire(call.instance_id)
            return detail
        raise BadRequest(f"unknown op {call.op}")

    def _held_engine(self, info, kv_bytes: int) -> None:
        """Remember the engine of `info`'s architecture as the first call that needed it sized it."""
        self._engines.setdefault(info.arch, {"arch": info.arch, "model": info.name,
                                             "kv_bytes": kv_bytes})

    def _progress_reporter(self, model: str):
        """A callback safe to call from the loading thread: publishes prewarm_progress events."""
        last = [0.0]
        loop = asyncio.get_running_loop()

        def report(fraction: float) -> None:
            if fraction - last[0] >= 0.25 or fraction >= 1.0 > last[0]:
                last[0] = fraction
                loop.call_soon_threadsafe(asyncio.ensure_future, self.bus.publish_event(
                    "agent", Event(name="prewarm_progress", at_s=time.time(), model=model, node=self.node,
                                   devices=[self.index], detail={"fraction": round(fraction, 3)})))

        return report

    # ------------------------------------------------------------ inference

    async def _serve_instance(self, instance_id: str) -> None:
        async def on_request(request: InferRequest) -> None:
            if instance_id in self._closing:  # never silence: the gateway re-dispatches on a 503
                await self.bus.publish(request.reply_to, InferChunk(
                    request_id=request.request_id, seq=0, instance_id=instance_id, attempt=request.attempt,
                    error_code=503, error=f"instance {instance_id} is stopping"))
                return
            key = (request.request_id, request.attempt)
            task = asyncio.create_task(self._generate(instance_id, request))
            self._generations[key] = task
            task.add_done_callback(lambda _: self._generations.pop(key, None))

        async def on_cancel(cancel: CancelInference) -> None:
            for (request_id, attempt), task in list(self._generations.items()):
                if request_id == cancel.request_id and cancel.attempt in (-1, attempt):
                    task.cancel()

        subjects = self.bus.subjects
        self._instance_subs[instance_id] = [  # the caller flushes: the server knows both before "ready"
            await self.bus.subscribe(subjects.infer(instance_id), InferRequest, on_request, flush=False),
            await self.bus.subscribe(subjects.infer_cancel(instance_id), CancelInference, on_cancel, flush=False),
        ]

    async def _drain_instance(self, instance_id: str, timeout_s: float) -> None:
        """Refuse new requests (503), let accepted ones finish (bounded), then cancel the rest."""
        self._closing.add(instance_id)
        deadline = time.monotonic() + timeout_s
        while self._generations and time.monotonic() < deadline:  # one instance per device: all are its own
            await asyncio.sleep(0.02)
        for task in list(self._generations.values()):
            task.cancel()

    async def _retire(self, instance_id: str) -> None:
        """Keep a stopped instance's subscriptions for RETIRED_KEEP_S, so that a request routed to it
        before its stop was seen gets a 503 instead of silence; drop older ones."""
        now = time.monotonic()
        self._retired[instance_id] = (now, self._instance_subs.pop(instance_id, []))
        for old, (since, subs) in list(self._retired.items()):
            if now - since > RETIRED_KEEP_S:
                del self._retired[old]
                self._closing.discard(old)
                for sub in subs:
                    await self.bus.unsubscribe(sub)

    async def _generate(self, instance_id: str, request: InferRequest) -> None:
        received = time.perf_counter()
        seq, completion, first_ms = 0, 0, 0.0

        async def send(**fields) -> None:
            nonlocal seq
            await self.bus.publish(request.reply_to, InferChunk(request_id=request.request_id, seq=seq,
                                                                instance_id=instance_id, attempt=request.attempt,
                                                                **fields))
            seq += 1

        try:
            await send()  # the acknowledgement: the gateway sends again what is not acknowledged
            async for piece in self.host.generate(instance_id, request):
                if piece.error:
                    await send(error=piece.error, error_code=piece.error_code or 500, data=piece.data)
                    return
                completion += piece.new_tokens
                if not first_ms and piece.new_tokens:
                    first_ms = (time.perf_counter() - received) * 1000
                await send(text=piece.text, finish_reason=piece.finish_reason, prompt_tokens=piece.prompt_tokens,
                           completion_tokens=completion, engine_ttft_ms=first_ms, data=piece.data)
        except BadRequest as exc:
            await send(error=str(exc), error_code=exc.code)
        except asyncio.CancelledError:
            if seq <= 1 and instance_id in self._closing:  # a demote's drain ended it before any output
                await send(error=f"instance {instance_id} stopped before serving the request", error_code=503)
            else:
                await send(finish_reason="cancelled", completion_tokens=completion)
        except Exception as exc:
            log.exception("generation_failed", instance_id=instance_id, request_id=request.request_id)
            await send(error=f"{type(exc).__name__}: {exc}", error_code=500)


def engine_threads(setting: int, cores: int, devices: int) -> int:
    """Intra-op threads of a CPU device's engines: the setting, or (0) this process's cores shared by
    the devices, at least 1. A prefill's GEMMs use them all; decode's small operations run on one."""
    return setting or max(1, cores // devices)


def _host(settings: Settings) -> tuple[EngineHost, int]:
    """This process's engine host and the memory budget it offers."""
    if settings.engine == "fake":
        from services.gpuagent.engine_fake import FakeHost

        return FakeHost(settings.fake_load_bytes_s, settings.fake_token_s), settings.device_memory_bytes
    device = "cpu" if settings.device_kind == "cpu" else "cuda:0"  # the agent sets CUDA_VISIBLE_DEVICES
    if device == "cpu":  # read once, when torch loads OpenMP below; idle OpenMP threads sleep instead of
        # spinning, which took the cores from the serving layer, the bus and the gateway between steps
        os.environ["OMP_NUM_THREADS"] = str(engine_threads(settings.engine_threads, len(os.sched_getaffinity(0)),
                                                           settings.devices))
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from services.gpuagent.engine_vllm import VllmHost  # the expensive import, once per worker

    memory_bytes = settings.device_memory_bytes
    if device != "cpu":
        import torch

        torch.zeros(1, device=device)  # initialise the CUDA context now, not on the first request
        memory_bytes = int(torch.cuda.mem_get_info()[0] * CUDA_MEMORY_SHARE)
    return VllmHost(device, settings.kv_cache_bytes), memory_bytes


async def _run_process(settings: Settings, index: int) -> None:
    host, memory_bytes = _host(settings)
    bus = await Bus.connect(settings, f"gpuagent-{settings.node}-dev{index}")
    worker = DeviceWorker(bus, settings, index, host, memory_bytes)
    await worker.start()
    log.info("device_worker_ready", device=index, pid=os.getpid())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    bus_lost_s = None  # since when NATS has been unreachable
    while not stop.is_set():  # serve on while the agent is away; leave when none has called for too long
        now = time.monotonic()
        bus_lost_s = None if bus.connected else bus_lost_s or now
        if bus_lost_s is not None:  # a NATS outage is nobody's absence: the clock starts again when it is back
            worker.agent_called_s = now
            if now - bus_lost_s > settings.worker_bus_lost_exit_s:
                log.warning("device_worker_bus_lost", device=index, pid=os.getpid(),
                            timeout_s=settings.worker_bus_lost_exit_s)
                break
        if now - worker.agent_called_s > settings.worker_orphan_timeout_s:
            log.warning("device_worker_orphaned", device=index, pid=os.getpid(),
                        timeout_s=settings.worker_orphan_timeout_s)
            break
        try:
            await asyncio.wait_for(stop.wait(), ORPHAN_CHECK_S)
        except asyncio.TimeoutError:
            pass
    await worker.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="WarmServe device worker (started by the gpuagent)")
    parser.add_argument("--device-index", type=int, required=True)
    add_arguments(parser)
    args = vars(parser.parse_args(argv))
    index = args.pop("device_index")
    settings = load_settings(args)
    configure_logging(settings.log_level, settings.log_json)
    asyncio.run(_run_process(settings, index))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # vLLM leaves non-daemon threads behind; nothing is left to flush, so do not wait for them


if __name__ == "__main__":
    main()
