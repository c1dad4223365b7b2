"""Per-device memory ledger and copy/instance state machine of the GPU agent (pure, no I/O).

Memory is counted in 2 MiB pages. A device holds prewarmed weight copies (loading / ready /
evicting), warm engines (one per architecture: a KV cache, kept after a demote so the next promotion
needs no engine start; an engine computes with its instance's copy, so it holds no weights of its
own) and at most one serving instance, which runs in the engine of its architecture. Idle engines are a cache: they are dropped before anything else when room is
needed. Each copy remembers why it is here (its origin), so an instance start can say what it
found. The ledger says what fits and what to free; the shell applies the answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.schemas import CopyState, InstanceState

PAGE_BYTES = 2 << 20

# why a copy is on the device (CopyRecord.origin), and what an instance start found (start_kind)
FORECAST_PREWARM = "forecast_prewarm"  # origin and start: placed by the placer from a forecast
KEPT_COPY = "kept_copy"  # origin and start: left by an instance that stopped (or failed to start)
COLD_START = "cold_start"  # origin: loaded for an instance that found no copy
COMMANDED = "commanded"  # origin and start: a prewarm command with no placement reason (by hand)
LOADING = "loading"  # start: the copy was still loading
MISS = "miss"  # start: there was no copy
START_KINDS = (FORECAST_PREWARM, KEPT_COPY, LOADING, MISS, COMMANDED)
PLACEMENT_REASON_PREFIX = "prewarm_"  # the placer's reasons for a copy (prewarm_foundation, prewarm_burst, ...)


def copy_origin(reason: str) -> str:
    """The origin a new copy remembers, from the reason of the command that loads it."""
    if reason.startswith(PLACEMENT_REASON_PREFIX):
        return FORECAST_PREWARM
    return COLD_START if reason.startswith(COLD_START) else COMMANDED


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
    origin: str = COMMANDED  # why it is here: FORECAST_PREWARM | KEPT_COPY | COLD_START | COMMANDED


@dataclass
class InstanceRecord:
    instance_id: str
    model: str
    arch: str  # the warm engine it runs in
    state: InstanceState = InstanceState.starting
    started_at_s: float = 0.0


@dataclass
class EngineRecord:
    arch: str
    bytes: int  # page-rounded KV cache: what the engine holds
    last_used_s: float = 0.0


@dataclass(frozen=True)
class Room:
    """What to free, in order, before an instance can start: idle engines first, then copies."""

    engines: list[str]
    copies: list[str]


@dataclass
class DeviceLedger:
    index: int
    budget_bytes: int
    copies: dict[str, CopyRecord] = field(default_factory=dict)  # by model name
    engines: dict[str, EngineRecord] = field(default_factory=dict)  # by architecture
    instance: InstanceRecord | None = None
    kept_arch: str = ""  # the architecture whose idle engine is dropped last (engines.kept_arch)

    @property
    def used_bytes(self) -> int:
        return sum(c.bytes for c in self.copies.values()) + sum(e.bytes for e in self.engines.values())

    @property
    def free_bytes(self) -> int:
        return max(self.budget_bytes - self.used_bytes, 0)

    @property
    def idle_engine_bytes(self) -> int:
        return sum(e.bytes for a, e in self.engines.items() if not self._serving(a))

    @property
    def reclaimable_free_bytes(self) -> int:
        """Free memory counting idle engines as free: what the placer may plan with."""
        return min(self.free_bytes + self.idle_engine_bytes, self.budget_bytes)

    def _serving(self, arch: str) -> bool:
        return self.instance is not None and self.instance.arch == arch

    def _idle_engines_to_drop(self, need: int, keep: str = "") -> list[str]:
        """Least recently used idle engines (not `keep`; the kept architecture's last) whose bytes cover
        `need`; [] if need <= 0."""
        victims = []
        for engine in sorted(self.engines.values(), key=lambda e: (e.arch == self.kept_arch, e.last_used_s, e.arch)):
            if need <= 0:
                break
            if engine.arch != keep and not self._serving(engine.arch):
                victims.append(engine.arch)
                need -= engine.bytes
        return victims

    def reserve_engine(self, arch: str, kv_bytes: int, now_s: float) -> bool:
        """Book an idle warm engine if the architecture has none and it fits in free memory."""
        need = page_bytes(kv_bytes)
        if arch in self.engines or need > self.free_bytes:
            return False
        self.engines[arch] = EngineRecord(arch, need, last_used_s=now_s)
        return True

    # ------------------------------------------------------------ copies

    def reserve_copy(self, model: str, content_hash: str, nbytes: int, now_s: float,
                     origin: str = COMMANDED) -> list[str] | None:
        """Start a prewarm: returns the idle engines to drop first ([] usually); None if an
        identical copy is already here (idempotent: it keeps its origin)."""
        existing = self.copies.get(model)
        if existing and existing.content_hash == content_hash and existing.state != CopyState.evicting:
            return None
        if existing:
            raise Refused(f"device {self.index} holds another checkpoint of {model} ({existing.state.value})")
        need = page_bytes(nbytes)
        if need > self.reclaimable_free_bytes:
            raise Refused(f"not enough memory on device {self.index}: need {need} bytes, "
                          f"free {self.reclaimable_free_bytes} of {self.budget_bytes}")
        engines = self._idle_engines_to_drop(need - self.free_bytes)
        for arch in engines:
            self.engines.pop(arch)
        self.copies[model] = CopyRecord(model, content_hash, need, last_used_s=now_s, origin=origin)
        return engines

    def idle_copies_to_free(self, model: str, need: int) -> list[str]:
        """Ready copies of other models, least recently used first, whose bytes cover `need`
        (all of them if they cannot); [] if need <= 0."""
        victims = []
        for copy in sorted((c for c in self.copies.values() if c.model != model and c.state == CopyState.ready),
                           key=lambda c: (c.last_used_s, c.model)):
            if need <= 0:
                break
            victims.append(copy.model)
            need -= copy.bytes
        return victims

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

    def start_kind(self, model: str, loading: bool) -> str:
        """What an instance of `model` starting now finds here: MISS (no copy), LOADING (`loading`:
        its load is still running), else the copy's origin (a cold start's leftover is a kept copy)."""
        copy = self.copies.get(model)
        if copy is None:
            return MISS
        if loading or copy.state == CopyState.loading:
            return LOADING
        return KEPT_COPY if copy.origin == COLD_START else copy.origin

    def room_for_instance(self, model: str, arch: str, kv_bytes: int) -> Room:
        """What to free so the instance fits, only as much as needed: idle engines of other
        architectures first, then idle copies, least recently used first. The model's own copy and
        copies still loading are never chosen; an existing engine of `arch` needs no room."""
        if self.instance is not None:
            raise Refused(f"device {self.index} already serves {self.instance.model} "
                          f"({self.instance.instance_id})")
        need = 0 if arch in self.engines else page_bytes(kv_bytes)
        need -= self.free_bytes
        engines = self._idle_engines_to_drop(need, keep=arch)
        need -= sum(self.engines[a].bytes for a in engines)
        copies = self.idle_copies_to_free(model, need)
        need -= sum(self.copies[m].bytes for m in copies)
        if need > 0:
            raise Refused(f"not enough memory on device {self.index} for an instance of {model}: "
                          f"short by {need} bytes after freeing every idle engine and copy")
        return Room(engines, copies)

    def start_instance(self, instance_id: str, model: str, arch: str, kv_bytes: int,
                       now_s: float) -> Room:
        """Free what `room_for_instance` says and book the instance (and its engine if new)."""
        room = self.room_for_instance(model, arch, kv_bytes)
        for a in room.engines:
            self.engines.pop(a)
        for m in room.copies:
            self.copies.pop(m)
        if arch not in self.engines:
            self.engines[arch] = EngineRecord(arch, page_bytes(kv_bytes))
        self.engines[arch].last_used_s = now_s
        self.instance = InstanceRecord(instance_id, model, arch, started_at_s=now_s)
        if model in self.copies:
            self.copies[model].last_used_s = now_s
        return room

    def set_instance_state(self, instance_id: str, state: InstanceState) -> None:
        if self.instance and self.instance.instance_id == instance_id:
            self.instance.state = state

    def end_instance(self, instance_id: str, now_s: float, keep_engine: bool = True) -> InstanceRecord | None:
        """The instance stops; its engine stays warm (idle) unless it failed to start; its copy, if
        any, is now a kept copy."""
        inst = self.instance
        if inst and inst.instance_id == instance_id:
            self.instance = None
            if inst.model in self.copies:
                self.copies[inst.model].origin = KEPT_COPY
            if keep_engine:
                self.engines[inst.arch].last_used_s = now_s
            else:
                self.engines.pop(inst.arch, None)
            return inst
        return None
