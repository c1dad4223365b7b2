"""Sends the core's effects to agents: a chain of commands per node, in order, each with an
idempotent command id reused on every retry; a chain also waits for demotes ordered on its node
by earlier chains (as the simulator's shell does: a node's commands queue behind a drain). Effects
stay pending (overlaid on observations) until an observation taken after they finished; a failed
command ends its chain.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import Callable

from services.placer.adapter import command_for
from services.placer.core import ColdStart, Demote, Effect, Evict, Promote
from shared.bus import Bus, BusError
from shared.logs import get_logger
from shared.schemas import CommandResult, Event

LONG_COMMAND_S = 600.0  # loads and drains may take minutes; each retry re-awaits the same execution
SHORT_COMMAND_S = 30.0
MAX_BACKOFF_S = 2.0

log = get_logger("placer")


@dataclass
class Pending:
    node: str
    effect: Effect
    done_at_s: float | None = None  # set when the agent answered ok


class Dispatcher:
    def __init__(self, bus: Bus, attempt_timeout_s: float, node_alive: Callable[[str], bool]):
        self.bus = bus
        self.attempt_timeout_s = attempt_timeout_s
        self.node_alive = node_alive
        self.pending: dict[str, Pending] = {}
        self.demotes: dict[str, list[asyncio.Event]] = {}  # node -> demotes ordered, not yet answered
        self.tasks: set[asyncio.Task] = set()

    def overlay(self, observed_at_s: float) -> list[Effect]:
        """Effects an observation started at `observed_at_s` may not show yet (and forget the rest)."""
        for command_id in [c for c, p in self.pending.items() if p.done_at_s is not None and p.done_at_s < observed_at_s]:
            del self.pending[command_id]
        return [p.effect for p in self.pending.values()]

    def starting(self, model: str) -> bool:
        """An instance of `model` has been ordered and its agent has not answered yet."""
        return any(isinstance(p.effect, (Promote, ColdStart)) and p.effect.model == model and p.done_at_s is None
                   for p in self.pending.values())

    def submit(self, effects: list[Effect]) -> None:
        """Register the effects as pending now (synchronously), then execute them per node in order,
        after the demotes earlier chains ordered on that node."""
        chains: dict[str, list[str]] = {}
        for effect in effects:
            command_id = uuid.uuid4().hex
            self.pending[command_id] = Pending(effect.node, effect)
            chains.setdefault(effect.node, []).append(command_id)
        for node, chain in chains.items():
            earlier = list(self.demotes.get(node, ()))
            mine = {c: asyncio.Event() for c in chain if isinstance(self.pending[c].effect, Demote)}
            self.demotes.setdefault(node, []).extend(mine.values())
            task = asyncio.create_task(self._run_chain(node, chain, earlier, mine))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _run_chain(self, node: str, chain: list[str], earlier: list[asyncio.Event],
                         mine: dict[str, asyncio.Event]) -> None:
        try:
            for event in earlier:
                await event.wait()
            for position, command_id in enumerate(chain):
                entry = self.pending.get(command_id)
                result = await self._send(node, command_id, entry.effect) if entry else None
                self._answered(node, mine.pop(command_id, None))
                if result is not None and result.ok:
                    entry.done_at_s = time.time()
                    continue
                for dropped in chain[position:]:
                    self.pending.pop(dropped, None)
                return
        finally:
            for event in mine.values():  # demotes never sent: nothing to wait for
                self._answered(node, event)

    def _answered(self, node: str, demote: asyncio.Event | None) -> None:
        if demote is not None:
            demote.set()
            self.demotes[node].remove(demote)

    async def _send(self, node: str, command_id: str, effect: Effect) -> CommandResult | None:
        cmd = command_for(effect, command_id)
        await self.bus.publish_event("placer", Event(name=f"{cmd.kind.value}_ordered", at_s=time.time(), model=cmd.model,
                                                     node=node, devices=cmd.devices, instance_id=cmd.instance_id,
                                                     reason=cmd.reason, detail={"command_id": command_id}))
        deadline = time.monotonic() + (SHORT_COMMAND_S if isinstance(effect, Evict) else LONG_COMMAND_S)
        backoff = 0.1
        while True:
            try:
                result = await self.bus.request(self.bus.subjects.agent_command(node), cmd, CommandResult,
                                                timeout_s=self.attempt_timeout_s)
                break
            except BusError as exc:
                retry = "no answer" in str(exc) and self.node_alive(node) and time.monotonic() < deadline
                if not retry:
                    result = CommandResult(command_id=command_id, ok=False, reason=str(exc))
                    break
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
        log.info("command_answered", node=node, kind=cmd.kind.value, model=cmd.model, devices=cmd.devices,
                 ok=result.ok, reason=result.reason or cmd.reason, command_id=command_id)
        if not result.ok:
            await self.bus.publish_event("placer", Event(
                name="command_failed", at_s=time.time(), model=cmd.model, node=node, devices=cmd.devices,
                instance_id=cmd.instance_id, reason=result.reason,
                detail={"command_id": command_id, "kind": cmd.kind.value}))
        return result

    def abandon(self) -> None:
        """Send nothing more (leadership lost): cancel every chain and forget what was pending."""
        for task in list(self.tasks):
            task.cancel()
        self.pending.clear()

    async def drain(self) -> None:
        if self.tasks:
            await asyncio.gather(*list(self.tasks), return_exceptions=True)
