"""The agent's memory ledger: page accounting, refusal reasons, eviction only as far as needed."""

from __future__ import annotations

import pytest

from services.gpuagent.core.ledger import PAGE_BYTES, DeviceLedger, Refused, instance_kv_bytes, page_bytes, pages
from shared.schemas import CopyState

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
    assert d.reserve_copy("a", "h1", MiB, 0) is not None
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
    # 4 MiB free; instance needs 4 (engine) + 4 (kv) = 8: one eviction is enough
    assert d.room_for_instance("m", 4 * MiB, 4 * MiB) == ["old"]
    d.start_instance("i", "m", 4 * MiB, 4 * MiB, now_s=5)
    assert set(d.copies) == {"mid", "new", "m"} and d.free_bytes == 0


def test_loading_copies_and_the_model_itself_are_never_evicted():
    d = DeviceLedger(0, 12 * MiB)
    d.reserve_copy("m", "h", 4 * MiB, 0)
    d.copy_ready("m")
    d.reserve_copy("loading", "h", 4 * MiB, 0)
    with pytest.raises(Refused, match="short by"):
        d.room_for_instance("m", 4 * MiB, 4 * MiB)


def test_one_instance_per_device_and_serving_copy_cannot_be_dropped():
    d = DeviceLedger(0, 100 * MiB)
    d.reserve_copy("m", "h", MiB, 0)
    d.copy_ready("m")
    d.start_instance("i1", "m", MiB, MiB, 0)
    with pytest.raises(Refused, match="already serves m"):
        d.room_for_instance("x", MiB, MiB)
    with pytest.raises(Refused, match="demote it first"):
        d.drop_copy("m")
    assert d.end_instance("i1").model == "m" and d.instance is None


def test_kv_reservation_never_below_one_context():
    assert instance_kv_bytes(1000, 2048, 0) == page_bytes(2_304_000)
    assert instance_kv_bytes(1000, 2048, 64 * MiB) == 64 * MiB
