"""A model removed from the registry: the placer core demotes its instances and evicts its copies
on every node (nothing else of it is planned), the overlay counts those commands in flight so
the next tick does not repeat them, and the adapter keeps the removed model's copies in view."""

from __future__ import annotations

from services.placer import adapter
from services.placer.core import (Config, Copy, Demote, Evict, Gpu, Instance, ModelSpec, Node, apply_effects,
                                  plan_tick, snapshot_of)
from services.placer.core import effects as fx
from shared.schemas import CopyState, CopyView, DeviceView, InstanceState, InstanceView, ModelInfo, NodeView
from shared.settings import load_settings

GIB = 1 << 30
NODES = (Node("n0", (Gpu(0, 2 * GIB), Gpu(1, 2 * GIB))), Node("n1", (Gpu(0, 2 * GIB),)))
KEPT = ModelSpec("kept", GIB, avg=40, peak=40)


def snapshot(**loads):
    return snapshot_of(NODES, (KEPT,), loads=loads or {"kept": 10.0},
                       instances=[Instance("gone-1", "gone", "n0", (0,), inflight=3),
                                  Instance("gone-2", "gone", "n1", (0,), draining=True),
                                  Instance("kept-1", "kept", "n0", (1,))],
                       copies=[Copy("gone", "n0", (1,)), Copy("gone", "n1", (0,), ready=False)])


def test_unregistered_models_instances_are_demoted_and_copies_evicted_everywhere():
    plan = plan_tick(snapshot(), 100.0, Config())
    retired = [e for e in plan.effects if e.model == "gone"]
    assert retired == [Demote("gone", "n0", (0,), "gone-1", fx.UNREGISTERED),
                       Evict("gone", "n0", (1,), fx.UNREGISTERED), Evict("gone", "n1", (0,), fx.UNREGISTERED)]
    assert plan.effects[:3] == tuple(retired)  # before anything else is planned
    assert "gone" not in plan.instances and all(c.model != "gone" for c in plan.copies)


def test_retiring_commands_in_flight_are_not_sent_again():
    first = plan_tick(snapshot(), 100.0, Config())
    pending = [e for e in first.effects if e.model == "gone"]
    again = plan_tick(apply_effects(snapshot(), pending, 100.0), 101.0, Config())
    assert [e for e in again.effects if e.model == "gone"] == []


def test_registered_models_are_untouched():
    plan = plan_tick(snapshot_of(NODES, (KEPT, ModelSpec("gone", GIB)), loads={"kept": 10.0, "gone": 10.0},
                                 instances=[Instance("gone-1", "gone", "n0", (0,))]), 100.0, Config())
    assert not [e for e in plan.effects if e.reason == fx.UNREGISTERED]


def test_adapter_keeps_copies_of_unregistered_models_for_eviction():
    view = NodeView(node="n0", at_s=1.0, devices=[DeviceView(index=0, budget_bytes=GIB, free_bytes=GIB)],
                    copies=[CopyView(model="gone", content_hash="h", devices=[0], state=CopyState.ready, bytes=1),
                            CopyView(model="old", content_hash="h", devices=[0], state=CopyState.evicting, bytes=1)],
                    instances=[InstanceView(instance_id="g", model="gone", devices=[0], state=InstanceState.ready)])
    models = {"kept": ModelInfo(name="kept", path="/x", size_bytes=GIB, content_hash="k")}
    snap = adapter.snapshot_from({"n0": view}, models, {}, {}, load_settings({}, env={}))
    assert [(c.model, c.devices) for c in snap.copies] == []  # its copy backs the (still serving) instance
    view = view.model_copy(update={"instances": []})
    snap = adapter.snapshot_from({"n0": view}, models, {}, {}, load_settings({}, env={}))
    assert [(c.model, c.devices) for c in snap.copies] == [("gone", (0,))]
