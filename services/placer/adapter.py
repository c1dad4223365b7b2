"""Translation between wire messages and the placer core (pure, no I/O): NodeViews, registry and
current forecasts into a Snapshot (per-device CopyViews regrouped into TP groups, copies backing a serving
instance left out); effects into AgentCommands; a TickPlan into the desired Plan.
"""

from __future__ import annotations

from typing import Mapping

from services.gpuagent.core.ledger import instance_kv_bytes
from services.placer.core import Config, Copy, Gpu, Instance, ModelSpec, Node, Snapshot, TickPlan
from services.placer.core import effects as fx
from shared.schemas import (AgentCommand, CommandKind, CopyState, Forecast, InstanceState, ModelInfo, NodeView, Plan,
                            PlannedCopy)
from shared.settings import Settings

COMMAND_KINDS = {fx.Prewarm: CommandKind.prewarm, fx.Evict: CommandKind.evict, fx.Promote: CommandKind.promote,
                 fx.ColdStart: CommandKind.cold_start, fx.Demote: CommandKind.demote}


def core_config(settings: Settings) -> Config:
    """The live agent cannot lend KV space to copies (no KV shrink command), so KV-space
    prewarming stays off here; the simulator can turn it on."""
    return Config(capacity=settings.max_inflight_per_instance, load_bandwidth_bytes_s=settings.load_bandwidth_bytes_s,
                  prewarm=settings.prewarm, placement=settings.placement, kv_prewarm=False,
                  allocation=settings.allocation, promotable_copies=settings.promotable_copies,
                  promotable_max_tp=settings.promotable_max_tp, unserved_first=settings.unserved_first,
                  standby_copies=settings.standby_copies,
                  scale_window_s=settings.scale_window_s, protect_s=settings.scale_window_s,
                  keep_s=settings.scale_down_keep_s)


def model_spec(info: ModelInfo, forecast: Forecast | None, settings: Settings) -> ModelSpec:
    """The agent's memory rules: an instance computes with its pool copy's own tensors (zero-copy) and
    holds a KV cache of at least one context."""
    return ModelSpec(info.name, info.size_bytes, info.tp, avg=forecast.avg if forecast else 0.0,
                     peak=forecast.peak if forecast else 0.0, chance=forecast.chance if forecast else 0.0,
                     kv_bytes=instance_kv_bytes(info.kv_bytes_per_token, info.max_model_len, settings.kv_cache_bytes))


def current_forecasts(forecasts: Mapping[str, Forecast], now_s: float) -> dict[str, Forecast]:
    """Forecasts for a window that began at most two windows ago: an older one (its forecaster
    stopped, or the model's history ended) says nothing about now and is ignored."""
    return {m: f for m, f in forecasts.items() if now_s - f.window_start_s <= 2 * f.window_s}


def snapshot_from(views: Mapping[str, NodeView], models: Mapping[str, ModelInfo], forecasts: Mapping[str, Forecast],
                  loads: Mapping[str, float], settings: Settings, unmeasured: frozenset[str] = frozenset()) -> Snapshot:
    nodes = []
    for name in sorted(views):
        view = views[name]
        gpus = tuple(Gpu(d.index, d.free_bytes) for d in sorted(view.devices, key=lambda d: d.index))
        serving = {(i.model, d) for i in view.instances for d in i.devices}
        instances = tuple(Instance(inst.instance_id, inst.model, name, tuple(inst.devices), inst.started_at_s,
                                   inst.inflight, inst.kv_bytes, ready=inst.state == InstanceState.ready,
                                   draining=inst.state == InstanceState.draining) for inst in view.instances)
        held: dict[str, dict[int, bool]] = {}  # model -> device -> ready
        for c in view.copies:
            if c.state != CopyState.evicting:  # an unregistered model's too: the core evicts it
                for d in c.devices:
                    if (c.model, d) not in serving:
                        held.setdefault(c.model, {})[d] = c.state == CopyState.ready
        copies = tuple(copy for model, devices in held.items()
                       for copy in _tp_groups(model, name, devices, models[model].tp if model in models else 1))
        nodes.append(Node(name, gpus, instances, copies))
    specs = tuple(model_spec(models[m], forecasts.get(m), settings) for m in sorted(models))
    return Snapshot(tuple(nodes), specs, dict(loads), unmeasured)


def _tp_groups(model: str, node: str, devices: dict[int, bool], tp: int) -> list[Copy]:
    """Per-device copies -> one Copy per aligned TP group held whole; partial groups stay as
    fragments (one Copy with the devices held) that the core can evict but never promote."""
    out: list[Copy] = []
    for start in sorted({d - d % tp for d in devices}):
        held = tuple(d for d in range(start, start + tp) if d in devices)
        out.append(Copy(model, node, held, ready=all(devices[d] for d in held)))
    return out


def command_for(effect: fx.Effect, command_id: str) -> AgentCommand:
    return AgentCommand(command_id=command_id, kind=COMMAND_KINDS[type(effect)], model=effect.model,
                        devices=list(effect.devices), instance_id=getattr(effect, "instance_id", ""),
                        reason=_reason(effect), kv_bytes=getattr(effect, "kv_bytes", 0))


def _reason(effect: fx.Effect) -> str:
    for_model = getattr(effect, "for_model", "")
    if for_model:
        return f"{effect.reason}:{for_model}"
    trigger = getattr(effect, "trigger", "")
    return f"{effect.reason}:{trigger}" if trigger else effect.reason


def plan_from(tick: TickPlan, now_s: float) -> Plan:
    return Plan(at_s=now_s, instances=dict(tick.instances),
                copies=[PlannedCopy(model=c.model, node=c.node, devices=list(c.devices), score=c.score,
                                    reason=fx.PREWARM_KV_SPACE if c.kv_host else "")
                        for c in tick.copies])
