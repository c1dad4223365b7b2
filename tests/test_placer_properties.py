"""Property tests of the placer core: after any sequence of ticks and allocations (with changing
forecasts, loads and KV use), memory is never over-committed, TP groups stay laminar, no GPU holds
two copies of one model, lent KV space stays within what instances can lend, effects are valid."""

from __future__ import annotations

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from services.placer.core import (PAGE_BYTES, Config, Copy, Demote, Evict, Gpu, ModelSpec, Node, Prewarm, Promote,
                                  Reuse, Snapshot, allocate, apply_effects, plan_tick, snapshot_of)
from services.placer.core.scores import copy_pages, kv_lendable_pages

GIB = 1 << 30


@st.composite
def clusters(draw) -> Snapshot:
    node_sizes = draw(st.lists(st.sampled_from([1, 2, 4, 8]), min_size=1, max_size=3))
    gpu_gib = draw(st.sampled_from([8, 16, 24]))
    nodes = tuple(Node(f"n{i}", tuple(Gpu(d, gpu_gib * GIB) for d in range(n))) for i, n in enumerate(node_sizes))
    models = []
    for i in range(draw(st.integers(1, 6))):
        tp = draw(st.sampled_from([1, 1, 2, 3, 4, 8]))  # 3: aligned groups that are not powers of two
        models.append(ModelSpec(f"m{i}", int(tp * draw(st.floats(0.5, 12)) * GIB), tp,
                                avg=draw(st.floats(0, 100)), peak=draw(st.floats(0, 200)),
                                kv_bytes=draw(st.sampled_from([0, GIB // 2, 2 * GIB])),
                                engine_bytes=draw(st.sampled_from([0, GIB]))))
    if not draw(st.booleans()):
        return snapshot_of(nodes, tuple(models))
    # an observed, unaligned TP2 copy on devices (1, 2) of nodes with 4+ GPUs (agents may report one)
    odd = ModelSpec("odd", 2 * GIB, 2)
    nodes = tuple(Node(n.name, tuple(Gpu(g.index, g.free_bytes - (GIB if g.index in (1, 2) and len(n.gpus) >= 4 else 0))
                                     for g in n.gpus)) for n in nodes)
    copies = tuple(Copy("odd", n.name, (1, 2)) for n in nodes if len(n.gpus) >= 4)
    return snapshot_of(nodes, (*models, odd), copies)


steps = st.lists(st.tuples(st.sampled_from(["tick", "allocate"]), st.integers(0, 5), st.floats(0, 150),
                           st.integers(0, 40)), min_size=1, max_size=8)
configs = st.builds(Config, placement=st.sampled_from(["evict_aware", "paper", "round_robin"]),
                    prewarm=st.booleans(), kv_prewarm=st.booleans(), allocation=st.sampled_from(["paper", "hit_first"]))


def occupants(snap: Snapshot):
    return [(c.model, c.node, c.devices) for c in snap.copies] + [(i.model, i.node, i.devices) for i in snap.instances]


def check_invariants(snap: Snapshot, config: Config) -> None:
    for node in snap.nodes:
        for gpu in node.gpus:
            assert gpu.free_bytes >= 0, f"over-committed {node.name}:{gpu.index}"
    by_node: dict[str, list] = {}
    for model, node, devices in occupants(snap):
        by_node.setdefault(node, []).append((model, frozenset(devices)))
    for node, occs in by_node.items():
        for i, (ma, a) in enumerate(occs):
            for mb, b in occs[i + 1:]:
                if a & b:
                    assert ma != mb, f"two copies of {ma} on {node}:{sorted(a & b)}"
                    assert a <= b or b <= a, f"not laminar on {node}: {sorted(a)} vs {sorted(b)}"
                    if len(a) == len(b):
                        assert a == b
    models = {m.name: m for m in snap.models}
    for inst in snap.instances:  # KV capacity, use and lending are per device
        lendable = kv_lendable_pages(inst.kv_capacity_bytes, inst.inflight, inst.kv_used_bytes, config.capacity)
        for d in inst.devices:
            lent = sum(copy_pages(models[c.model]) for c in snap.copies
                       if c.kv_host == inst.instance_id and d in c.devices)
            assert lent <= max(lendable, 0) or not config.kv_prewarm and lent == 0


def check_effects_valid(before: Snapshot, effects) -> None:
    """Evictions and promotions address copies that exist by then (observed, prewarmed or demoted
    earlier in the same list); demotions address running instances."""
    present = {(c.model, c.node, c.devices) for c in before.copies}
    running = {i.instance_id for i in before.instances}
    for e in effects:
        key = (e.model, e.node, e.devices)
        if isinstance(e, (Evict, Promote)):
            assert key in present, f"addresses a copy that is not there: {e}"
            present.discard(key)
        elif isinstance(e, Prewarm):
            present.add(key)
        elif isinstance(e, Demote):
            assert e.instance_id in running, f"demotes an instance that is not there: {e}"
            present.add(key)
        assert e.reason


def with_load(snap: Snapshot, step, now: float) -> Snapshot:
    """Vary forecasts, load and instances' requests and KV use between steps."""
    _, pick, load, inflight = step
    models = tuple(ModelSpec(m.name, m.size_bytes, m.tp, avg=(m.avg + load) % 120, peak=(m.peak + 2 * load) % 240,
                             kv_bytes=m.kv_bytes, engine_bytes=m.engine_bytes) for m in snap.models)
    name = models[pick % len(models)].name
    instances = tuple(type(i)(i.instance_id, i.model, i.node, i.devices, i.started_at_s, inflight,
                              i.kv_capacity_bytes, min(i.kv_capacity_bytes, inflight * PAGE_BYTES), ready=True)
                      for i in snap.instances)  # instances started by earlier steps are ready now
    return snapshot_of(snap.nodes, models, snap.copies, instances, {name: load})


# a scale-down and, in the same tick, a copy lent the KV space of the instance it demotes (found by hypothesis)
SCALE_DOWN_THEN_LEND = snapshot_of(
    (Node("n0", (Gpu(0, 8 * GIB),)),),
    (ModelSpec("m0", GIB), ModelSpec("m1", 2 * GIB), ModelSpec("m2", GIB), ModelSpec("m3", 3 * GIB),
     ModelSpec("m4", 4 * GIB, kv_bytes=2 * GIB)))

# a TP2 instance lending each of its two devices' KV space to a different copy (within what one device can lend)
TP2_HOST_LENDS_ON_EACH_DEVICE = snapshot_of(
    (Node("n0", (Gpu(0, 16 * GIB), Gpu(1, 16 * GIB))),),
    (*(ModelSpec(f"m{i}", GIB) for i in range(4)), ModelSpec("m4", 14 * GIB, 2, kv_bytes=2 * GIB, engine_bytes=GIB),
     ModelSpec("m5", 3 * GIB)))

# a TP2 host with a lent copy on each device scales down: each device's copies move to that device's pool
TP2_HOST_SCALES_DOWN = snapshot_of(
    (Node("n0", (Gpu(0, 16 * GIB), Gpu(1, 16 * GIB))),),
    (ModelSpec("m0", 3 * GIB // 2), *(ModelSpec(f"m{i}", GIB) for i in (1, 2, 3)),
     ModelSpec("m4", 22 * GIB, 2, kv_bytes=2 * GIB)))

# two ticks lend an instance's idle KV space; then its load rises and an allocation comes before the next tick
LENT_THEN_ALLOCATE = snapshot_of(
    (Node("n0", (Gpu(0, 8 * GIB),)),),
    (ModelSpec("m0", 2 * GIB), ModelSpec("m1", GIB), ModelSpec("m2", 2_013_265_920), ModelSpec("m3", 2 * GIB),
     ModelSpec("m4", GIB, kv_bytes=2 * GIB)))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(clusters(), steps, configs)
@example(LENT_THEN_ALLOCATE, [("tick", 4, 1.0, 0), ("tick", 4, 1.0, 0), ("allocate", 0, 0.0, 3)],
         Config(placement="evict_aware", kv_prewarm=True))
@example(TP2_HOST_SCALES_DOWN, [("tick", 4, 7.0, 0), ("tick", 4, 10.0, 0), ("tick", 0, 0.0, 0)],
         Config(placement="evict_aware", kv_prewarm=True))
@example(SCALE_DOWN_THEN_LEND, [("tick", 4, 1.0, 0), ("tick", 0, 0.0, 0), ("tick", 0, 0.0, 0)],
         Config(placement="evict_aware", kv_prewarm=True))
@example(TP2_HOST_LENDS_ON_EACH_DEVICE, [("tick", 4, 7.0, 0), ("tick", 4, 10.0, 0)],
         Config(placement="evict_aware", kv_prewarm=True))
def test_invariants_hold_after_any_sequence(snap, sequence, config):
    now = 0.0
    for step in sequence:
        now += 7.0  # past the protection window: scale-downs are possible
        snap = with_load(snap, step, now)
        if step[0] == "tick":
            effects = plan_tick(snap, now, config).effects
        else:
            effects = allocate(snap, snap.models[step[1] % len(snap.models)].name, now, config).effects
        check_effects_valid(snap, effects)
        snap = apply_effects(snap, effects, now)
        check_invariants(snap, config)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(clusters(), steps, configs)
def test_reusing_the_index_decides_the_same(snap, sequence, config):
    """A Reuse handle carried through every call (as the simulator does) changes no decision: each
    step decides twice on one snapshot (the second call reuses what the first left untouched)."""
    reuse, now = Reuse(), 0.0
    for step in sequence:
        now += 7.0
        snap = with_load(snap, step, now)
        model = snap.models[step[1] % len(snap.models)].name
        ticked = plan_tick(snap, now, config, reuse)
        assert ticked == plan_tick(snap, now, config)
        allocated = allocate(snap, model, now, config, reuse)
        assert allocated == allocate(snap, model, now, config)
        snap = apply_effects(snap, ticked.effects if step[0] == "tick" else allocated.effects, now)


@settings(max_examples=100, deadline=None)
@given(clusters(), st.integers(0, 5))
def test_allocation_promotes_only_idle_full_copies(snap, pick):
    snap = apply_effects(snap, plan_tick(snap, 0.0, Config()).effects, 0.0)
    model = snap.models[pick % len(snap.models)]
    got = allocate(snap, model.name, 1.0, Config())
    busy = {(i.node, d) for i in snap.instances for d in i.devices}
    for e in got.effects:
        if isinstance(e, Demote):  # displaced for this allocation: its GPUs are free after the drain
            busy -= {(e.node, d) for d in e.devices}
        if isinstance(e, Promote):
            assert len(e.devices) == model.tp and not busy & {(e.node, d) for d in e.devices}
    check_invariants(apply_effects(snap, got.effects, 1.0), Config())
