"""`warmserve status [--json]`: which device holds which model in which state, and the instances,
read from the observed node views in Redis (live nodes only) and the registry."""

from __future__ import annotations

import argparse
import asyncio
import json

from shared.credentials import with_identity
from shared.settings import CONNECTION, add_arguments, load_settings
from shared.state import State

# a device's state for a model: its instance (serving, starting, draining) or its copy (ready = prewarmed)
MARKS = {"serving": "S", "ready": "P", "loading": "L", "evicting": "E", "starting": "s", "draining": "d"}
LEGEND = ("devices x models (S serving, P prewarmed, L loading, E evicting, s instance starting, d draining, "
          ". nothing)")
MODEL_COLUMN = 16  # longest model name used as a column header


async def snapshot(settings) -> dict:
    state = await State.connect(settings)
    try:
        models = await state.models()
        views = await state.node_views()
        plan = await state.plan()
    finally:
        await state.close()
    devices = []
    for node, view in sorted(views.items()):
        for dev in view.devices:
            cells = {c.model: c.state.value for c in view.copies if dev.index in c.devices}
            for inst in view.instances:
                if dev.index in inst.devices:
                    cells[inst.model] = "serving" if inst.state.value == "ready" else inst.state.value
            devices.append({"node": node, "device": dev.index, "free_bytes": dev.free_bytes,
                            "budget_bytes": dev.budget_bytes, "idle_engine_bytes": dev.idle_engine_bytes,
                            "models": cells})
    instances = [{"node": node, **i.model_dump(mode="json")} for node, v in sorted(views.items()) for i in v.instances]
    return {"models": sorted(models), "devices": devices, "instances": instances,
            "plan": plan.model_dump(mode="json") if plan else None}


def aligned(rows: list[list[str]], right: frozenset[int] = frozenset()) -> list[str]:
    """Rows as lines, each column as wide as its widest cell (right-aligned where asked)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.rjust(w) if i in right else cell.ljust(w)
                      for i, (cell, w) in enumerate(zip(row, widths))).rstrip() for row in rows]


def render(snap: dict) -> str:
    """Devices x models, then the instances; columns fit the longest id. Models with names longer than
    MODEL_COLUMN are numbered in the header and named in a legend below the table."""
    models = snap["models"]
    numbered = any(len(m) > MODEL_COLUMN for m in models)
    heads = [f"#{k}" for k in range(1, len(models) + 1)] if numbered else models
    lines = [LEGEND]
    rows = [["node/dev", "free MiB", "warm eng MiB", *heads]]
    for d in snap["devices"]:
        marks = [MARKS.get(d["models"].get(m, ""), ".") for m in models]
        rows.append([f"{d['node']}/{d['device']}", f"{d['free_bytes'] / 2**20:.0f}",
                     f"{d['idle_engine_bytes'] / 2**20:.0f}", *marks])
    lines += aligned(rows, frozenset(range(1, len(rows[0]))))
    if not snap["devices"]:
        lines.append("(no live agents)")
    if numbered:
        lines += [f"  #{k} {m}" for k, m in enumerate(models, 1)]
    rows = [["instance", "model", "node/dev", "state", "inflight"]]
    rows += [[i["instance_id"], i["model"], f"{i['node']}/{','.join(map(str, i['devices']))}", i["state"],
              str(i["inflight"])] for i in snap["instances"]]
    lines += ["", *aligned(rows, frozenset({4}))]
    if not snap["instances"]:
        lines.append("(no instances)")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="warmserve status", description=__doc__)
    parser.add_argument("--json", dest="as_json", action="store_true", help="print the snapshot as JSON")
    add_arguments(parser, CONNECTION)
    args = vars(parser.parse_args(argv))
    as_json = args.pop("as_json")
    snap = asyncio.run(snapshot(with_identity(load_settings(args), "monitor")))
    print(json.dumps(snap, indent=1) if as_json else render(snap))
    return 0
