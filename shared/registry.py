"""The model registry's operations, shared by `warmserve models` and the gateway's /admin/models
routes: register a checkpoint, remove a model, describe one across the cluster. Each change is an
event on the registry domain (model_registered, model_removed). Removing only unregisters: the
leading placer's next tick then drains the model's instances and evicts its copies everywhere.
"""

from __future__ import annotations

import time
from typing import Any, Iterable

from shared.bus import Bus
from shared.schemas import Event, Forecast, LoadSample, ModelInfo, NodeView
from shared.state import State


class ModelBusy(RuntimeError):
    """A removal refused: the model still has requests held or in flight."""


class ModelConflict(ValueError):
    """The name is registered for another checkpoint."""


async def register(state: State, bus: Bus, info: ModelInfo) -> bool:
    """Register `info` (False: it was already, as is); refused (ModelConflict) if the name is taken
    by another checkpoint or path."""
    known = await state.model(info.name)
    if known is not None and (known.path, known.content_hash) != (info.path, info.content_hash):
        raise ModelConflict(f"{info.name} is registered for {known.path} ({known.content_hash[:12]}): remove it first")
    await state.register_model(info)
    await bus.publish_event("registry", Event(name="model_registered", at_s=time.time(), model=info.name,
                                              detail={"size_bytes": info.size_bytes, "tp": info.tp, "path": info.path}))
    return known != info


def held_by_gateways(name: str, samples: Iterable[LoadSample]) -> float:
    """Requests of the model the gateways held or ran at most in their latest load samples (each
    gateway samples every model it has seen, every interval)."""
    latest: dict[str, LoadSample] = {}
    for sample in samples:
        if sample.model == name and sample.at_s >= latest.get(sample.source, sample).at_s:
            latest[sample.source] = sample
    return sum(s.peak_outstanding for s in latest.values())


def requests_of(name: str, views: Iterable[NodeView], held: float) -> int:
    """At least how many requests of the model are held or in flight: those its instances run, or
    `held` (what gateways hold and run), whichever is more."""
    return max(sum(i.inflight for view in views for i in view.instances if i.model == name), int(held))


async def remove(state: State, bus: Bus, name: str, requests: int, force: bool = False) -> ModelInfo | None:
    """Unregister `name` (None: it was not registered); refused (ModelBusy) while `requests` > 0 unless forced."""
    info = await state.model(name)
    if info is None:
        return None
    if requests and not force:
        raise ModelBusy(f"{name} has {requests} request(s) held or in flight: wait, or force the removal")
    await state.unregister_model(name)
    await bus.publish_event("registry", Event(name="model_removed", at_s=time.time(), model=name,
                                              reason="forced" if force else "", detail={"requests": requests}))
    return info


def residency(name: str, views: Iterable[NodeView]) -> list[dict[str, Any]]:
    """What of the model each device holds: copies and instances, node by node."""
    rows = []
    for view in sorted(views, key=lambda v: v.node):
        rows += [{"node": view.node, "devices": c.devices, "kind": "copy", "state": c.state.value,
                  "progress": round(c.progress, 3), "origin": c.origin} for c in view.copies if c.model == name]
        rows += [{"node": view.node, "devices": i.devices, "kind": "instance", "state": i.state.value,
                  "instance_id": i.instance_id, "inflight": i.inflight} for i in view.instances if i.model == name]
    return rows


async def describe(state: State, name: str) -> dict[str, Any] | None:
    """The registry entry, its current forecast and its residency (None: not registered)."""
    info = await state.model(name)
    if info is None:
        return None
    forecast = await state.hget(state.keys.forecasts(), name, Forecast)
    views = (await state.node_views(alive_only=True)).values()
    return {"model": info.model_dump(), "forecast": forecast.model_dump() if forecast else None,
            "residency": residency(name, views)}
