"""The agent's memory ledger: page accounting, refusal reasons, eviction only as far as needed,
warm engines kept after a demote and dropped first when room is needed, why each copy is there
and what an instance start finds."""

from __future__ import annotations

import pytest

from services.gpuagent.core.ledger import (PAGE_BYTES, DeviceLedger, Refused, Room, copy_origin, instance_kv_bytes,
                                           page_bytes, pages)
from services.gpuagent.core.engines import engine_models, kept_arch, stale_engines
from shared.schemas import CopyState, ModelInfo

MiB = 1 << 20


@pytest.mark.parametrize("nbytes,expected", [(0, 0), (1, 1), (PAGE_BYTES, 1), (PAGE_BYTES + 1, 2), (10 * MiB, 5)])
def test_pages_round_up(nbytes, expected):
    assert pages(nbytes) == expected


def test_copies_are_charged_in_pages_and_freed_at_once():
    d = DeviceLedger(0, 100 * MiB)
    d.reserve_copy("a", "h", 3 * MiB, now_s=1)
    assert d.used_bytes == 4 * MiB and d.copies["a"].state == CopyState.loading
    d.copy_ready("a")
    d.drop_copy("a")
    assert d.free_bytes == 100 * MiB


def test_repeated_prewarm_is_idempotent_and_other_checkpoint_refused():
    d = DeviceLedger(0, 100 * MiB)
    assert d.reserve_copy("a", "h1", MiB, 0) == []
    assert d.reserve_copy("a", "h1", MiB, 0) is None
    with pytest.raises(Refused, match="another checkpoint"):
        d.reserve_copy("a", "h2", MiB, 0)


def test_oversized_prewarm_refused_with_reason():
    d = DeviceLedger(0, 10 * MiB)
    with pytest.raises(Refused, match="not enough memory on device 0"):
        d.reserve_copy("big", "h", 11 * MiB, 0)


def test_instance_evicts_least_recently_used_copies_only_as_needed():
    d = DeviceLedger(0, 20 * MiB)
    for name, used in (("old", 1), ("mid", 2), ("new", 3)):
        d.reserve_copy(name, "h", 4 * MiB, used)
        d.copy_ready(name)
    d.reserve_copy("m", "h", 4 * MiB, 4)
    d.copy_ready("m")
    # 4 MiB free; the instance's engine needs its 8 MiB KV cache: one eviction is enough
    assert d.room_for_instance("m", "arch", 8 * MiB) == Room([], ["old"])
    d.start_instance("i", "m", "arch", 8 * MiB, now_s=5)
    assert set(d.copies) == {"mid", "new", "m"} and d.free_bytes == 0


def test_loading_copies_and_the_model_itself_are_never_evicted():
    d = DeviceLedger(0, 12 * MiB)
    d.reserve_copy("m", "h", 4 * MiB, 0)
    d.copy_ready("m")
    d.reserve_copy("loading", "h", 4 * MiB, 0)
    with pytest.raises(Refused, match="short by"):
        d.room_for_instance("m", "arch", 8 * MiB)


def test_one_instance_per_device_and_serving_copy_cannot_be_dropped():
    d = DeviceLedger(0, 100 * MiB)
    d.reserve_copy("m", "h", MiB, 0)
    d.copy_ready("m")
    d.start_instance("i1", "m", "arch", MiB, 0)
    with pytest.raises(Refused, match="already serves m"):
        d.room_for_instance("x", "arch", MiB)
    with pytest.raises(Refused, match="demote it first"):
        d.drop_copy("m")
    assert d.end_instance("i1", 1).model == "m" and d.instance is None


@pytest.mark.parametrize("reason,origin", [("prewarm_foundation", "forecast_prewarm"), ("prewarm_burst", "forecast_prewarm"),
                                           ("cold_start:instance_needed", "cold_start"), ("", "commanded"),
                                           ("by hand", "commanded")])
def test_a_copy_remembers_why_it_was_loaded(reason, origin):
    assert copy_origin(reason) == origin


def test_instance_start_kinds_follow_the_copy_history():
    d = DeviceLedger(0, 100 * MiB)
    assert d.start_kind("m", loading=False) == "miss"
    d.reserve_copy("m", "h", MiB, 0, origin="forecast_prewarm")
    assert d.start_kind("m", loading=False) == "loading"  # not ready yet
    d.copy_ready("m")
    assert d.start_kind("m", loading=True) == "loading" and d.start_kind("m", loading=False) == "forecast_prewarm"
    d.reserve_copy("m", "h", MiB, 1, origin="cold_start")  # the same copy again: keeps its origin
    assert d.copies["m"].origin == "forecast_prewarm"
    d.start_instance("i1", "m", "arch", MiB, 2)
    d.end_instance("i1", 3)
    assert d.start_kind("m", loading=False) == "kept_copy"
    d.reserve_copy("c", "h", MiB, 4, origin="cold_start")
    d.copy_ready("c")
    assert d.start_kind("c", loading=False) == "kept_copy"  # a cold start's leftover


def test_kv_reservation_never_below_one_context():
    assert instance_kv_bytes(1000, 2048, 0) == page_bytes(2_304_000)
    assert instance_kv_bytes(1000, 2048, 64 * MiB) == 64 * MiB


def test_demoted_engine_stays_warm_and_is_reused_without_new_room():
    d = DeviceLedger(0, 20 * MiB)
    d.start_instance("i1", "a", "arch", 8 * MiB, now_s=0)
    d.end_instance("i1", now_s=1)
    assert d.engines["arch"].bytes == 8 * MiB and d.idle_engine_bytes == 8 * MiB
    assert d.free_bytes == 12 * MiB and d.reclaimable_free_bytes == 20 * MiB  # the placer may plan with it
    assert d.room_for_instance("b", "arch", 4 * MiB) == Room([], [])  # same architecture: reuse


def test_idle_engines_are_dropped_before_copies_and_serving_engine_never():
    d = DeviceLedger(0, 24 * MiB)
    d.start_instance("i1", "a", "arch1", 8 * MiB, now_s=0)
    d.end_instance("i1", now_s=1)
    d.reserve_copy("c", "h", 8 * MiB, 2)
    d.copy_ready("c")
    # 8 free; the other arch's engine needs 12: drop the idle arch1 engine (8), keep the copy
    assert d.room_for_instance("b", "arch2", 12 * MiB) == Room(["arch1"], [])
    d.start_instance("i2", "b", "arch2", 12 * MiB, now_s=3)
    assert set(d.engines) == {"arch2"} and "c" in d.copies
    assert d._idle_engines_to_drop(100 * MiB) == []  # the serving engine is not idle


def test_prewarm_drops_idle_engines_only_as_needed():
    d = DeviceLedger(0, 16 * MiB)
    d.start_instance("i1", "a", "arch1", 8 * MiB, now_s=0)
    d.end_instance("i1", now_s=1)
    assert d.reserve_copy("small", "h", 8 * MiB, 2) == []
    assert d.reserve_copy("big", "h", 8 * MiB, 3) == ["arch1"]
    assert d.engines == {} and d.free_bytes == 0
    with pytest.raises(Refused, match="not enough memory"):
        d.reserve_copy("more", "h", MiB, 4)


def test_the_kept_architectures_idle_engine_is_dropped_last():
    """Idle engines of three architectures; llama is kept (most models share it, and the oldest
    here): copies and instances take the others' room first."""
    def model(name, arch, tp=1):
        return ModelInfo(name=name, path="", size_bytes=1, content_hash=name, arch=arch, tp=tp)

    assert kept_arch([model("a", "qwen"), model("b", "llama"), model("c", "llama"), model("w", "moe", tp=2),
                      model("x", "moe", tp=2), model("y", "moe", tp=2)]) == "llama"
    assert kept_arch([model("a", "qwen"), model("b", "llama")]) == "llama" and kept_arch([]) == ""
    d = DeviceLedger(0, 40 * MiB, kept_arch="llama")
    for arch, size, at in (("llama", 8, 0), ("qwen", 8, 1), ("big", 16, 1)):
        d.reserve_engine(arch, size * MiB, now_s=at)
    assert d.reserve_copy("c1", "h", 20 * MiB, 2) == ["big"]  # only as much as needed
    assert d.room_for_instance("m", "moe", 8 * MiB) == Room(["qwen"], [])  # llama's (older) last
    assert d.reserve_copy("c2", "h", 16 * MiB, 3) == ["qwen", "llama"]


def test_failed_start_forgets_the_engine():
    d = DeviceLedger(0, 16 * MiB)
    d.start_instance("i1", "a", "arch", 4 * MiB, now_s=0)
    d.end_instance("i1", now_s=1, keep_engine=False)
    assert d.engines == {} and d.free_bytes == 16 * MiB


def test_engines_follow_the_registry():
    def model(name, size, arch, tp=1):
        return ModelInfo(name=name, path="", size_bytes=size, content_hash=name, arch=arch, tp=tp)

    models = [model("l-big", 9, "llama"), model("l-small", 5, "llama"), model("q", 7, "qwen"),
              model("wide", 1, "mixtral", tp=2)]
    assert [m.name for m in engine_models(models)] == ["l-small", "q"]  # smallest per arch, smallest first
    d = DeviceLedger(0, 100 * MiB)
    for arch in ("llama", "qwen", "gone"):
        d.reserve_engine(arch, 2 * MiB, now_s=1)
    assert stale_engines(d, {"llama", "qwen", "mixtral"}) == ["gone"]
    d.start_instance("i", "x", "gone", 2 * MiB, now_s=2)
    assert stale_engines(d, {"llama"}) == ["qwen"]  # a serving engine is never stale
