"""`warmserve status [--json]`: which device holds which model in which state, and the instances,
read from the observed node views in Redis (live nodes only) and the registry."""

from __future__ import annotations

import argparse
import asyncio
import json

from shared.credentials import with_identity
from shared.settings import add_arguments, load_settings
from shared.state import State

MARKS = {"serving": "S", "ready": "P", "loading": "L", "evicting": "E", "starting": "s", "draining": "d"}


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


def render(snap: dict) -> str:
    models = snap["models"]
    lines = ["devices x models (S serving, P prewarmed, L loading, E evicting, s starting, d draining)"]
    header = f"{'node/dev':<12} {'free MiB':>9} {'warm eng MiB':>12}  " + "  ".join(f"{m[:14]:>14}" for m in models)
    lines.append(header)
    for d in snap["devices"]:
        cells = "  ".join(f"{MARKS.get(d['models'].get(m, ''), '.'):>14}" for m in models)
        lines.append(f"{d['node'] + '/' + str(d['device']):<12} {d['free_bytes'] / 2**20:>9.0f} "
                     f"{d['idle_engine_bytes'] / 2**20:>12.0f}  {cells}")
    if not snap["devices"]:
        lines.append("(no live agents)")
    lines += ["", f"{'instance':<28} {'model':<16} {'node/dev':<12} {'state':<9} inflight"]
    for i in snap["instances"]:
        lines.append(f"{i['instance_id']:<28} {i['model']:<16} {i['node'] + '/' + ','.join(map(str, i['devices'])):<12} "
                     f"{i['state']:<9} {i['inflight']}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="warmserve status", description=__doc__)
    parser.add_argument("--json", dest="as_json", action="store_true")
    add_arguments(parser)
    args = vars(parser.parse_args(argv))
    as_json = args.pop("as_json")
    snap = asyncio.run(snapshot(with_identity(load_settings(args), "monitor")))
    print(json.dumps(snap, indent=1) if as_json else render(snap))
    return 0
