"""Device workers of one agent: start them, notice and reap the dead, start them again with backoff.

vLLM workers (and fake ones with `fake_worker_processes`) are child processes; other fake workers
run in the agent's process and never die. Knows nothing of ledgers or commands: it says which
workers are up, which died (reaped, with their exit code) and resolves a future at each death.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

from services.gpuagent.core.restarts import RestartPolicy, WorkerLife
from services.gpuagent.engine_fake import FakeHost
from services.gpuagent.worker import DeviceWorker
from shared.bus import Bus, BusError
from shared.schemas import CommandResult, DeviceCall, DeviceOp

START_TIMEOUT_S = 300.0  # vLLM import and device initialisation
START_POLL_S = 0.2
STOP_TIMEOUT_S = 3.0
STABLE_S = 60.0  # a worker up this long is healthy: its next death restarts it after the base delay


@dataclass
class Worker:
    index: int
    proc: subprocess.Popen | None = None  # None: in-process (fake engine)
    inproc: DeviceWorker | None = None
    up: bool = False
    restart_at_s: float | None = None  # monotonic; set while dead and waiting for its restart
    lost: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    life: WorkerLife = field(default_factory=WorkerLife)


class DeviceWorkers:
    def __init__(self, settings, bus: Bus, log):
        self.settings, self.bus, self.log = settings, bus, log
        self.policy = RestartPolicy(settings.worker_restart_s, settings.worker_restart_max_s, STABLE_S)
        self.workers: list[Worker] = []

    @property
    def processes(self) -> bool:
        return self.settings.engine == "vllm" or self.settings.fake_worker_processes

    def is_up(self, index: int) -> bool:
        return 0 <= index < len(self.workers) and self.workers[index].up

    def all_up(self) -> bool:
        return all(w.up for w in self.workers)

    def lost(self, index: int) -> asyncio.Future:
        """Resolves with the exit code when the current worker of `index` dies."""
        return self.workers[index].lost

    def pid(self, index: int) -> int | None:
        proc = self.workers[index].proc
        return proc.pid if proc else None

    # ------------------------------------------------------------ start

    async def start(self, count: int) -> list[int]:
        """Start one worker per device and wait for all; return each device's memory budget.
        A worker that fails to start at boot fails the boot."""
        self.workers = [Worker(i) for i in range(count)]
        if not self.processes:
            return [await self._start_inproc(w) for w in self.workers]
        for w in self.workers:
            self._spawn(w)
        budgets = []
        for w in self.workers:
            budget = await self._wait_ready(w)
            if budget is None:
                await self.stop()
                raise RuntimeError(f"device worker {w.index} did not start (exit code {w.proc.returncode})")
            budgets.append(budget)
        return budgets

    async def _start_inproc(self, w: Worker) -> int:
        s = self.settings  # own connection, as a worker process would have
        bus = await Bus.connect(s, f"gpuagent-{s.node}-dev{w.index}")
        w.inproc = DeviceWorker(bus, s, w.index, FakeHost(s.fake_load_bytes_s, s.fake_token_s), s.device_memory_bytes)
        await w.inproc.start()
        w.up = True
        return s.device_memory_bytes

    def _spawn(self, w: Worker) -> None:
        s = self.settings
        env = dict(os.environ, **s.as_env())
        if s.device_kind == "cuda":
            env["CUDA_VISIBLE_DEVICES"] = str(w.index)  # each worker sees its own GPU as cuda:0
        w.proc = subprocess.Popen(  # worker logs (and vLLM's) go to our stderr
            [sys.executable, "-m", "services.gpuagent.worker", "--device-index", str(w.index),
             "--parent-pid", str(os.getpid())], env=env,
            stdout=sys.stderr, start_new_session=True)  # we stop workers ourselves, after draining
        w.life.started(time.monotonic())
        w.lost = asyncio.get_running_loop().create_future()
        self.log.info("device_worker_spawned", device=w.index, pid=w.proc.pid)

    async def _wait_ready(self, w: Worker) -> int | None:
        """Until the worker answers (vLLM imported, device initialised): its budget, or None if it
        exited or hung (then it is killed, reaped and counted as a crash)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        call = DeviceCall(op=DeviceOp.status)
        subject = self.bus.subjects.device_call(self.settings.node, w.index)
        while w.proc.poll() is None and time.monotonic() < deadline:
            try:
                status = await self.bus.request(subject, call, CommandResult, timeout_s=1.0)
            except BusError:
                await asyncio.sleep(START_POLL_S)
                continue
            w.up = True
            self.log.info("device_worker_ready", device=w.index, pid=w.proc.pid)
            return status.detail["memory_bytes"]
        if w.proc.poll() is None:
            w.proc.kill()
            await asyncio.to_thread(w.proc.wait)
        self._died(w, time.monotonic())
        return None

    # ------------------------------------------------------------ watch

    def reap(self, now_s: float) -> list[tuple[int, int]]:
        """(device, exit code) of each worker that was up and has exited since the last call;
        the exit is collected (no zombie) and the worker's restart is scheduled."""
        dead = []
        for w in self.workers:
            if w.up and w.proc is not None and w.proc.poll() is not None:
                self._died(w, now_s)
                dead.append((w.index, w.proc.returncode))
        return dead

    def _died(self, w: Worker, now_s: float) -> None:
        w.up = False
        w.restart_at_s = w.life.died(now_s, self.policy)
        if not w.lost.done():
            w.lost.set_result(w.proc.returncode)

    def due(self, now_s: float) -> list[int]:
        """Dead workers whose restart delay is over; each is returned once per death."""
        found = [w.index for w in self.workers if w.restart_at_s is not None and w.restart_at_s <= now_s]
        for index in found:
            self.workers[index].restart_at_s = None
        return found

    async def restart(self, index: int) -> int | None:
        """Start device `index`'s worker again; its budget once it answers, None if it died again."""
        w = self.workers[index]
        self._spawn(w)
        return await self._wait_ready(w)

    # ------------------------------------------------------------ stop

    async def stop(self) -> None:
        for w in self.workers:
            w.up = False
            if w.inproc is not None:
                await w.inproc.close()
            elif w.proc is not None and w.proc.poll() is None:
                w.proc.terminate()
        for w in self.workers:
            if w.proc is None:
                continue
            try:
                await asyncio.to_thread(w.proc.wait, STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.log.warning("device_worker_killed", device=w.index, pid=w.proc.pid)
                w.proc.kill()
                await asyncio.to_thread(w.proc.wait)
