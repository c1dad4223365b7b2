"""Retiring models that are no longer registered (`warmserve models remove`): every instance of
such a model is demoted (drained) and every copy evicted, on every node, before anything else is
planned. The rest of the core ignores them (their memory counts as used until agents report it freed).
"""

from __future__ import annotations

from services.placer.core import effects as fx
from services.placer.core.node_inputs import MODEL
from services.placer.core.snapshot import Snapshot


def retire_unregistered(snapshot: Snapshot) -> list[fx.Effect]:
    """Demotes of the unregistered models' instances (unless draining) and evictions of their copies."""
    known = {m.name for m in snapshot.models}
    effects: list[fx.Effect] = []
    for node in snapshot.nodes:
        if known.issuperset(map(MODEL, node.instances)) and known.issuperset(map(MODEL, node.copies)):
            continue  # the common case, checked at C speed
        effects += [fx.Demote(i.model, node.name, i.devices, i.instance_id, fx.UNREGISTERED)
                    for i in node.instances if i.model not in known and not i.draining]
        effects += [fx.Evict(c.model, node.name, c.devices, fx.UNREGISTERED)
                    for c in node.copies if c.model not in known]
    return effects
