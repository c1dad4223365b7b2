"""Outputs of the placer core: effects (what an agent should do) each carrying a reason.

Frozen dataclasses with no behaviour; the service turns them into agent commands and the
simulator executes them directly. Reasons are the constants below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

# reasons
PREWARM_FOUNDATION = "prewarm_foundation"  # copy for the predicted average load
PREWARM_BURST = "prewarm_burst"  # copy for the predicted peak above the average
PREWARM_STANDBY = "prewarm_standby"  # copy of an idle model that may get a request (spare memory)
PREWARM_KV_SPACE = "prewarm_kv_space"  # copy placed in an instance's idle KV space
PREWARM_ROUND_ROBIN = "prewarm_round_robin"  # ablation: first fit, no placement policy
EVICTED_FOR = "evicted_for"  # room for a higher-score copy or an instance (see `for_model`)
KV_RECLAIMED = "kv_reclaimed"  # the hosting instance needs its KV space back
PREWARM_HIT = "prewarm_hit"  # promote a ready prewarmed copy
PREWARM_IN_PROGRESS = "prewarm_in_progress"  # promote a copy that is still loading
COLD_START = "cold_start"  # no copy: load the weights cold
SCALE_UP = "scale_up"  # autoscaler: load above the scale-up threshold
SCALE_DOWN = "scale_down"  # autoscaler: load below the scale-down threshold
INSTANCE_NEEDED = "instance_needed"  # the gateway asked for an instance
NO_CAPACITY = "no_capacity"  # allocation found no group that can hold the instance
DISPLACED_FOR = "displaced_for"  # demoted to give its GPUs to a model whose requests wait (`for_model`)
UNREGISTERED = "unregistered"  # the model was removed from the registry: drain and drop everything of it


@dataclass(frozen=True)
class Prewarm:
    model: str
    node: str
    devices: tuple[int, ...]
    score: float
    reason: str
    kv_host: str = ""  # instance whose idle KV space this copy borrows ("" = pool memory)


@dataclass(frozen=True)
class Evict:
    model: str
    node: str
    devices: tuple[int, ...]
    reason: str
    for_model: str = ""  # the model the room is made for


@dataclass(frozen=True)
class Promote:
    """Start serving from the copy of `model` on `devices` (it may still be loading)."""

    model: str
    node: str
    devices: tuple[int, ...]
    instance_id: str
    reason: str
    kv_bytes: int = 0  # KV cache per device
    trigger: str = ""  # why an instance is wanted: scale_up | instance_needed


@dataclass(frozen=True)
class ColdStart:
    model: str
    node: str
    devices: tuple[int, ...]
    instance_id: str
    reason: str
    kv_bytes: int = 0
    trigger: str = ""


@dataclass(frozen=True)
class Demote:
    """Drain the instance, stop serving, keep its weights as a prewarmed copy."""

    model: str
    node: str
    devices: tuple[int, ...]
    instance_id: str
    reason: str
    for_model: str = ""  # displaced_for: the model that gets the GPUs


Effect = Union[Prewarm, Evict, Promote, ColdStart, Demote]
