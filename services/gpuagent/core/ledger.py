"""Per-device memory ledger and copy/instance state machine of the GPU agent (pure, no I/O).

Memory is counted in 2 MiB pages. A device holds prewarmed weight copies (loading / ready /
evicting) and at most one serving instance (TP groups address several devices, one instance
each). The ledger says whether a command fits and which copies to evict so an instance gets
just the room it needs; the shell applies the answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.schemas import CopyState, InstanceState

PAGE_BYTES = 2 << 20


def pages(nbytes: int) -> int:
    return -(-nbytes // PAGE_BYTES)


def page_bytes(nbytes: int) -> int:
    """Bytes rounded up to whole pages: what the ledger charges."""
    return pages(nbytes) * PAGE_BYTES


def instance_kv_bytes(kv_bytes_per_token: int, max_model_len: int, requested: int) -> int:
    """KV cache an instance gets: what was asked, but never less than one full context
    (plus 1/8 for the engine's block rounding)."""
    return page_bytes(max(requested, kv_bytes_per_token * max_model_len * 9 // 8))


class Refused(Exception):
    """A command that cannot be done; the message is the reason given back to the caller."""


@dataclass
class CopyRecord:
    model: str
    content_hash: str
    bytes: int  # page-rounded
    state: CopyState = CopyState.loading
    progress: float = 0.0
    last_used_s: float = 0.0


@dataclass
class InstanceRecord:
    instance_id: str
    model: str
    engine_bytes: int  # page-rounded weights held by the serving engine
    kv_bytes: int  # page-rounded KV cache
    state: InstanceState = InstanceState.starting
    started_at_s: float = 0.0


@dataclass
class DeviceLedger:
    index: int
    budget_bytes: int
    copies: dict[str, CopyRecord] = field(default_factory=dict)  # by model name
    instance: InstanceRecord | None = None

    @property
    def used_bytes(self) -> int:
        inst = self.instance
        return sum(c.bytes for c in self.copies.values()) + (inst.engine_bytes + inst.kv_bytes if inst else 0)

    @property
    def free_bytes(self) -> int:
        return max(self.budget_bytes - self.used_bytes, 0)

    # ------------------------------------------------------------ copies

    def reserve_copy(self, model: str, content_hash: str, nbytes: int, now_s: float) -> CopyRecord | None:
        """Start a prewarm; None if an identical copy is already here (idempotent)."""
        existing = self.copies.get(model)
        if existing and existing.content_hash == content_hash and existing.state != CopyState.evicting:
            return None
        if existing:
            raise Refused(f"device {self.index} holds another checkpoint of {model} ({existing.state.value})")
        need = page_bytes(nbytes)
        if need > self.free_bytes:
            raise Refused(f"not enough memory on device {self.index}: need {need} bytes, "
                          f"free {self.free_bytes} of {self.budget_bytes}")
        record = CopyRecord(model, content_hash, need, last_used_s=now_s)
        self.copies[model] = record
        return record

    def copy_ready(self, model: str) -> None:
        record = self.copies[model]
        record.state, record.progress = CopyState.ready, 1.0

    def drop_copy(self, model: str) -> CopyRecord:
        if self.instance and self.instance.model == model:
            raise Refused(f"{model} is serving on device {self.index}: demote it first")
        record = self.copies.pop(model, None)
        if record is None:
            raise Refused(f"no copy of {model} on device {self.index}")
        return record

    # ------------------------------------------------------------ instances

    def room_for_instance(self, model: str, engine_bytes: int, kv_bytes: int) -> list[str]:
        """Copies to evict (least recently used first) so the instance fits; only as many as needed.

        The model's own copy and copies still loading are never chosen.
        """
        if self.instance is not None:
            raise Refused(f"device {self.index} already serves {self.instance.model} "
                          f"({self.instance.instance_id})")
        need = page_bytes(engine_bytes) + page_bytes(kv_bytes) - self.free_bytes
        victims: list[str] = []
        candidates = sorted((c for c in self.copies.values() if c.model != model and c.state == CopyState.ready),
                            key=lambda c: (c.last_used_s, c.model))
        for copy in candidates:
            if need <= 0:
                break
            victims.append(copy.model)
            need -= copy.bytes
        if need > 0:
            raise Refused(f"not enough memory on device {self.index} for an instance of {model}: "
                          f"short by {need} bytes after evicting every idle copy")
        return victims

    def start_instance(self, instance_id: str, model: str, engine_bytes: int, kv_bytes: int, now_s: float) -> None:
        for victim in self.room_for_instance(model, engine_bytes, kv_bytes):
            self.copies.pop(victim)
        self.instance = InstanceRecord(instance_id, model, page_bytes(engine_bytes), page_bytes(kv_bytes),
                                       started_at_s=now_s)
        if model in self.copies:
            self.copies[model].last_used_s = now_s

    def set_instance_state(self, instance_id: str, state: InstanceState) -> None:
        if self.instance and self.instance.instance_id == instance_id:
            self.instance.state = state

    def end_instance(self, instance_id: str) -> InstanceRecord | None:
        inst = self.instance
        if inst and inst.instance_id == instance_id:
            self.instance = None
            return inst
        return None
