"""GPU agent shell: executes placer commands on this node's devices and reports observed state.

Commands (prewarm / evict / promote / demote / cold_start) arrive by request/reply, are
idempotent by command id and are answered when done (or refused with a reason). The ledger
core decides memory; device workers do the work; every change is an event, and a NodeView is
written to Redis with a TTL'd liveness key each heartbeat. A restarted agent adopts the device
workers still running (their instances never stopped serving): it rebuilds each one's ledger from
its status and publishes the view at once; devices without one get a new worker. Every worker is
called each heartbeat, which keeps it from its orphan timeout. Registry events keep the idle engines
in line with the registered architectures while the agent runs (core.engines). A dead device worker costs only its
device: its instance is reported failed, it is started again (with backoff) and warmed again.
Redis or NATS failures never abort a command: the next heartbeat writes the whole view again.
/readyz is ready only while every device worker is up.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict

from services.gpuagent.core.adoption import adopted_ledger
from services.gpuagent.core.engines import engine_models, kept_arch, stale_engines
from services.gpuagent.core.ledger import DeviceLedger, Refused, copy_origin, instance_kv_bytes, page_bytes
from services.gpuagent.metrics import AgentMetrics
from services.gpuagent.workers import DeviceWorkers, describe_exit
from shared.runner import Service, every
from shared.schemas import (AgentCommand, CommandKind, CommandResult, CopyState, CopyView, DeviceCall,
                            DeviceOp, DeviceView, Event, InstanceState, InstanceView, ModelInfo, NodeView)
REGISTRY_CHANGES = ("model_registered", "model_removed")
from shared.state import StateError


REMEMBERED_COMMANDS = 10_000
LONG_CALL_TIMEOUT_S = 900.0
STATUS_TIMEOUT_S = 2.0
WORKER_WATCH_S = 0.5  # a dead device worker is noticed within this (and reported at once)


class AgentService(Service):
    name = "gpuagent"

    def __init__(self, settings):
        super().__init__(settings)
        self.node = settings.node
        self.boot_id = uuid.uuid4().hex[:12]
        self.metrics = AgentMetrics(self.node)
        self.ledgers: list[DeviceLedger] = []
        self.workers: DeviceWorkers | None = None
        self.inflight: dict[str, int] = {}
        self._commands: OrderedDict[str, asyncio.Future] = OrderedDict()
        self._loads: dict[tuple[int, str], asyncio.Future] = {}
        self._prewarm_slots = asyncio.Semaphore(settings.max_parallel_prewarms)
        self._ready = False
        self._stopping = False
        self._warming: asyncio.Task | None = None  # the engines' sync with the registry (_sync_engines)
        self._engines_stale = False  # the registry changed during that sync: it runs once more
        self._registered: dict[str, ModelInfo] = {}  # the registry as the last engine sync read it
        self._unwarmed: set[int] = set()  # devices that want every registered architecture's engine
        self._revivals: dict[int, asyncio.Task] = {}  # device -> its worker's restart (and warming)
        self._view_lock = asyncio.Lock()  # view writes one at a time, so the last one written is the newest
        self._view_changes = 0  # _publish_view calls so far
        self._view_covered = 0  # of those, how many the last view written (or tried) had seen

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        s = self.settings
        await self.bus.ensure_event_stream()
        self.workers = DeviceWorkers(s, self.bus, self.log, self.boot_id)
        adopted = await self._adopt_workers()
        started = asyncio.Event()  # until then, heartbeats keep adopted workers and their instances alive
        heartbeats = asyncio.create_task(every(s.heartbeat_s, started, self._heartbeat, self.log,
                                               "heartbeat_failed")) if adopted else None
        try:
            budgets = await self.workers.start_missing()
        finally:
            started.set()
            if heartbeats:
                await heartbeats
        for index, budget in budgets.items():
            self.ledgers[index] = DeviceLedger(index, budget)
        self.log.info("device_workers_ready", devices=len(self.ledgers), adopted=adopted, budgets=budgets)
        await self._publish_view()
        await self.bus.subscribe(self.bus.subjects.agent_command(self.node), AgentCommand, self.on_command)
        await self.bus.subscribe(self.bus.subjects.domain_events("registry"), Event, self.on_registry_event)
        self._ready = True
        await self._event("agent_started", detail={"devices": len(self.ledgers), "engine": s.engine,
                                                   "boot_id": self.boot_id})
        self._unwarmed = set(range(len(self.ledgers)))
        self._sync_engines()

    async def _adopt_workers(self) -> list[int]:
        """Adopt the device workers a previous agent left running: their ledgers rebuilt from their
        status and published at once (their instances never stopped serving). Devices without one
        get a ledger of budget 0 until their new worker says its budget. The adopted devices."""
        adopted = await self.workers.adopt(self._device_count())
        self.ledgers = [adopted_ledger(i, adopted[i], time.time()) if i in adopted else DeviceLedger(i, 0)
                        for i in range(len(self.workers.workers))]
        if not adopted:
            await self.state.drop_node(self.node)  # whatever a previous boot left: we hold nothing yet
            return []
        self.inflight = {i: n for status in adopted.values() for i, n in status["inflight"].items()}
        await self._publish_view()
        for index, status in sorted(adopted.items()):
            ledger = self.ledgers[index]
            await self._event("device_worker_adopted", devices=[index],
                              instance_id=ledger.instance.instance_id if ledger.instance else "",
                              detail={"pid": status["pid"], "copies": sorted(ledger.copies),
                                      "engines": sorted(ledger.engines)})
        return sorted(adopted)

    async def on_registry_event(self, event: Event) -> None:
        if event.name in REGISTRY_CHANGES:
            self._sync_engines()

    def _sync_engines(self) -> asyncio.Task | None:
        """Bring the idle engines in line with the registry, in the background (commands are served
        meanwhile): one sync at a time; a call during one makes it run once more. Its task."""
        if self._stopping:
            return None
        self._engines_stale = True
        if self._warming is None or self._warming.done():
            self._warming = asyncio.create_task(self._engines_loop())
        return self._warming

    async def _engines_loop(self) -> None:
        while self._engines_stale and not self._stopping:
            self._engines_stale = False
            try:
                await self._sync_engines_once()
            except StateError as exc:  # the next registry change or revival tries again
                self.log.warning("engine_sync_failed", reason=str(exc))

    async def _sync_engines_once(self) -> None:
        """Drop the idle engines of architectures no longer registered; with device prewarming, warm
        one idle engine per architecture that is new since the last sync on every device where it
        fits, and every architecture's on the devices in _unwarmed (started or restarted); smaller
        architectures first."""
        known = self._archs
        self._registered = await self.state.models()
        models = list(self._registered.values())
        kept = kept_arch(models)
        for ledger in self.ledgers:
            ledger.kept_arch = kept
        fresh, self._unwarmed = self._unwarmed, set()
        for ledger in self.ledgers:
            for arch in stale_engines(ledger, self._archs) if self.workers.is_up(ledger.index) else ():
                ledger.engines.pop(arch)
                await self._drop_engine(ledger, arch, "unregistered")
                await self._publish_view()
        if not self.settings.warm_engines:
            return
        for info in engine_models(models):
            kv = instance_kv_bytes(info.kv_bytes_per_token, info.max_model_len, self.settings.kv_cache_bytes)
            for ledger in self.ledgers:
                if info.arch in known and ledger.index not in fresh:
                    continue
                if self._stopping or not ledger.reserve_engine(info.arch, kv, time.time()):
                    continue
                result = await self._call(ledger.index, DeviceCall(op=DeviceOp.warm_engine, model=info, kv_bytes=kv))
                if not result.ok:
                    ledger.engines.pop(info.arch, None)
                    self.log.warning("engine_warm_failed", device=ledger.index, arch=info.arch, reason=result.reason)
                    continue
                await self._event("engine_warmed", devices=[ledger.index], model=info.name,
                                  detail={"arch": info.arch, **result.detail})
                await self._publish_view()

    @property
    def _archs(self) -> set[str]:
        """The registered architectures as the last engine sync read them."""
        return {m.arch for m in self._registered.values()}

    def is_ready(self) -> bool:
        """Ready while every device worker is up: a node with a restarting worker serves from its
        other devices, but says it is not whole."""
        return self._ready and self.workers.all_up()

    def _device_count(self) -> int:
        if self.settings.device_kind == "cuda":
            import torch

            return torch.cuda.device_count()
        return self.settings.devices

    async def run(self, stopping: asyncio.Event) -> None:
        await asyncio.gather(
            every(self.settings.heartbeat_s, stopping, self._heartbeat, self.log, "heartbeat_failed"),
            every(WORKER_WATCH_S, stopping, self._watch_workers, self.log, "worker_watch_failed"))

    async def _heartbeat(self) -> None:
        await self._refresh_status()
        await self._publish_view()

    # ------------------------------------------------------------ device workers

    async def _watch_workers(self) -> None:
        """Report dead workers (reaped) and start again those whose backoff is over."""
        if self._stopping:
            return
        now = time.monotonic()
        for index, code in self.workers.reap(now):
            await self._worker_died(index, code)
        for index in self.workers.due(now):
            self._revivals[index] = asyncio.create_task(self._revive(index))

    async def _worker_died(self, index: int, code: int | None) -> None:
        """Its copies, engines and instance died with it: a fresh ledger, the instance reported failed.
        Commands still running on the old ledger finish on it, unseen (their device calls fail)."""
        lost = self.ledgers[index]
        self.ledgers[index] = DeviceLedger(index, lost.budget_bytes)
        self.metrics.worker_died(index)
        instance = lost.instance
        self.log.error("device_worker_died", device=index, exit_code=code, copies=sorted(lost.copies),
                       instance_id=instance.instance_id if instance else "")
        reason = f"device {index} worker {describe_exit(code)}"
        if instance:
            await self._event("instance_failed", model=instance.model, devices=[index],
                              instance_id=instance.instance_id, reason=reason)
        await self._event("device_worker_died", devices=[index], reason=reason,
                          detail={"copies": sorted(lost.copies), "engines": sorted(lost.engines)})
        await self._publish_view()

    async def _revive(self, index: int) -> None:
        """Start the device's worker again, then warm its engines again (device prewarming)."""
        try:
            budget = await self.workers.restart(index)
            if budget is None:  # died again: the watch tries again after a longer pause
                self.log.warning("device_worker_restart_failed", device=index)
                return
            self.ledgers[index] = DeviceLedger(index, budget)
            await self._event("device_worker_restarted", devices=[index], detail={"pid": self.workers.pid(index)})
            await self._publish_view()
            self._unwarmed.add(index)
            sync = self._sync_engines()
            if sync:
                await asyncio.shield(sync)
        except Exception:  # never leave a device dead silently
            self.log.exception("device_revive_failed", device=index)
        finally:
            if self._revivals.get(index) is asyncio.current_task():  # not a later revival of the device
                del self._revivals[index]

    async def stop(self) -> None:
        self._ready = False
        self._stopping = True
        for task in self._revivals.values():
            task.cancel()
        await asyncio.gather(*[t for t in (self._warming, *self._revivals.values()) if t], return_exceptions=True)
        for ledger in self.ledgers:
            if ledger.instance:
                await self._demote(ledger, ledger.instance.instance_id, "agent_stopping")
        await self.workers.stop()
        async with self._view_lock:  # after any view write under way, which would bring the view back
            try:
                await self.state.drop_node(self.node)
            except StateError as exc:  # the view expires with its liveness key
                self.log.warning("node_view_drop_failed", reason=str(exc))
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
        except (Refused, StateError) as exc:
            detail, ok = {}, False
            reason = str(exc) if isinstance(exc, Refused) else f"state store unavailable: {exc}"  # registry read
            await self._event("command_refused", model=cmd.model, devices=cmd.devices, reason=reason,
                              detail={"command": cmd.kind.value, "command_id": cmd.command_id})
        result = CommandResult(command_id=cmd.command_id, ok=ok, reason=reason, detail=detail,
                               duration_ms=(time.perf_counter() - started) * 1000)
        self.metrics.command_done(cmd.kind.value, ok, result.duration_ms / 1000)
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
        if cmd.kind == CommandKind.evict:  # needs no registry entry: a removed model's copies are evicted too
            return {"devices": [await self._evict(d, cmd.model, cmd.reason or "placer")
                                for d in self._ledgers_for(cmd.devices)]}
        info = await self._model_info(cmd)
        if info is None:
            raise Refused(f"unknown model {cmd.model!r}")
        ledgers = self._ledgers_for(cmd.devices)
        if cmd.kind == CommandKind.prewarm:
            return {"devices": [await self._prewarm(d, info, cmd.reason) for d in ledgers]}
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

    async def _model_info(self, cmd: AgentCommand) -> ModelInfo | None:
        """The registry's entry for the command's model. A promotion, the command a burst waits on,
        skips the state store when the entry the last engine sync read is the one its copy was loaded
        from (same content hash)."""
        known = self._registered.get(cmd.model)
        if cmd.kind == CommandKind.promote and known is not None and any(
                copy.content_hash == known.content_hash for copy in self._copies_of(cmd.model)):
            return known
        return await self.state.model(cmd.model)

    def _copies_of(self, model: str):
        return (ledger.copies[model] for ledger in self.ledgers if model in ledger.copies)

    def _ledgers_for(self, devices: list[int]) -> list[DeviceLedger]:
        if not devices:
            raise Refused("no devices given")
        bad = [d for d in devices if not 0 <= d < len(self.ledgers)]
        if bad or len(set(devices)) != len(devices):
            raise Refused(f"bad device list {devices}: this node has devices 0..{len(self.ledgers) - 1}")
        down = [d for d in devices if not self.workers.is_up(d)]
        if down:
            raise Refused(f"device {down[0]} is down: its worker died and is being restarted")
        return [self.ledgers[d] for d in devices]

    # ------------------------------------------------------------ copies

    async def _prewarm(self, ledger: DeviceLedger, info: ModelInfo, reason: str) -> dict:
        key = (ledger.index, info.name)
        if key in self._loads:  # same copy already loading: wait for that load
            return await asyncio.shield(self._loads[key])
        engines = ledger.reserve_copy(info.name, info.content_hash, info.size_bytes // info.tp, time.time(),
                                      copy_origin(reason))
        if engines is None:
            return {"device": ledger.index, "already": True}
        # known as loading from the moment the ledger books it: a promotion meanwhile waits for it
        future = asyncio.ensure_future(self._load(ledger, info, reason, engines))
        self._loads[key] = future
        try:
            return await asyncio.shield(future)
        finally:
            self._loads.pop(key, None)

    async def _load(self, ledger: DeviceLedger, info: ModelInfo, reason: str, engines: list[str]) -> dict:
        """Drop the idle engines the ledger gave up for the copy's room, then load it."""
        for arch in engines:
            await self._drop_engine(ledger, arch, f"room_for_copy:{info.name}")
        await self._event("prewarm_started", model=info.name, devices=[ledger.index], reason=reason)
        async with self._prewarm_slots:
            result = await self._call(ledger.index, DeviceCall(op=DeviceOp.load_copy, model=info))
        if not result.ok:
            ledger.copies.pop(info.name, None)
            await self._event("prewarm_failed", model=info.name, devices=[ledger.index], reason=result.reason)
            raise Refused(result.reason)
        ledger.copy_ready(info.name)
        self.metrics.prewarm_done(info.size_bytes // info.tp, result.duration_ms / 1000)
        await self._event("prewarm_finished", model=info.name, devices=[ledger.index], reason=reason,
                          detail={"duration_ms": round(result.duration_ms, 1), **result.detail})
        return {"device": ledger.index, "duration_ms": result.duration_ms}

    async def _evict(self, ledger: DeviceLedger, model: str, reason: str) -> dict:
        load = self._loads.get((ledger.index, model))
        if load is not None:  # let it land, then evict: a refusal would cost the placer a retry (1 s)
            await asyncio.wait({load})
        if model not in ledger.copies:
            return {"device": ledger.index, "absent": True}
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
        start = ledger.start_kind(info.name, (ledger.index, info.name) in self._loads)
        if info.name not in ledger.copies:  # room for the copy now; the instance frees more if it must
            need = page_bytes(info.size_bytes // info.tp) - ledger.reclaimable_free_bytes
            for victim in ledger.idle_copies_to_free(info.name, need):
                await self._evict(ledger, victim, f"evicted_for:{info.name}")
            await self._prewarm(ledger, info, reason)
        detail = await self._start_instance(ledger, info, instance_id, kv, reason, start)
        return {**detail, "cold_start_ms": (time.perf_counter() - started) * 1000}

    async def _start_instance(self, ledger: DeviceLedger, info: ModelInfo, instance_id: str, kv: int,
                              reason: str, start: str = "") -> dict:
        """`start`: what the instance found (ledger.START_KINDS); by default what is on the device now."""
        load = self._loads.get((ledger.index, info.name))
        start = start or ledger.start_kind(info.name, load is not None)
        if load is not None:  # promotion of an in-progress prewarm: wait for the weights
            await asyncio.shield(load)
        kv_bytes = instance_kv_bytes(info.kv_bytes_per_token, info.max_model_len, kv or self.settings.kv_cache_bytes)
        room = ledger.room_for_instance(info.name, info.arch, kv_bytes)
        for arch in room.engines:
            ledger.engines.pop(arch)
            await self._drop_engine(ledger, arch, f"room_for_instance:{info.name}")
        for victim in room.copies:
            await self._evict(ledger, victim, f"evicted_for:{info.name}")
        ledger.start_instance(instance_id, info.name, info.arch, kv_bytes, time.time())
        await self._event("instance_starting", model=info.name, devices=[ledger.index], instance_id=instance_id,
                          reason=reason, detail={"start": start})
        started = time.perf_counter()
        ready = Event(name="instance_ready", at_s=0.0, node=self.node, model=info.name, devices=[ledger.index],
                      instance_id=instance_id, reason=reason, detail={"start": start})
        result = await self._call(ledger.index, DeviceCall(op=DeviceOp.start_instance, model=info,
                                                           instance_id=instance_id, kv_bytes=kv_bytes,
                                                           ready_event=ready))
        if not result.ok:  # the engine's state is unknown: drop it on both sides
            ledger.end_instance(instance_id, time.time(), keep_engine=False)
            await self._drop_engine(ledger, info.arch, "instance_failed")
            await self._event("instance_failed", model=info.name, devices=[ledger.index], instance_id=instance_id,
                              reason=result.reason)
            raise Refused(result.reason)
        ledger.set_instance_state(instance_id, InstanceState.ready)
        return {**result.detail, "promote_ms": (time.perf_counter() - started) * 1000, "instance_id": instance_id,
                "start": start}  # the worker published instance_ready

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
        if stale_engines(ledger, self._archs):  # its model was unregistered: its engine goes too
            self._sync_engines()
        await self._event("instance_stopped", model=model, devices=[ledger.index], instance_id=instance_id,
                          reason=reason, detail={"kept_copy": model in ledger.copies})
        return {"instance_id": instance_id, "drain_ms": (time.perf_counter() - started) * 1000}

    # ------------------------------------------------------------ plumbing

    async def _call(self, device: int, call: DeviceCall, timeout_s: float = LONG_CALL_TIMEOUT_S) -> CommandResult:
        """The worker's answer; a failed result (never an exception) if it is down, dies meanwhile or
        does not answer in time."""
        def failed(reason: str) -> CommandResult:
            return CommandResult(command_id=call.op.value, ok=False, reason=reason)

        if not self.workers.is_up(device):
            return failed(f"device {device} is down: its worker died and is being restarted")
        lost = self.workers.lost(device)
        call = call.model_copy(update={"agent_boot_id": self.boot_id})  # keeps the worker from its orphan timeout
        request = asyncio.ensure_future(self.bus.request(self.bus.subjects.device_call(self.node, device), call,
                                                         CommandResult, timeout_s=timeout_s))
        try:
            await asyncio.wait({request, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not request.done():
                request.cancel()
        if not request.done() or request.cancelled():
            return failed(f"device {device} worker {describe_exit(lost.result())} during {call.op.value}")
        error = request.exception()
        if error is not None:  # BusError, or a NATS error while the connection is down
            return failed(f"device {device} did not answer {call.op.value}: {type(error).__name__}: {error}")
        return request.result()

    async def _refresh_status(self) -> None:
        """Call every worker that is up (an agent's calls keep it from its orphan timeout) and note the
        requests in flight per instance; a device that does not answer is left out, not fatal."""
        ledgers = [ledger for ledger in self.ledgers if self.workers.is_up(ledger.index)]
        results = await asyncio.gather(*[self._call(ledger.index, DeviceCall(op=DeviceOp.status),
                                                    timeout_s=STATUS_TIMEOUT_S) for ledger in ledgers])
        counts: dict[str, int] = {}
        for ledger, result in zip(ledgers, results):
            if result.ok:
                counts.update(result.detail.get("inflight", {}))
            else:
                self.log.warning("device_status_failed", device=ledger.index, reason=result.reason)
        self.inflight = counts

    def view(self) -> NodeView:
        devices, copies, instances = [], [], []
        for d in self.ledgers:
            up = self.workers.is_up(d.index)  # a down device offers no room until its worker is back
            devices.append(DeviceView(index=d.index, budget_bytes=d.budget_bytes,
                                      free_bytes=d.reclaimable_free_bytes if up else 0,
                                      idle_engine_bytes=d.idle_engine_bytes, kind=self.settings.device_kind))
            copies += [CopyView(model=c.model, content_hash=c.content_hash, devices=[d.index], state=c.state,
                                bytes=c.bytes, progress=c.progress, origin=c.origin) for c in d.copies.values()]
            if d.instance:
                i = d.instance
                instances.append(InstanceView(instance_id=i.instance_id, model=i.model, devices=[d.index],
                                              state=i.state, inflight=self.inflight.get(i.instance_id, 0),
                                              started_at_s=i.started_at_s, kv_bytes=d.engines[i.arch].bytes))
        return NodeView(node=self.node, at_s=time.time(), devices=devices, copies=copies, instances=instances,
                        boot_id=self.boot_id)

    async def _publish_view(self) -> None:
        """Write the whole view to Redis and announce it, as it is after the caller's change. Writes go
        one at a time (two at once could land in either order, leaving an older view last); a caller
        whose change a later-built view already covered returns at once. Never fails: what does not
        land now is written by the next heartbeat, which keeps trying while Redis is down."""
        self._view_changes += 1
        change = self._view_changes
        async with self._view_lock:
            if self._view_covered >= change:
                return
            self._view_covered = self._view_changes
            view = self.view()
            self.metrics.observe(view, self.ledgers)
            try:
                await self.state.put_node_view(view, self.settings.heartbeat_ttl_s)
            except StateError as exc:
                self.log.warning("node_view_write_failed", reason=str(exc))
            await self.bus.best_effort(self.bus.publish(self.bus.subjects.agent_heartbeat(), view), "heartbeat")

    async def _event(self, name: str, **fields) -> None:
        event = Event(name=name, at_s=time.time(), node=self.node, **fields)
        await self.bus.best_effort(self.bus.publish_event("agent", event), name)  # the next view supersedes it
