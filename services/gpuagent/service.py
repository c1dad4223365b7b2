"""GPU agent shell: executes placer commands on this node's devices and reports observed state.

Commands (prewarm / evict / promote / demote / cold_start) arrive by request/reply, are
idempotent by command id and are answered when done (or refused with a reason). The ledger
core decides memory; device workers do the work; every change is an event, and a NodeView is
written to Redis with a TTL'd liveness key each heartbeat (a restart starts from an empty view).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections import OrderedDict

from services.gpuagent.core.ledger import DeviceLedger, Refused, instance_kv_bytes, page_bytes
from shared.bus import Bus, BusError
from shared.runner import Service, every
from shared.schemas import (AgentCommand, CommandKind, CommandResult, CopyState, CopyView, DeviceCall,
                            DeviceOp, DeviceView, Event, InstanceState, InstanceView, ModelInfo, NodeView)


REMEMBERED_COMMANDS = 10_000
WORKER_START_TIMEOUT_S = 300.0
LONG_CALL_TIMEOUT_S = 900.0
WORKER_STOP_TIMEOUT_S = 3.0


class AgentService(Service):
    name = "gpuagent"

    def __init__(self, settings):
        super().__init__(settings)
        self.node = settings.node
        self.boot_id = uuid.uuid4().hex[:12]
        self.ledgers: list[DeviceLedger] = []
        self.workers: list = []  # in-process DeviceWorker objects (fake engine)
        self.processes: list[subprocess.Popen] = []  # device worker processes (vLLM)
        self.inflight: dict[str, int] = {}
        self._commands: OrderedDict[str, asyncio.Future] = OrderedDict()
        self._loads: dict[tuple[int, str], asyncio.Future] = {}
        self._prewarm_slots = asyncio.Semaphore(settings.max_parallel_prewarms)
        self._ready = False
        self._stopping = False
        self._warming: asyncio.Task | None = None

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        s = self.settings
        await self.bus.ensure_event_stream()
        await self.state.drop_node(self.node)  # whatever a previous boot left: we hold nothing yet
        budgets = await self._start_workers(self._device_count())
        self.ledgers = [DeviceLedger(i, budget) for i, budget in enumerate(budgets)]
        await self._publish_view()
        await self.bus.subscribe(self.bus.subjects.agent_command(self.node), AgentCommand, self.on_command)
        self._ready = True
        await self._event("agent_started", detail={"devices": len(self.ledgers), "engine": s.engine,
                                                   "boot_id": self.boot_id})
        if s.warm_engines:
            self._warming = asyncio.create_task(self._warm_engines())

    async def _warm_engines(self) -> None:
        """Device prewarming: one idle engine per registered architecture per device, in the
        background (commands are served meanwhile); smaller architectures first."""
        models = sorted((await self.state.models()).values(), key=lambda m: (m.size_bytes, m.name))
        archs = {m.arch: m for m in reversed(models) if m.tp == 1}
        for info in sorted(archs.values(), key=lambda m: m.size_bytes):
            kv = instance_kv_bytes(info.kv_bytes_per_token, info.max_model_len, self.settings.kv_cache_bytes)
            for ledger in self.ledgers:
                if self._stopping or not ledger.reserve_engine(info.arch, info.size_bytes, kv, time.time()):
                    continue
                result = await self._call(ledger.index, DeviceCall(op=DeviceOp.warm_engine, model=info, kv_bytes=kv))
                if not result.ok:
                    ledger.engines.pop(info.arch, None)
                    self.log.warning("engine_warm_failed", device=ledger.index, arch=info.arch, reason=result.reason)
                    continue
                await self._event("engine_warmed", devices=[ledger.index], model=info.name,
                                  detail={"arch": info.arch, **result.detail})
                await self._publish_view()

    def is_ready(self) -> bool:
        return self._ready

    def _device_count(self) -> int:
        if self.settings.device_kind == "cuda":
            import torch

            return torch.cuda.device_count()
        return self.settings.devices

    async def _start_workers(self, count: int) -> list[int]:
        """Start one worker per device; return each device's memory budget (as its worker reports it)."""
        s = self.settings
        if s.engine == "fake":
            from services.gpuagent.engine_fake import FakeHost
            from services.gpuagent.worker import DeviceWorker

            for i in range(count):  # own connection each, as a worker process would have
                bus = await Bus.connect(s, f"gpuagent-{self.node}-dev{i}")
                worker = DeviceWorker(bus, s, i, FakeHost(s.fake_load_bytes_s, s.fake_token_s),
                                      s.device_memory_bytes)
                await worker.start()
                self.workers.append(worker)
            return [s.device_memory_bytes] * count
        env = dict(os.environ, **s.as_env())
        for i in range(count):
            if s.device_kind == "cuda":
                env["CUDA_VISIBLE_DEVICES"] = str(i)  # each worker sees its own GPU as cuda:0
            self.processes.append(subprocess.Popen(  # worker logs (and vLLM's) go to our stderr
                [sys.executable, "-m", "services.gpuagent.worker", "--device-index", str(i),
                 "--parent-pid", str(os.getpid())], env=env,
                stdout=sys.stderr, start_new_session=True))  # we stop workers ourselves, after draining
        deadline = time.monotonic() + WORKER_START_TIMEOUT_S
        budgets = []
        for i, proc in enumerate(self.processes):
            while True:  # wait until the worker answers (vLLM imported, device initialised)
                if proc.poll() is not None:
                    raise RuntimeError(f"device worker {i} exited with code {proc.returncode}")
                try:
                    status = await self._call(i, DeviceCall(op=DeviceOp.status), timeout_s=1.0)
                    budgets.append(status.detail["memory_bytes"])
                    break
                except BusError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"device worker {i} did not start within {WORKER_START_TIMEOUT_S} s")
        self.log.info("device_workers_ready", devices=len(self.processes), budgets=budgets)
        return budgets

    async def run(self, stopping: asyncio.Event) -> None:
        await every(self.settings.heartbeat_s, stopping, self._heartbeat, self.log, "heartbeat_failed")

    async def _heartbeat(self) -> None:
        await self._refresh_inflight()
        await self._publish_view()

    async def stop(self) -> None:
        self._ready = False
        self._stopping = True
        if self._warming is not None:
            await asyncio.gather(self._warming, return_exceptions=True)
        for ledger in self.ledgers:
            if ledger.instance:
                try:
                    await self._demote(ledger, ledger.instance.instance_id, "agent_stopping")
                except BusError as exc:  # the worker is gone already: nothing left to drain
                    self.log.warning("demote_on_stop_failed", device=ledger.index, reason=str(exc))
        for worker in self.workers:
            await worker.bus.drain_subscriptions()
            await worker.bus.close()
        for proc in self.processes:
            proc.terminate()
        for proc in self.processes:
            try:
                await asyncio.to_thread(proc.wait, WORKER_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.log.warning("device_worker_killed", pid=proc.pid)
                proc.kill()
        await self.state.drop_node(self.node)
        await self._event("agent_stopped")

    # ------------------------------------------------------------ commands

    async def on_command(self, cmd: AgentCommand) -> CommandResult:
        """Idempotent: a repeated command id gets the first execution's result."""
        future = self._commands.get(cmd.command_id)
        if future is None:
            future = asyncio.ensure_future(self._execute(cmd))
            self._commands[cmd.command_id] = future
            while len(self._commands) > REMEMBERED_COMMANDS:
                self._commands.popitem(last=False)
        return await asyncio.shield(future)

    async def _execute(self, cmd: AgentCommand) -> CommandResult:
        started = time.perf_counter()
        try:
            if not self._ready:
                raise Refused("agent is not ready")
            detail = await self._dispatch(cmd)
            ok, reason = True, ""
        except Refused as exc:
            detail, ok, reason = {}, False, str(exc)
            await self._event("command_refused", model=cmd.model, devices=cmd.devices, reason=reason,
                              detail={"command": cmd.kind.value, "command_id": cmd.command_id})
        result = CommandResult(command_id=cmd.command_id, ok=ok, reason=reason, detail=detail,
                               duration_ms=(time.perf_counter() - started) * 1000)
        self.log.info("command_done", kind=cmd.kind.value, model=cmd.model, devices=cmd.devices, ok=ok,
                      reason=reason, duration_ms=round(result.duration_ms, 1))
        await self._publish_view()
        return result

    async def _dispatch(self, cmd: AgentCommand) -> dict:
        if cmd.kind == CommandKind.demote:
            ledger = next((d for d in self.ledgers if d.instance and d.instance.instance_id == cmd.instance_id), None)
            if ledger is None:
                return {"absent": True}  # already demoted: nothing to do twice
            return await self._demote(ledger, cmd.instance_id, cmd.reason)
        info = await self.state.model(cmd.model)
        if info is None:
            raise Refused(f"unknown model {cmd.model!r}")
        ledgers = self._ledgers_for(cmd.devices)
        if cmd.kind == CommandKind.prewarm:
            return {"devices": [await self._prewarm(d, info, cmd.reason) for d in ledgers]}
        if cmd.kind == CommandKind.evict:
            return {"devices": [await self._evict(d, info.name, cmd.reason or "placer") for d in ledgers]}
        if len(ledgers) != 1:
            raise Refused("an instance spans one device on this node (tensor parallel > 1 is not supported here)")
        instance_id = cmd.instance_id or f"{info.name}-{uuid.uuid4().hex[:8]}"
        if cmd.kind == CommandKind.promote:
            if info.name not in ledgers[0].copies:
                raise Refused(f"no prewarmed copy of {info.name} on device {ledgers[0].index}: use cold_start")
            return await self._start_instance(ledgers[0], info, instance_id, cmd.kv_bytes, cmd.reason or "promote")
        if cmd.kind == CommandKind.cold_start:
            return await self._cold_start(ledgers[0], info, instance_id, cmd.kv_bytes, cmd.reason or "cold_start")
        raise Refused(f"unknown command {cmd.kind}")

    def _ledgers_for(self, devices: list[int]) -> list[DeviceLedger]:
        if not devices:
            raise Refused("no devices given")
        bad = [d for d in devices if not 0 <= d < len(self.ledgers)]
        if bad or len(set(devices)) != len(devices):
            raise Refused(f"bad device list {devices}: this node has devices 0..{len(self.ledgers) - 1}")
        return [self.ledgers[d] for d in devices]

    # ------------------------------------------------------------ copies

    async def _prewarm(self, ledger: DeviceLedger, info: ModelInfo, reason: str) -> dict:
        key = (ledger.index, info.name)
        if key in self._loads:  # same copy already loading: wait for that load
            return await asyncio.shield(self._loads[key])
        engines = ledger.reserve_copy(info.name, info.content_hash, info.size_bytes // info.tp, time.time())
        if engines is None:
            return {"device": ledger.index, "already": True}
        for arch in engines:
            await self._drop_engine(ledger, arch, f"room_for_copy:{info.name}")
        future = asyncio.ensure_future(self._load(ledger, info, reason))
        self._loads[key] = future
        try:
            return await asyncio.shield(future)
        finally:
            self._loads.pop(key, None)

    async def _load(self, ledger: DeviceLedger, info: ModelInfo, reason: str) -> dict:
        await self._event("prewarm_started", model=info.name, devices=[ledger.index], reason=reason)
        async with self._prewarm_slots:
            result = await self._call(ledger.index, DeviceCall(op=DeviceOp.load_copy, model=info))
        if not result.ok:
            ledger.copies.pop(info.name, None)
            await self._event("prewarm_failed", model=info.name, devices=[ledger.index], reason=result.reason)
            raise Refused(result.reason)
        ledger.copy_ready(info.name)
        await self._event("prewarm_finished", model=info.name, devices=[ledger.index], reason=reason,
                          detail={"duration_ms": round(result.duration_ms, 1), **result.detail})
        return {"device": ledger.index, "duration_ms": result.duration_ms}

    async def _evict(self, ledger: DeviceLedger, model: str, reason: str) -> dict:
        if model not in ledger.copies:
            return {"device": ledger.index, "absent": True}
        if (ledger.index, model) in self._loads:
            raise Refused(f"{model} is still loading on device {ledger.index}")
        ledger.copies[model].state = CopyState.evicting
        try:
            record = ledger.drop_copy(model)
        except Refused:
            ledger.copies[model].state = CopyState.ready
            raise
        await self._call(ledger.index, DeviceCall(op=DeviceOp.drop_copy, model=ModelInfo(
            name=model, path="", size_bytes=0, content_hash=record.content_hash)))
        await self._event("evicted", model=model, devices=[ledger.index], reason=reason,
                          detail={"freed_bytes": record.bytes})
        return {"device": ledger.index, "freed_bytes": record.bytes}

    async def _drop_engine(self, ledger: DeviceLedger, arch: str, reason: str) -> None:
        """Free an idle warm engine on the worker (the ledger has already released it)."""
        await self._call(ledger.index, DeviceCall(op=DeviceOp.drop_engine, arch=arch))
        await self._event("engine_dropped", devices=[ledger.index], reason=reason, detail={"arch": arch})

    # ------------------------------------------------------------ instances

    async def _cold_start(self, ledger: DeviceLedger, info: ModelInfo, instance_id: str, kv: int, reason: str) -> dict:
        started = time.perf_counter()
        if info.name not in ledger.copies:  # room for the copy now; the instance frees more if it must
            need = page_bytes(info.size_bytes // info.tp) - ledger.reclaimable_free_bytes
            for victim in ledger.idle_copies_to_free(info.name, need):
                await self._evict(ledger, victim, f"evicted_for:{info.name}")
            await self._prewarm(ledger, info, reason)
        detail = await self._start_instance(ledger, info, instance_id, kv, reason)
        return {**detail, "cold_start_ms": (time.perf_counter() - started) * 1000}

    async def _start_instance(self, ledger: DeviceLedger, info: ModelInfo, instance_id: str, kv: int,
                              reason: str) -> dict:
        load = self._loads.get((ledger.index, info.name))
        if load is not None:  # promotion of an in-progress prewarm: wait for the weights
            await asyncio.shield(load)
        kv_bytes = instance_kv_bytes(info.kv_bytes_per_token, info.max_model_len, kv or self.settings.kv_cache_bytes)
        engine_bytes = info.size_bytes // info.tp
        room = ledger.room_for_instance(info.name, info.arch, engine_bytes, kv_bytes)
        for arch in room.engines:
            ledger.engines.pop(arch)
            await self._drop_engine(ledger, arch, f"room_for_instance:{info.name}")
        for victim in room.copies:
            await self._evict(ledger, victim, f"evicted_for:{info.name}")
        ledger.start_instance(instance_id, info.name, info.arch, engine_bytes, kv_bytes, time.time())
        await self._event("instance_starting", model=info.name, devices=[ledger.index], instance_id=instance_id,
                          reason=reason)
        started = time.perf_counter()
        result = await self._call(ledger.index, DeviceCall(op=DeviceOp.start_instance, model=info,
                                                           instance_id=instance_id, kv_bytes=kv_bytes))
        if not result.ok:  # the engine's state is unknown: drop it on both sides
            ledger.end_instance(instance_id, time.time(), keep_engine=False)
            await self._drop_engine(ledger, info.arch, "instance_failed")
            await self._event("instance_failed", model=info.name, devices=[ledger.index], instance_id=instance_id,
                              reason=result.reason)
            raise Refused(result.reason)
        ledger.set_instance_state(instance_id, InstanceState.ready)
        detail = {**result.detail, "promote_ms": (time.perf_counter() - started) * 1000, "instance_id": instance_id}
        await self._event("instance_ready", model=info.name, devices=[ledger.index], instance_id=instance_id,
                          reason=reason, detail=detail)
        return detail

    async def _demote(self, ledger: DeviceLedger, instance_id: str, reason: str) -> dict:
        model = ledger.instance.model
        ledger.set_instance_state(instance_id, InstanceState.draining)
        await self._event("instance_draining", model=model, devices=[ledger.index], instance_id=instance_id,
                          reason=reason)
        await self._publish_view()
        started = time.perf_counter()
        await self._call(ledger.index, DeviceCall(op=DeviceOp.stop_instance, instance_id=instance_id,
                                                  drain_timeout_s=self.settings.demote_timeout_s))
        ledger.end_instance(instance_id, time.time())
        if model in ledger.copies:
            ledger.copies[model].last_used_s = time.time()
        await self._event("instance_stopped", model=model, devices=[ledger.index], instance_id=instance_id,
                          reason=reason, detail={"kept_copy": model in ledger.copies})
        return {"instance_id": instance_id, "drain_ms": (time.perf_counter() - started) * 1000}

    # ------------------------------------------------------------ plumbing

    async def _call(self, device: int, call: DeviceCall, timeout_s: float = LONG_CALL_TIMEOUT_S) -> CommandResult:
        return await self.bus.request(self.bus.subjects.device_call(self.node, device), call, CommandResult,
                                      timeout_s=timeout_s)

    async def _refresh_inflight(self) -> None:
        counts: dict[str, int] = {}
        for ledger in self.ledgers:
            if ledger.instance:
                result = await self._call(ledger.index, DeviceCall(op=DeviceOp.status), timeout_s=2.0)
                counts.update(result.detail.get("inflight", {}))
        self.inflight = counts

    def view(self) -> NodeView:
        devices, copies, instances = [], [], []
        for d in self.ledgers:
            devices.append(DeviceView(index=d.index, budget_bytes=d.budget_bytes, free_bytes=d.reclaimable_free_bytes,
                                      idle_engine_bytes=d.idle_engine_bytes,
                                      kind=self.settings.device_kind))
            copies += [CopyView(model=c.model, content_hash=c.content_hash, devices=[d.index], state=c.state,
                                bytes=c.bytes, progress=c.progress) for c in d.copies.values()]
            if d.instance:
                i = d.instance
                instances.append(InstanceView(instance_id=i.instance_id, model=i.model, devices=[d.index],
                                              state=i.state, inflight=self.inflight.get(i.instance_id, 0),
                                              started_at_s=i.started_at_s, kv_bytes=d.engines[i.arch].kv_bytes))
        return NodeView(node=self.node, at_s=time.time(), devices=devices, copies=copies, instances=instances,
                        boot_id=self.boot_id)

    async def _publish_view(self) -> None:
        view = self.view()
        await self.state.put_node_view(view, self.settings.heartbeat_ttl_s)
        await self.bus.publish(self.bus.subjects.agent_heartbeat(), view)

    async def _event(self, name: str, **fields) -> None:
        await self.bus.publish_event("agent", Event(name=name, at_s=time.time(), node=self.node, **fields))
