"""Scenario tables for every rule of the placer core: replica counts and scores, laminar TP groups,
one copy of a model per GPU, protected choice, eviction order, allocation order, autoscaler
thresholds and protection, KV reservation arithmetic and KV-space reclaim, the ablation switches."""

from __future__ import annotations

import dataclasses
import math

import pytest

from services.placer.core import (PAGE_BYTES, ColdStart, Config, Copy, Demote, Evict, Gpu, Instance, LoadPoint,
                                  ModelSpec, Node, Prewarm, Promote, Snapshot, allocate, kv_reserve_bytes, plan_tick, snapshot_of,
                                  tick, windowed_load)
from services.placer.core import effects as fx
from services.placer.core.scores import copy_scores, replica_counts

GIB = 1 << 30


def nodes(*gpus_free_gib: tuple[float, ...]) -> tuple[Node, ...]:
    """nodes((10, 10), (5,)) -> n0 with two GPUs of 10 GiB free, n1 with one of 5 GiB."""
    return tuple(Node(f"n{i}", tuple(Gpu(d, int(f * GIB)) for d, f in enumerate(free)))
                 for i, free in enumerate(gpus_free_gib))


def model(name: str, gib: float = 4, tp: int = 1, avg: float = 0, peak: float = 0, kv_gib: float = 0) -> ModelSpec:
    return ModelSpec(name, int(gib * GIB), tp, avg, peak, int(kv_gib * GIB))


def prewarms(effects) -> list[tuple[str, str, tuple[int, ...]]]:
    return [(e.model, e.node, e.devices) for e in effects if isinstance(e, Prewarm)]


def evictions(effects) -> list[tuple[str, tuple[int, ...]]]:
    return [(e.model, e.devices) for e in effects if isinstance(e, Evict)]


# ------------------------------------------------------------------ arithmetic


@pytest.mark.parametrize("avg,peak,current,expected", [
    (0, 0, 0, (0, 0)),
    (10, 10, 0, (1, 0)),
    (32, 33, 0, (1, 1)),
    (40, 100, 0, (2, 2)),
    (40, 100, 1, (1, 2)),
    (40, 100, 5, (0, 0)),
    (0, 64, 0, (0, 2)),
])
def test_replica_counts(avg, peak, current, expected):
    assert replica_counts(avg, peak, current, capacity=32) == expected


def test_copy_scores_follow_the_paper():
    spec = model("m", gib=32, tp=2, avg=40, peak=100)  # n_f = 2, n_b = 2
    cost = 32 * GIB / 2 / 32e9
    got = copy_scores(spec, current=0, config=Config())
    assert [kind for _, kind in got] == ["foundation", "foundation", "burst", "burst"]
    expected = [cost, math.exp(-1 / 4) * cost, math.exp(-2 / 4) * cost * 2.5, math.exp(-3 / 4) * cost * 2.5]
    assert [s for s, _ in got] == pytest.approx(expected)


@pytest.mark.parametrize("points,now,window,expected", [
    ([], 10, 5, 0.0),
    ([(10, 1, 4.0)], 10, 5, 4.0),
    ([(6, 1, 10.0), (10, 4, 0.0)], 10, 5, 2.0),  # 1 s at 10, 4 s at 0
    ([(4, 1, 99.0), (10, 5, 1.0)], 10, 5, 1.0),  # the old sample is outside the window
    ([(8, 6, 3.0)], 10, 5, 3.0),  # partial overlap weighs by the covered part only
    ([(10, 5, 2.0, "gw1"), (10, 5, 3.0, "gw2")], 10, 5, 5.0),  # two gateways' loads add up
    ([(7, 2, 2.0, "gw1"), (10, 3, 4.0, "gw1"), (10, 5, 1.0, "gw2")], 10, 5, 4.2),  # each its own mean: 3.2 + 1
])
def test_windowed_load(points, now, window, expected):
    assert windowed_load([LoadPoint(*p) for p in points], now, window) == pytest.approx(expected)


@pytest.mark.parametrize("capacity,requests,used,b,expected", [
    (3200, 0, 0, 32, 100),  # idle: C/B
    (3200, 16, 0, 32, 1600),  # C*Q/B dominates
    (3200, 16, 2000, 32, 2100),  # T + C/B dominates
    (3200, 32, 0, 32, 3200),  # full: nothing to lend
    (3200, 40, 3200, 32, 3200),  # capped at C
])
def test_kv_reserve(capacity, requests, used, b, expected):
    assert kv_reserve_bytes(capacity, requests, used, b) == expected


# ------------------------------------------------------------------ placement rules


def test_never_two_copies_of_one_model_on_a_gpu():
    snap = snapshot_of(nodes((20, 20)), (model("a", avg=100, peak=100),))  # wants 4 copies
    got = prewarms(tick(snap, 0, Config()))
    assert sorted(got) == [("a", "n0", (0,)), ("a", "n0", (1,))]


@pytest.mark.parametrize("existing,new_tp,allowed", [
    # an aligned TP2 copy on (0, 1): TP2 goes to (0, 1) or (2, 3), TP4 contains it, TP1 nests
    (((0, 1),), 2, {(0, 1), (2, 3)}),
    (((0, 1),), 4, {(0, 1, 2, 3)}),
    # an observed, unaligned TP2 copy on (1, 2) blocks both aligned TP2 groups (half overlap)
    (((1, 2),), 2, set()),
    (((1, 2),), 1, {(0,), (1,), (2,), (3,)}),
    (((1, 2),), 4, {(0, 1, 2, 3)}),
])
def test_tp_groups_stay_laminar(existing, new_tp, allowed):
    copies = tuple(Copy("old", "n0", d) for d in existing)
    snap = snapshot_of(nodes((40, 40, 40, 40)), (model("old", tp=2), model("new", gib=2 * new_tp, tp=new_tp, avg=1)),
                    copies)
    got = prewarms(tick(snap, 0, Config(placement="paper")))
    assert {d for m, _, d in got if m == "new"} <= allowed
    assert bool(got) == bool(allowed)


def test_groups_are_aligned_to_their_size():
    snap = snapshot_of(nodes((40,) * 8), (model("a", gib=8, tp=4, avg=100, peak=100), model("b", gib=4, tp=2, avg=1)))
    for _, _, devices in prewarms(tick(snap, 0, Config())):
        assert devices[0] % len(devices) == 0 and devices == tuple(range(devices[0], devices[0] + len(devices)))


def test_protected_group_preferred_over_least_score():
    # GPU0 holds a high-score copy, GPU1 a low-score one; the new copy's score lies between:
    # only GPU1 is protected (every overlapped copy scores lower), so it goes there
    snap = snapshot_of(nodes((20, 20)),
                    (model("high", gib=8, avg=1), model("low", gib=1, avg=1), model("new", gib=4, avg=1)),
                    (Copy("high", "n0", (0,)), Copy("low", "n0", (1,))))
    assert prewarms(tick(snap, 0, Config())) == [("new", "n0", (1,))]


def test_least_overlapped_score_among_protected():
    snap = snapshot_of(nodes((20, 20)),
                    (model("mid", gib=2, avg=1), model("low", gib=1, avg=1), model("new", gib=8, avg=1)),
                    (Copy("mid", "n0", (0,)), Copy("low", "n0", (1,))))
    assert prewarms(tick(snap, 0, Config())) == [("new", "n0", (1,))]


def test_empty_group_beats_any_overlap():
    snap = snapshot_of(nodes((20, 20)), (model("low", gib=1, avg=1), model("new", gib=8, avg=1)),
                    (Copy("low", "n0", (0,)),))
    assert prewarms(tick(snap, 0, Config())) == [("new", "n0", (1,))]


def test_memory_is_counted_in_pages():
    free = 4 * GIB + PAGE_BYTES - 1  # one byte short of the page the model's last byte needs
    snap = snapshot_of((Node("n0", (Gpu(0, free),)),), (ModelSpec("a", 4 * GIB + 1, 1, avg=1),))
    assert prewarms(tick(snap, 0, Config())) == []
    snap = snapshot_of((Node("n0", (Gpu(0, free + 1),)),), snap.models)
    assert prewarms(tick(snap, 0, Config())) == [("a", "n0", (0,))]


def test_standby_copies_fill_spare_memory_with_the_likeliest_idle_models():
    likely, unlikely, never = (dataclasses.replace(model(n), chance=c) for n, c in
                               (("likely", 0.6), ("unlikely", 0.1), ("never", 0.0)))
    standby = Config(standby_copies=True)
    effects = tick(snapshot_of(nodes((10,)), (likely, unlikely, never)), 0, standby)
    assert sorted(prewarms(effects)) == [("likely", "n0", (0,)), ("unlikely", "n0", (0,))]
    assert {e.reason for e in effects} == {fx.PREWARM_STANDBY}
    assert prewarms(tick(snapshot_of(nodes((5,)), (unlikely, likely)), 0, standby)) == [("likely", "n0", (0,))]
    assert prewarms(tick(snapshot_of(nodes((10,)), (likely, unlikely)), 0, Config())) == []  # the paper's rule
    # a predicted load outranks any standby copy: it takes the standby copy's room
    busy = model("busy", avg=1)
    effects = tick(snapshot_of(nodes((0,)), (likely, busy), (Copy("likely", "n0", (0,)),)), 0,
                   Config(standby_copies=True, placement="evict_aware"))
    assert evictions(effects) == [("likely", (0,))] and prewarms(effects) == [("busy", "n0", (0,))]


# ------------------------------------------------------------------ eviction


def full_cluster() -> Snapshot:
    """Two nearly full GPUs (1 GiB free each): a cheap 'low' copy on GPU0, a more valuable 'mid' on
    GPU1; 'new' (3 GiB) fits only by evicting one of them and outscores only 'low'."""
    return snapshot_of(nodes((1, 1)),
                    (model("low", gib=2, avg=1), model("mid", gib=6, avg=1), model("new", gib=3, avg=1)),
                    (Copy("low", "n0", (0,)), Copy("mid", "n0", (1,))))


def test_evict_aware_evicts_the_lowest_score_copy():
    effects = tick(full_cluster(), 0, Config(placement="evict_aware"))
    assert evictions(effects) == [("low", (0,))]
    assert prewarms(effects) == [("new", "n0", (0,))]
    evict = next(e for e in effects if isinstance(e, Evict))
    assert evict.reason == fx.EVICTED_FOR and evict.for_model == "new"


def test_eviction_needs_a_gain():
    # 'new' scores exactly like 'low' (same size, same forecast): evicting gains nothing
    snap = snapshot_of(nodes((0,)), (model("low", gib=2, avg=1), model("new", gib=2, avg=1)), (Copy("low", "n0", (0,)),))
    assert tick(snap, 0, Config()) == []


def test_copies_beyond_their_replica_count_score_zero_and_go_first():
    # 'spare' has no forecast any more: its copy scores 0 and is evicted before 'low'
    snap = snapshot_of(nodes((0, 0)), (model("spare", gib=8), model("low", gib=1, avg=1), model("new", gib=2, avg=1)),
                    (Copy("low", "n0", (0,)), Copy("spare", "n0", (1,))))
    assert evictions(tick(snap, 0, Config())) == [("spare", (1,))]


def test_evict_aware_evicts_a_lower_score_copy_that_breaks_laminarity():
    # TP3 groups (0, 1, 2) and (3, 4, 5) both half-overlap the TP2 copy on (2, 3): memory is
    # plentiful, but the group is only usable once that (lower-score) copy is gone
    snap = snapshot_of(nodes((40,) * 6), (model("low", gib=2, tp=2), model("new", gib=12, tp=3, avg=1)),
                    (Copy("low", "n0", (2, 3)),))
    effects = tick(snap, 0, Config(placement="evict_aware"))
    assert evictions(effects) == [("low", (2, 3))] and prewarms(effects) == [("new", "n0", (0, 1, 2))]
    assert tick(snap, 0, Config(placement="paper")) == []


def test_paper_mode_skips_when_full():
    assert tick(full_cluster(), 0, Config(placement="paper")) == []


def test_round_robin_takes_first_fit_in_turn_and_never_evicts():
    snap = snapshot_of(nodes((10, 10, 10)), (model("a", gib=1, avg=1), model("b", gib=1, avg=1), model("c", gib=1, avg=1)))
    got = prewarms(tick(snap, 0, Config(placement="round_robin")))
    assert [d for _, _, d in got] == [(0,), (1,), (2,)]
    assert tick(full_cluster(), 0, Config(placement="round_robin")) == []


def test_no_prewarm_ablation_plans_no_copies():
    snap = snapshot_of(nodes((40, 40)), (model("a", avg=100, peak=200),))
    assert prewarms(tick(snap, 0, Config(prewarm=False))) == []


# ------------------------------------------------------------------ allocation


def test_allocation_prefers_a_ready_copy_then_a_loading_one_then_cold():
    models = (model("a", gib=4),)
    both = snapshot_of(nodes((20, 20, 20)), models, (Copy("a", "n0", (1,), ready=False), Copy("a", "n0", (2,))))
    hit = allocate(both, "a", 0, Config())
    assert (hit.kind, hit.reason, hit.devices) == ("hit", fx.PREWARM_HIT, (2,))
    assert isinstance(hit.effects[-1], Promote)
    loading = snapshot_of(both.nodes, models, both.copies[:1])
    assert (allocate(loading, "a", 0, Config()).kind, allocate(loading, "a", 0, Config()).devices) == ("in_progress", (1,))
    cold = allocate(snapshot_of(both.nodes, models), "a", 0, Config())
    assert cold.kind == "miss" and isinstance(cold.effects[-1], ColdStart) and cold.reason == fx.COLD_START


def test_copy_under_a_running_instance_is_not_a_hit():
    snap = snapshot_of(nodes((20, 20)), (model("a"), model("b")),
                    (Copy("a", "n0", (0,)),), (Instance("b1", "b", "n0", (0,)),))
    got = allocate(snap, "a", 0, Config())
    assert got.kind == "miss" and got.devices == (1,)


def test_miss_takes_the_group_with_fewest_copies_and_evicts_all_of_them():
    # GPU0: two copies; GPU1: one copy; both fit 'a' (4 GiB) once their copies are gone
    snap = snapshot_of(nodes((1, 2)), (model("x", gib=2), model("y", gib=2), model("z", gib=2), model("a", gib=4)),
                    (Copy("x", "n0", (0,)), Copy("y", "n0", (0,)), Copy("z", "n0", (1,))))
    got = allocate(snap, "a", 0, Config())
    assert got.devices == (1,) and evictions(got.effects) == [("z", (1,))]


def test_promotion_evicts_only_as_far_as_kv_needs_lowest_score_first():
    # GPU0: the 'a' copy plus 'cheap' (score low) and 'dear' copies; 1 GiB free; 'a' needs 2 GiB KV
    models = (model("a", gib=4, kv_gib=2), model("cheap", gib=1, avg=1), model("dear", gib=3, avg=1))
    snap = snapshot_of(nodes((1,)), models, (Copy("a", "n0", (0,)), Copy("cheap", "n0", (0,)), Copy("dear", "n0", (0,))))
    got = allocate(snap, "a", 0, Config())
    assert got.kind == "hit" and evictions(got.effects) == [("cheap", (0,))]


def test_no_capacity_when_every_gpu_runs_an_instance():
    snap = snapshot_of(nodes((20,)), (model("a"), model("b")), (), (Instance("b1", "b", "n0", (0,)),))
    got = allocate(snap, "a", 0, Config())
    assert (got.kind, got.reason, got.effects) == ("none", fx.NO_CAPACITY, ())


# ------------------------------------------------------------------ autoscaler


def instances(n: int, started_at_s: float = 0.0) -> tuple[Instance, ...]:
    return tuple(Instance(f"a{i}", "a", "n0", (i,), started_at_s=started_at_s) for i in range(n))


@pytest.mark.parametrize("load,n,started,ups,downs", [
    (25.6, 1, 0, 0, 0),  # exactly 0.8*B: stay
    (26.0, 1, 0, 1, 0),  # above 0.8*B*n
    (52.0, 1, 0, 2, 0),  # enough instances to go back under the line
    (60.0, 3, 0, 0, 0),  # between 0.5*B*n = 48 and 0.8*B*n = 76.8
    (47.0, 3, 0, 0, 1),  # under 0.5*B*n: down to ceil(47 / 25.6) = 2
    (0.0, 3, 0, 0, 3),  # no load: scale to zero
    (0.0, 3, 97, 0, 0),  # younger than 5 s: protected
    (1.0, 1, 0, 0, 0),  # some load keeps the last instance
    (1.0, 0, 0, 1, 0),  # scale from zero on any load
])
def test_autoscaler_thresholds_and_protection(load, n, started, ups, downs):
    snap = snapshot_of(nodes((20,) * 8), (model("a"),), (), instances(n, started), {"a": load})
    effects = tick(snap, 100, Config(prewarm=False))
    starts = [e for e in effects if isinstance(e, (Promote, ColdStart))]
    assert len(starts) == ups and all(e.trigger == fx.SCALE_UP for e in starts)
    demotes = [e for e in effects if isinstance(e, Demote)]
    assert len(demotes) == downs and all(e.reason == fx.SCALE_DOWN for e in demotes)


@pytest.mark.parametrize("keep_s,started,downs", [(0.0, 90, 3), (30.0, 90, 0), (30.0, 60, 3)])
def test_keep_s_spares_young_instances_from_scale_down(keep_s, started, downs):
    snap = snapshot_of(nodes((20,) * 8), (model("a"),), (), instances(3, started), {"a": 0.0})
    effects = tick(snap, 100, Config(prewarm=False, keep_s=keep_s))
    assert len([e for e in effects if isinstance(e, Demote)]) == downs


def test_the_live_placer_exposes_keep_s():
    from services.placer.adapter import core_config
    from shared.settings import SettingsError, load_settings
    assert core_config(load_settings({}, env={})).keep_s == 0.0  # the paper's rule by default
    assert core_config(load_settings({"scale_down_keep_s": 30.0}, env={})).keep_s == 30.0
    with pytest.raises(SettingsError):
        load_settings({"scale_down_keep_s": -1.0}, env={})


def test_scale_down_demotes_the_least_busy_and_keeps_the_weights():
    insts = (Instance("busy", "a", "n0", (0,), inflight=9), Instance("idle", "a", "n0", (1,), inflight=0))
    snap = snapshot_of(nodes((20, 20)), (model("a", avg=1),), (), insts, {"a": 10.0})
    plan = plan_tick(snap, 100, Config())
    assert [e.instance_id for e in plan.effects if isinstance(e, Demote)] == ["idle"]
    assert [(c.model, c.devices, c.ready) for c in plan.copies] == [("a", (1,), True)]
    assert plan.instances == {"a": 1}


def test_scale_up_uses_a_prewarmed_copy():
    snap = snapshot_of(nodes((20, 20)), (model("a"),), (Copy("a", "n0", (1,)),), (), {"a": 5.0})
    effects = tick(snap, 0, Config(prewarm=False))
    assert [(type(e), e.devices, e.reason) for e in effects] == [(Promote, (1,), fx.PREWARM_HIT)]


# ------------------------------------------------------------------ KV-space prewarm


def kv_instance(inflight: int) -> Instance:
    # C = 3.2 GiB over B = 32: lends C - max(C*Q/B, C/B)
    return Instance("b1", "b", "n0", (0,), inflight=inflight, kv_capacity_bytes=int(3.2 * GIB))


def test_copies_borrow_idle_kv_space():
    snap = snapshot_of(nodes((0,)), (model("b"), model("a", gib=1, avg=1)), (), (kv_instance(0),))
    effects = tick(snap, 0, Config())
    assert [(e.model, e.reason, e.kv_host) for e in effects] == [("a", fx.PREWARM_KV_SPACE, "b1")]
    assert tick(snap, 0, Config(kv_prewarm=False)) == []


def test_busy_instance_lends_nothing():
    snap = snapshot_of(nodes((0,)), (model("b"), model("a", gib=1, avg=1)), (), (kv_instance(30),))
    assert tick(snap, 0, Config()) == []


def test_rising_load_reclaims_kv_space_lowest_score_first():
    # Q = 16 keeps half of 3.2 GiB: 1.6 GiB lendable, but 2 GiB is lent (two 1 GiB copies)
    models = (model("b"), model("cheap", gib=1, avg=1), model("dear", gib=1, avg=1, peak=200))
    copies = (Copy("cheap", "n0", (0,), kv_host="b1"), Copy("dear", "n0", (0,), kv_host="b1"))
    snap = snapshot_of(nodes((0,)), models, copies, (kv_instance(16),))
    effects = tick(snap, 0, Config())
    assert [(e.model, e.reason) for e in effects if isinstance(e, Evict)][0] == ("cheap", fx.KV_RECLAIMED)
    assert ("dear", (0,)) not in evictions(effects)
    # an allocation between ticks reclaims first too, even when it finds no GPUs for its model
    allocated = allocate(snap, "b", 0, Config())  # its one GPU is taken
    assert not allocated.found and [(e.model, e.reason) for e in allocated.effects] == [("cheap", fx.KV_RECLAIMED)]


def test_every_effect_carries_a_reason():
    snap = snapshot_of(nodes((4, 4), (4, 4)), (model("a", avg=40, peak=90), model("b", avg=3), model("c", avg=0)),
                    (Copy("c", "n1", (0,)),), instances(1), {"a": 70.0})
    effects = tick(snap, 100, Config())
    assert effects and all(e.reason for e in effects)


# ------------------------------------------------------------------ displacement (no idle group)


def displacement_case(insts, loads=None, copies=(), free=(1, 1)) -> Snapshot:
    """GPUs nearly full of other models' instances; 'a' (4 GiB) fits only where one is displaced."""
    return snapshot_of(nodes(free), (model("a"), model("b"), model("c")), copies, insts, loads or {})


def inst(iid: str, m: str, gpu: int, inflight: int = 0, started: float = 0.0) -> Instance:
    return Instance(iid, m, "n0", (gpu,), started_at_s=started, inflight=inflight)


@pytest.mark.parametrize("insts,loads,expected", [
    # an idle instance goes, even its model's last (no request of it would wait)
    ((inst("b1", "b", 0, 3), inst("c1", "c", 1, 0)), {}, "c1"),
    # the least busy of a model whose other instance still carries its load under 0.8*B
    ((inst("b1", "b", 0, 3), inst("b2", "b", 1, 1)), {"b": 4.0}, "b2"),
    # never the last instance of a model with requests in flight
    ((inst("b1", "b", 0, 3), inst("c1", "c", 1, 1)), {}, None),
    # the remaining instance could not carry the load (40 > 0.8 * 32)
    ((inst("b1", "b", 0, 20), inst("b2", "b", 1, 20)), {"b": 40.0}, None),
    # windowed load counts too, not only requests in flight
    ((inst("b1", "b", 0, 1), inst("b2", "b", 1, 1)), {"b": 30.0}, None),
    # instances younger than protect_s stay
    ((inst("b1", "b", 0, 0, started=98), inst("c1", "c", 1, 0, started=97)), {}, None),
])
def test_displacement_takes_the_least_load_and_never_starves(insts, loads, expected):
    got = allocate(displacement_case(insts, loads), "a", 100, Config())
    demoted = [e for e in got.effects if isinstance(e, Demote)]
    if expected is None:
        assert (got.kind, got.effects) == ("none", ())
        return
    assert [e.instance_id for e in demoted] == [expected]
    assert (demoted[0].reason, demoted[0].for_model) == (fx.DISPLACED_FOR, "a")
    victim = demoted[0].model
    assert [type(e) for e in got.effects] == [Demote, Evict, ColdStart]  # drain, drop its weights, load
    assert (got.effects[1].model, got.effects[1].for_model) == (victim, "a")
    assert got.effects[-1].devices == demoted[0].devices and got.kind == "miss"


def test_an_unserved_model_may_displace_idle_instances_inside_their_protection():
    young = (inst("b1", "b", 0, 0, started=98), inst("c1", "c", 1, 2, started=97))
    unserved_first = Config(unserved_first=True)
    got = allocate(displacement_case(young), "a", 100, unserved_first)
    assert [e.instance_id for e in got.effects if isinstance(e, Demote)] == ["b1"]  # c1 is busy: it stays
    assert allocate(displacement_case(young), "a", 100, Config()).effects == ()  # the paper: protection holds
    served = displacement_case(young + (Instance("a1", "a", "n0", (1,), inflight=40),))
    assert allocate(served, "a", 100, unserved_first).effects == ()  # 'a' already has a serving instance
    roomier = displacement_case(young, free=(1, 1, 1))  # a third GPU: one instance for each of a, b, c fits
    assert allocate(roomier, "a", 100, unserved_first).effects == ()  # not over-full: protection holds


def test_a_scale_up_never_displaces_young_instances():
    """Only a waiting request takes young instances: a scale-up of a model whose windowed load outlives
    its requests took them too, and two such models took each other's new instances every tick
    (bench live, fake engines: 317 cold starts for 242 requests, 267 of them scale-ups)."""
    young = (inst("b1", "b", 0, 0, started=98), inst("c1", "c", 1, 0, started=97))
    config = Config(unserved_first=True, prewarm=False)
    snap = displacement_case(young, loads={"a": 1.0, "b": 1.0, "c": 1.0})
    assert tick(snap, 100, config) == []
    assert [type(e) for e in allocate(snap, "a", 100, config).effects] == [Demote, Evict, ColdStart]
    old = displacement_case((inst("b1", "b", 0, 0), inst("c1", "c", 1, 2)), loads={"a": 1.0, "b": 1.0, "c": 1.0})
    assert [e.instance_id for e in tick(old, 100, config) if isinstance(e, Demote)] == ["b1"]  # past protection: as before


def test_displacement_prefers_a_group_with_a_ready_copy_and_promotes_it():
    snap = displacement_case((inst("b1", "b", 0), inst("c1", "c", 1)), copies=(Copy("a", "n0", (1,)),), free=(1, 5))
    got = allocate(snap, "a", 100, Config())
    assert [(type(e), e.devices) for e in got.effects] == [(Demote, (1,)), (Promote, (1,))]
    assert got.kind == "hit"


def test_displacement_evicts_copies_borrowing_the_victims_kv_first():
    host = Instance("b1", "b", "n0", (0,), started_at_s=0, kv_capacity_bytes=int(3.2 * GIB))
    snap = snapshot_of(nodes((1,)), (model("a"), model("b"), model("c", gib=1, avg=1)),
                    (Copy("c", "n0", (0,), kv_host="b1"),), (host,))
    got = allocate(snap, "a", 100, Config())
    assert [(type(e), e.model) for e in got.effects] == [(Evict, "c"), (Demote, "b"), (Evict, "b"), (ColdStart, "a")]


def test_displacement_needs_the_whole_group_to_fit():
    # TP2 'a' takes 4 GiB per GPU: GPU0 frees 5 GiB without b, GPU1 only 2 GiB without c
    snap = snapshot_of(nodes((1, 1)), (model("a", gib=8, tp=2), model("b"), model("c", gib=1)), (),
                    (inst("b1", "b", 0), inst("c1", "c", 1)))
    assert allocate(snap, "a", 100, Config()).effects == ()
    both = snapshot_of(nodes((1, 3)), snap.models, (), snap.instances)
    assert [type(e) for e in allocate(both, "a", 100, Config()).effects] == [Demote, Demote, Evict, Evict, ColdStart]


def test_displacement_reason_reaches_the_agent_command():
    from services.placer.adapter import command_for
    got = allocate(displacement_case((inst("b1", "b", 0), inst("c1", "c", 1))), "a", 100, Config())
    assert command_for(got.effects[0], "id").reason == "displaced_for:a"


# ------------------------------------------------------------------ promotable copies (ours)

PROMOTABLE = Config(promotable_copies=True)
BUSY_B = {"b": 5.0}  # b's instance stays (no scale-down)


def test_a_copy_under_another_instance_does_not_count_when_copies_must_be_promotable():
    # 'a' wants one copy; its only copy shares GPU0 with b's instance, GPU1 is idle
    snap = snapshot_of(nodes((5, 10)), (model("a", avg=1), model("b")), (Copy("a", "n0", (0,)),), (inst("b1", "b", 0),), BUSY_B)
    assert prewarms(tick(snap, 100, Config())) == []  # the paper: the copy counts
    assert prewarms(tick(snap, 100, PROMOTABLE)) == [("a", "n0", (1,))]


def test_only_models_within_the_promotable_tp_replace_a_blocked_copy():
    # 'a' (TP2) wants one copy; its only copy shares GPUs 0-1 with b's instance, GPUs 2-3 are idle
    snap = snapshot_of(nodes((5, 5, 10, 10)), (model("a", tp=2, avg=1), model("b", tp=2)),
                    (Copy("a", "n0", (0, 1)),), (Instance("b1", "b", "n0", (0, 1), inflight=1),), BUSY_B)
    assert prewarms(tick(snap, 100, PROMOTABLE)) == []  # TP2 > promotable_max_tp 1: the copy counts
    assert prewarms(tick(snap, 100, Config(promotable_copies=True, promotable_max_tp=2))) == [("a", "n0", (2, 3))]


def test_a_model_beyond_the_promotable_tp_may_place_copies_on_gpus_with_instances():
    snap = snapshot_of(nodes((10, 10)), (model("a", tp=2, avg=1), model("b")), (), (inst("b1", "b", 0),), BUSY_B)
    assert prewarms(tick(snap, 100, PROMOTABLE)) == [("a", "n0", (0, 1))]
    assert prewarms(tick(snap, 100, Config(promotable_copies=True, promotable_max_tp=2))) == []


def test_the_live_placer_exposes_promotable_max_tp():
    from services.placer.adapter import core_config
    from shared.settings import SettingsError, load_settings
    assert core_config(load_settings({}, env={})).promotable_max_tp == 1
    assert core_config(load_settings({}, env={"WARMSERVE_PROMOTABLE_MAX_TP": "4"})).promotable_max_tp == 4
    with pytest.raises(SettingsError):
        load_settings({"promotable_max_tp": -1}, env={})
    with pytest.raises(ValueError):
        Config(promotable_max_tp=-1)


def test_the_live_placer_puts_unserved_models_first_unless_told_not_to():
    from services.placer.adapter import core_config
    from shared.settings import load_settings
    assert core_config(load_settings({}, env={})).unserved_first is True
    assert core_config(load_settings({}, env={"WARMSERVE_UNSERVED_FIRST": "false"})).unserved_first is False


def test_promotable_copies_go_to_gpus_without_instances_only():
    snap = snapshot_of(nodes((10,)), (model("a", avg=1), model("b")), (), (inst("b1", "b", 0),), BUSY_B)
    assert prewarms(tick(snap, 100, Config())) == [("a", "n0", (0,))]
    assert prewarms(tick(snap, 100, PROMOTABLE)) == []


def test_blocked_copies_rank_last_and_score_zero_beyond_the_wanted_count():
    snap = snapshot_of(nodes((5, 10)), (model("a", avg=1), model("b")), (Copy("a", "n0", (0,)), Copy("a", "n0", (1,))),
                    (inst("b1", "b", 0),), BUSY_B)
    scores = {c.devices: c.score for c in plan_tick(snap, 100, PROMOTABLE).copies}
    assert scores[(1,)] > 0 and scores[(0,)] == 0


def test_an_allocation_replaces_the_copies_its_instance_blocks_at_once():
    # a's instance takes GPU0, where c's only copy sits: with promotable copies c gets a new copy on GPU1
    snap = snapshot_of(nodes((20, 20)), (model("a"), model("c", avg=1)), (Copy("a", "n0", (0,)), Copy("c", "n0", (0,))))
    plain = allocate(snap, "a", 0, Config())
    assert [type(e) for e in plain.effects] == [Promote]
    got = allocate(snap, "a", 0, PROMOTABLE)
    assert [type(e) for e in got.effects] == [Promote, Prewarm]
    assert prewarms(got.effects) == [("c", "n0", (1,))]
