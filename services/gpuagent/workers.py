"""Device workers of one agent: adopt those a previous agent left running, start the missing ones,
notice the dead and start them again with backoff.

vLLM workers (and fake ones with `fake_worker_processes`) are processes. Those this agent started
are its children and reaped here; adopted ones are watched by pid (their exit is collected by their
parent now: `warmserve up`, a child subreaper, or the container's init). Other fake workers run in
the agent's process and never die. Knows nothing of ledgers or commands: it says which workers are
up, which died (with their exit code when known) and resolves a future at each death.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from services.gpuagent.core.restarts import RestartPolicy, WorkerLife
from services.gpuagent.engine_fake import FakeHost
from services.gpuagent.worker import DeviceWorker
from shared.bus import Bus, BusError
from shared.schemas import CommandResult, DeviceCall, DeviceOp

START_TIMEOUT_S = 300.0  # vLLM import and device initialisation
START_POLL_S = 0.2
STOP_TIMEOUT_S = 3.0
STABLE_S = 60.0  # a worker up this long is healthy: its next death restarts it after the base delay
ADOPT_TIMEOUT_S = 1.0  # a worker left running answers its status call within this
SETTLE_TIMEOUT_S = 60.0  # a worker still busy with a dead agent's calls after this is replaced, not adopted
SETTLE_POLL_S = 0.1


@dataclass(frozen=True)
class Adopted:
    """A worker process a previous agent started: known by pid and start time (a reused pid is not it)."""

    pid: int
    start_ticks: int


@dataclass
class Worker:
    index: int
    proc: subprocess.Popen | None = None  # a process this agent started (its child)
    adopted: Adopted | None = None  # a process a previous agent started
    inproc: DeviceWorker | None = None  # in-process (fake engine)
    up: bool = False
    restart_at_s: float | None = None  # monotonic; set while dead and waiting for its restart
    lost: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    life: WorkerLife = field(default_factory=WorkerLife)


def start_ticks(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot); None if it is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else int(fields[19])


def describe_exit(code: int | None) -> str:
    """How a dead worker ended, as far as this agent can know."""
    return f"exited with code {code}" if code is not None else "exited (adopted: its exit code went to its parent)"


class DeviceWorkers:
    def __init__(self, settings, bus: Bus, log, boot_id: str):
        self.settings, self.bus, self.log, self.boot_id = settings, bus, log, boot_id
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
        """Resolves with the exit code (None if unknown) when the current worker of `index` dies."""
        return self.workers[index].lost

    def pid(self, index: int) -> int | None:
        w = self.workers[index]
        return w.proc.pid if w.proc else w.adopted.pid if w.adopted else None

    # ------------------------------------------------------------ adopt and start

    async def adopt(self, count: int) -> dict[int, dict]:
        """Ask each of `count` devices whether a worker is still there (left by a previous agent) and
        adopt those that answer, once they have finished what they were doing: their status details."""
        self.workers = [Worker(i) for i in range(count)]
        if not self.processes:  # in-process workers died with their agent
            return {}
        found = await asyncio.gather(*(self._adopt(w) for w in self.workers))
        return {w.index: status for w, status in zip(self.workers, found) if status is not None}

    async def _adopt(self, w: Worker) -> dict | None:
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while (status := await self._status(w.index, ADOPT_TIMEOUT_S)) is not None and status["busy"]:
            if time.monotonic() > deadline:  # a dead agent's call that never ends: start afresh
                self.log.warning("device_worker_unsettled", device=w.index, pid=status["pid"], busy=status["busy"])
                ticks = start_ticks(status["pid"])
                if ticks is not None:
                    await self._end_adopted(w, Adopted(status["pid"], ticks))
                return None
            await asyncio.sleep(SETTLE_POLL_S)
        ticks = None if status is None else start_ticks(status["pid"])
        if ticks is None:
            return None
        w.adopted, w.up = Adopted(status["pid"], ticks), True
        w.life.started(time.monotonic())
        self.log.info("device_worker_adopted", device=w.index, pid=status["pid"])
        return status

    async def start_missing(self) -> dict[int, int]:
        """Start a worker for each device without one and wait for all: each one's memory budget.
        A worker that fails to start at boot fails the boot (adopted ones are left running)."""
        missing = [w for w in self.workers if not w.up]
        if not self.processes:
            return {w.index: await self._start_inproc(w) for w in missing}
        for w in missing:
            self._spawn(w)
        budgets = {}
        for w in missing:
            budget = await self._wait_ready(w)
            if budget is None:
                await self.stop(missing)
                raise RuntimeError(f"device worker {w.index} did not start (exit code {w.proc.returncode})")
            budgets[w.index] = budget
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
            [sys.executable, "-m", "services.gpuagent.worker", "--device-index", str(w.index)], env=env,
            stdout=sys.stderr, start_new_session=True)  # we stop workers ourselves, after draining
        w.adopted = None
        w.life.started(time.monotonic())
        w.lost = asyncio.get_running_loop().create_future()
        self.log.info("device_worker_spawned", device=w.index, pid=w.proc.pid)

    async def _status(self, index: int, timeout_s: float) -> dict | None:
        """The status detail of device `index`'s worker; None if none answers."""
        call = DeviceCall(op=DeviceOp.status, agent_boot_id=self.boot_id)
        subject = self.bus.subjects.device_call(self.settings.node, index)
        try:
            result = await self.bus.request(subject, call, CommandResult, timeout_s=timeout_s)
        except BusError:
            return None
        return result.detail if result.ok else None

    async def _wait_ready(self, w: Worker) -> int | None:
        """Until the worker answers (vLLM imported, device initialised): its budget, or None if it
        exited or hung (then it is killed, reaped and counted as a crash)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while w.proc.poll() is None and time.monotonic() < deadline:
            status = await self._status(w.index, 1.0)
            if status is None:
                await asyncio.sleep(START_POLL_S)
                continue
            w.up = True
            self.log.info("device_worker_ready", device=w.index, pid=w.proc.pid)
            return status["memory_bytes"]
        if w.proc.poll() is None:
            w.proc.kill()
            await asyncio.to_thread(w.proc.wait)
        self._died(w, time.monotonic())
        return None

    # ------------------------------------------------------------ watch

    def reap(self, now_s: float) -> list[tuple[int, int | None]]:
        """(device, exit code or None) of each worker that was up and has exited since the last call;
        a child's exit is collected (no zombie) and the worker's restart is scheduled."""
        dead = []
        for w in self.workers:
            if w.up and self._exited(w):
                self._died(w, now_s)
                dead.append((w.index, w.lost.result()))
        return dead

    @staticmethod
    def _exited(w: Worker) -> bool:
        if w.proc is not None:
            return w.proc.poll() is not None
        return w.adopted is not None and start_ticks(w.adopted.pid) != w.adopted.start_ticks

    def _died(self, w: Worker, now_s: float) -> None:
        w.up = False
        w.restart_at_s = w.life.died(now_s, self.policy)
        if not w.lost.done():
            w.lost.set_result(w.proc.returncode if w.proc else None)

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

    async def stop(self, workers: list[Worker] | None = None) -> None:
        """Stop `workers` (all by default): SIGTERM, SIGKILL after STOP_TIMEOUT_S."""
        await asyncio.gather(*(self._end(w) for w in (self.workers if workers is None else workers)))

    async def _end(self, w: Worker) -> None:
        w.up = False
        if w.inproc is not None:
            await w.inproc.close()
        elif w.adopted is not None:
            await self._end_adopted(w, w.adopted)
        elif w.proc is not None and w.proc.poll() is None:
            w.proc.terminate()
            try:
                await asyncio.to_thread(w.proc.wait, STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.log.warning("device_worker_killed", device=w.index, pid=w.proc.pid)
                w.proc.kill()
                await asyncio.to_thread(w.proc.wait)

    async def _end_adopted(self, w: Worker, adopted: Adopted) -> None:
        """Signal a process that is not our child until it has exited (its parent reaps it)."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if start_ticks(adopted.pid) != adopted.start_ticks:
                return
            if sig == signal.SIGKILL:
                self.log.warning("device_worker_killed", device=w.index, pid=adopted.pid)
            try:
                os.kill(adopted.pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + STOP_TIMEOUT_S
            while start_ticks(adopted.pid) == adopted.start_ticks and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
