"""The `/v1/models` listing: every registered model with its warm state across the cluster.

Pure: built from the registry and the agents' node views; no I/O. The warm state is the best
one found: serving > starting > prewarmed > loading > cold.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from shared.schemas import ModelInfo, NodeView


def warm_state(counts: Counter) -> str:
    if counts["instances_ready"]:
        return "serving"
    if counts["instances_starting"]:
        return "starting"
    if counts["copies_ready"]:
        return "prewarmed"
    if counts["copies_loading"]:
        return "loading"
    return "cold"


def model_cards(models: dict[str, ModelInfo], views: dict[str, NodeView], created_s: int) -> dict[str, Any]:
    """An OpenAI model list; each card adds `max_model_len` and a `warm` block."""
    counts: dict[str, Counter] = {name: Counter() for name in models}
    for view in views.values():
        for instance in view.instances:
            if instance.model in counts:
                counts[instance.model][f"instances_{instance.state.value}"] += 1
        for copy in view.copies:
            if copy.model in counts:
                counts[copy.model][f"copies_{copy.state.value}"] += 1
    cards = []
    for name in sorted(models):
        c = counts[name]
        cards.append({
            "id": name, "object": "model", "created": created_s, "owned_by": "warmserve",
            "max_model_len": models[name].max_model_len,
            "warm": {"state": warm_state(c), "instances_ready": c["instances_ready"],
                     "instances_starting": c["instances_starting"],
                     "instances_draining": c["instances_draining"],
                     "copies_prewarmed": c["copies_ready"], "copies_loading": c["copies_loading"]},
        })
    return {"object": "list", "data": cards}
