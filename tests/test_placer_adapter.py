"""The placer's translation layer: agents' per-device copies regrouped into TP groups (serving and
evicting copies left out, partial groups kept as fragments, an unregistered model's kept per device
for the core to evict), effects into agent commands."""

from __future__ import annotations

from services.placer import adapter
from services.placer.core import Copy, Evict, Promote
from shared.schemas import CommandKind, CopyView, DeviceView, Forecast, InstanceView, ModelInfo, NodeView
from shared.settings import load_settings

SETTINGS = load_settings({}, env={})


def info(name: str, tp: int = 1) -> ModelInfo:
    return ModelInfo(name=name, path="/x", size_bytes=(8 << 20) * tp, tp=tp, content_hash="h")


def copy(model: str, device: int, state: str = "ready") -> CopyView:
    return CopyView(model=model, content_hash="h", devices=[device], state=state, bytes=8 << 20)


def test_copies_regrouped_by_tp_and_serving_copies_left_out():
    view = NodeView(node="n0", at_s=1.0, devices=[DeviceView(index=i, budget_bytes=1 << 30, free_bytes=1 << 29)
                                                  for i in range(6)],
                    copies=[copy("big", 0), copy("big", 1, "loading"), copy("big", 3), copy("small", 4),
                            copy("small", 5, "evicting"), copy("gone", 2)],
                    instances=[InstanceView(instance_id="s1", model="small", devices=[4], state="ready")])
    snap = adapter.snapshot_from({"n0": view}, {"big": info("big", tp=2), "small": info("small")}, {}, {}, SETTINGS)
    assert sorted(snap.copies, key=lambda c: c.devices) == [
        Copy("big", "n0", (0, 1), ready=False),  # one TP2 copy, still loading on device 1
        Copy("gone", "n0", (2,), ready=True),  # not registered (any more): the core evicts it
        Copy("big", "n0", (3,), ready=True),  # a fragment: half of the group (2, 3)
    ]
    assert [(i.instance_id, i.devices, i.ready) for i in snap.instances] == [("s1", (4,), True)]
    assert [g.free_bytes for g in snap.nodes[0].gpus] == [1 << 29] * 6


def test_effects_become_commands_with_their_reasons():
    evict = adapter.command_for(Evict("m", "n0", (1,), "evicted_for", for_model="x"), "c1")
    assert (evict.kind, evict.devices, evict.reason, evict.command_id) == (CommandKind.evict, [1], "evicted_for:x", "c1")
    promote = adapter.command_for(Promote("m", "n0", (0,), "m-1", "prewarm_hit", kv_bytes=4, trigger="scale_up"), "c2")
    assert (promote.kind, promote.instance_id, promote.kv_bytes, promote.reason) == (
        CommandKind.promote, "m-1", 4, "prewarm_hit:scale_up")


def test_forecasts_older_than_two_windows_are_ignored():
    def forecast(model: str, start_s: float) -> Forecast:
        return Forecast(model=model, window_start_s=start_s, window_s=10.0, avg=1.0, peak=2.0, method="csp")

    forecasts = {"now": forecast("now", 100.0), "last": forecast("last", 90.0), "edge": forecast("edge", 85.0),
                 "stale": forecast("stale", 84.0)}
    assert sorted(adapter.current_forecasts(forecasts, 105.0)) == ["edge", "last", "now"]



def test_the_chance_of_a_request_reaches_the_core():
    view = NodeView(node="n0", at_s=1.0, devices=[DeviceView(index=0, budget_bytes=1 << 30, free_bytes=1 << 29)])
    forecast = Forecast(model="m", window_start_s=0.0, window_s=5.0, avg=0.0, peak=0.0, method="ours", chance=0.25)
    snap = adapter.snapshot_from({"n0": view}, {"m": info("m")}, {"m": forecast}, {}, SETTINGS)
    assert snap.models[0].chance == 0.25 and adapter.core_config(SETTINGS).standby_copies
