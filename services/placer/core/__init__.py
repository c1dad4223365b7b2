"""The placer's pure core (DESIGN §3.2-3.4), shared by the live placer and the simulator.

API: build a `Snapshot` (nodes, each with its GPUs' free bytes, instances and prewarmed copies;
models with size, TP and forecast; per-model windowed load; `snapshot_of` builds one from flat
lists), then call `tick(snapshot, now_s, config)` for one planning round (or `plan_tick` for the
effects plus the desired copies and instance counts) and `allocate(snapshot, model, now_s, config)`
when an instance is needed now. Results are effects (`Prewarm`, `Evict`, `Promote`, `ColdStart`,
`Demote`), each with a reason; `apply_effects` advances a snapshot as if agents executed them.
No asyncio, NATS, Redis, environment or clock in here.
"""

from services.placer.core.allocate import Allocation
from services.placer.core.cluster import Reuse
from services.placer.core.effects import ColdStart, Demote, Effect, Evict, Promote, Prewarm
from services.placer.core.overlay import apply_effects
from services.placer.core.planner import DesiredCopy, TickPlan, allocate, plan_tick, tick
from services.placer.core.scores import LoadPoint, kv_reserve_bytes, windowed_load
from services.placer.core.snapshot import PAGE_BYTES, Config, Copy, Gpu, Instance, ModelSpec, Node, Snapshot, snapshot_of

__all__ = [
    "Allocation", "ColdStart", "Config", "Copy", "Demote", "DesiredCopy", "Effect", "Evict", "Gpu",
    "Instance", "LoadPoint", "ModelSpec", "Node", "PAGE_BYTES", "Prewarm", "Promote", "Reuse", "Snapshot",
    "TickPlan", "allocate", "apply_effects", "kv_reserve_bytes", "plan_tick", "snapshot_of", "tick",
    "windowed_load",
]
