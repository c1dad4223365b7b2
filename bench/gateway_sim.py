"""Simulated cluster for the gateway bench and tests: a node whose engine instances stream fake
tokens over NATS (with the node's view in Redis, heartbeat and lifecycle events), and a placer that
answers InstanceNeed by starting an instance. Speaks the real protocol; models no real engine.
"""

from __future__ import annotations

import asyncio
import time

from shared.bus import Bus
from shared.schemas import (CancelInference, Event, InferChunk, InferRequest, InstanceAnswer, InstanceNeed,
                            InstanceRoute, InstanceState, InstanceView, ModelInfo, NodeView)
from shared.state import State

SIM_TTL_S = 600.0  # the simulated node's liveness key outlives any bench or test


class SimInstance:
    """An engine instance: token i is the text " w{i}"; `stop` and `max_tokens` are honoured;
    a prompt with more words than `max_model_len` is refused with error_code 400."""

    def __init__(self, bus: Bus, model: str, instance_id: str, token_s: float, max_model_len: int,
                 journal: list[InferRequest]):
        self.bus, self.model, self.instance_id = bus, model, instance_id
        self.token_s, self.max_model_len = token_s, max_model_len
        self.received: list[InferRequest] = []
        self.journal = journal  # shared by the node's instances: every request in order of receipt
        self.cancelled: list[str] = []
        self.peak_active = 0  # most requests generating at once
        self.lose_next = 0  # this many next requests are lost on the way (as in a NATS outage)
        self.muted: set[str] = set()  # requests whose chunks are lost on the way until they are cancelled
        self._active: set[tuple[str, int]] = set()  # (request id, attempt) being generated

    async def start(self) -> None:
        await self.bus.subscribe(self.bus.subjects.infer(self.instance_id), InferRequest, self._generate)
        await self.bus.subscribe(self.bus.subjects.infer_cancel(self.instance_id), CancelInference, self._cancel)

    async def _cancel(self, cancel: CancelInference) -> None:
        self.cancelled.append(cancel.request_id)
        self._active -= {(rid, attempt) for rid, attempt in self._active
                         if rid == cancel.request_id and cancel.attempt in (-1, attempt)}

    async def _generate(self, request: InferRequest) -> None:
        if self.lose_next:
            self.lose_next -= 1
            return
        received_s = time.perf_counter()
        self.received.append(request)
        self.journal.append(request)
        rid = request.request_id
        await self.bus.publish(request.reply_to, InferChunk(request_id=rid, seq=0, instance_id=self.instance_id,
                                                            attempt=request.attempt))  # acknowledged
        words = len((request.prompt or "").split()) + sum(len(str(m["content"]).split())
                                                          for m in request.messages or [])
        if words > self.max_model_len:
            await self.bus.publish(request.reply_to, InferChunk(
                request_id=rid, seq=0, error=f"prompt has {words} tokens, more than {self.max_model_len}",
                error_code=400, prompt_tokens=words, instance_id=self.instance_id, attempt=request.attempt))
            return
        key = (rid, request.attempt)
        self._active.add(key)
        self.peak_active = max(self.peak_active, len(self._active))
        text, spec = "", request.sampling
        for i in range(spec.max_tokens):
            if self.token_s:
                await asyncio.sleep(self.token_s)
            while rid in self.muted and key in self._active:
                await asyncio.sleep(0.02)
            if key not in self._active:
                await self.bus.publish(request.reply_to, InferChunk(
                    request_id=rid, seq=i, finish_reason="cancelled", instance_id=self.instance_id,
                    attempt=request.attempt))
                return
            token, finish = f" w{i}", None
            full = text + token
            cut = min((full.find(s) for s in spec.stop if s in full), default=-1)
            if cut >= 0:  # the stop sequence itself is not returned
                token, finish = full[len(text):max(cut, len(text))], "stop"
            elif i == spec.max_tokens - 1:
                finish = "length"
            text += token
            await self.bus.publish(request.reply_to, InferChunk(
                request_id=rid, seq=i, text=token, finish_reason=finish, prompt_tokens=words,
                completion_tokens=i + 1, engine_ttft_ms=(time.perf_counter() - received_s) * 1000 if i == 0 else 0.0,
                instance_id=self.instance_id, attempt=request.attempt))
            if finish:
                break
        self._active.discard(key)


class SimNode:
    """A node holding simulated instances; every change is written to Redis, heartbeated and announced."""

    def __init__(self, bus: Bus, state: State, node: str = "simnode", token_s: float = 0.0):
        self.bus, self.state, self.node, self.token_s = bus, state, node, token_s
        self.instances: dict[str, SimInstance] = {}
        self.journal: list[InferRequest] = []  # requests received by any instance, in order

    async def add_instance(self, model: str, instance_id: str, max_model_len: int = 2048) -> SimInstance:
        instance = SimInstance(self.bus, model, instance_id, self.token_s, max_model_len, self.journal)
        await instance.start()
        self.instances[instance_id] = instance
        await self._changed("instance_ready", model, instance_id)
        return instance

    async def remove_instance(self, instance_id: str) -> None:
        instance = self.instances.pop(instance_id)
        await self._changed("instance_stopped", instance.model, instance_id)

    def view(self) -> NodeView:
        return NodeView(node=self.node, at_s=time.time(), instances=[
            InstanceView(instance_id=i.instance_id, model=i.model, devices=[0], state=InstanceState.ready)
            for i in self.instances.values()])

    async def _changed(self, event: str, model: str, instance_id: str) -> None:
        view = self.view()
        await self.state.put_node_view(view, SIM_TTL_S)
        await self.bus.publish(self.bus.subjects.agent_heartbeat(), view)
        await self.bus.publish_event("agent", Event(name=event, at_s=time.time(), model=model, node=self.node,
                                                    instance_id=instance_id))


class SimPlacer:
    """Answers InstanceNeed: starts an instance on `node` after `start_s` (None: only when told)."""

    def __init__(self, bus: Bus, node: SimNode, start_s: float | None = 0.0):
        self.bus, self.node, self.start_s = bus, node, start_s
        self.needs: list[InstanceNeed] = []
        self.needed = asyncio.Event()  # set at every InstanceNeed

    async def start(self) -> None:
        await self.bus.subscribe(self.bus.subjects.instance_need(), InstanceNeed, self._on_need)

    async def _on_need(self, need: InstanceNeed) -> InstanceAnswer:
        self.needs.append(need)
        self.needed.set()
        if self.start_s is None:
            return InstanceAnswer(status="starting")
        if self.start_s == 0:
            instance = await self.start_instance(need.model)
            return InstanceAnswer(status="ready", instances=[
                InstanceRoute(instance_id=instance.instance_id, model=need.model, node=self.node.node)])
        asyncio.get_running_loop().call_later(self.start_s, lambda: asyncio.ensure_future(
            self.start_instance(need.model)))
        return InstanceAnswer(status="starting")

    async def start_instance(self, model: str) -> SimInstance:
        return await self.node.add_instance(model, f"{model}-i{len(self.node.instances)}")


async def register(state: State, name: str, max_model_len: int = 2048) -> ModelInfo:
    info = ModelInfo(name=name, path="/sim/" + name, size_bytes=1 << 20, content_hash="sim-" + name,
                     max_model_len=max_model_len)
    await state.register_model(info)
    return info
