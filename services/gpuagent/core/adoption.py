"""A device's ledger rebuilt from what a surviving worker holds (pure, no I/O, no clock reads).

A restarted agent adopts the device workers its predecessor left running; each reports in its
`status` the copies, warm engines and instance that the agent's calls put there, with the sizes
those calls gave. The ledger charges them exactly as it did when they were made.
"""

from __future__ import annotations

from services.gpuagent.core.ledger import (KEPT_COPY, CopyRecord, DeviceLedger, EngineRecord, InstanceRecord,
                                           page_bytes)
from shared.schemas import CopyState, InstanceState


def adopted_ledger(index: int, status: dict, now_s: float) -> DeviceLedger:
    """The ledger of device `index` from its worker's status detail (memory_bytes, pool, engines,
    instances). Adopted copies count as kept copies: why they were loaded is not known any more."""
    ledger = DeviceLedger(index, status["memory_bytes"])
    for c in status["pool"]:
        ledger.copies[c["model"]] = CopyRecord(c["model"], c["content_hash"], page_bytes(c["bytes"]),
                                               CopyState.ready, 1.0, now_s, KEPT_COPY)
    for e in status["engines"]:
        ledger.engines[e["arch"]] = EngineRecord(e["arch"], page_bytes(e["kv_bytes"]), now_s)
    for i in status["instances"]:  # at most one
        ledger.instance = InstanceRecord(i["instance_id"], i["model"], i["arch"], InstanceState.ready,
                                         i["started_at_s"])
    return ledger
