"""`warmserve models add | remove | show`: register one's own Hugging Face-format checkpoint
(validated, then hashed with a progress bar), remove a model (refused while it has requests unless
--force; the leading placer then drains its instances and evicts its copies, which this waits for),
and show one model across the cluster. The operations themselves are `shared.registry`'s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from shared import registry
from shared.bus import Bus
from shared.checkpoints import DEFAULT_TOOL_PARSER, CheckpointError, registry_entry, validate
from shared.model_files import DTYPE_BYTES, weight_bytes
from shared.schemas import LoadSample, ModelInfo
from shared.settings import CONNECTION, Settings, add_arguments, load_settings
from shared.state import State

POLL_S = 0.5


def hashed(name: str, path: Path, tp: int, max_model_len: int | None, dtype: str | None,
           tool_parser: str = DEFAULT_TOOL_PARSER) -> ModelInfo:
    """Validate the directory, then hash its weights with a progress bar on stderr."""
    from tqdm import tqdm

    validate(path, tp, max_model_len, dtype, tool_parser)  # before the bar: a bad directory has no bytes to count
    with tqdm(total=weight_bytes(path), unit="B", unit_scale=True, desc=f"hashing {name}", file=sys.stderr,
              disable=None) as bar:
        return registry_entry(name, path, tp, max_model_len, dtype, on_progress=bar.update, tool_parser=tool_parser)


async def add(settings: Settings, info: ModelInfo) -> str:
    state, bus = await State.connect(settings), await Bus.connect(settings, "warmserve-models")
    try:
        await bus.ensure_event_stream()
        return "registered" if await registry.register(state, bus, info) else "already registered"
    finally:
        await bus.close()
        await state.close()


async def remove(settings: Settings, name: str, force: bool, wait_s: float, log) -> int:
    state, bus = await State.connect(settings), await Bus.connect(settings, "warmserve-models")
    try:
        samples: list[LoadSample] = []

        async def heard(sample: LoadSample) -> None:
            samples.append(sample)

        listening = await bus.subscribe(bus.subjects.load_samples(), LoadSample, heard)
        await asyncio.sleep(1.5 * settings.sample_interval_s)  # every gateway samples each interval
        await bus.unsubscribe(listening)
        views = (await state.node_views(alive_only=True)).values()
        try:
            requests = registry.requests_of(name, views, registry.held_by_gateways(name, samples))
            removed = await registry.remove(state, bus, name, requests, force)
        except registry.ModelBusy as exc:
            log(f"refused: {exc} (--force)")
            return 1
        if removed is None:
            log(f"{name} is not registered")
            return 1
        log(f"unregistered {name}; the placer drains its instances and evicts its copies")
        deadline = time.monotonic() + wait_s
        while wait_s and (left := registry.residency(name, (await state.node_views(alive_only=True)).values())):
            if time.monotonic() >= deadline:
                log(f"still held after {wait_s:.0f} s: {json.dumps(left)}")
                return 1
            await asyncio.sleep(POLL_S)
        log(f"{name}: no instance or copy left" if wait_s else f"{name}: not waiting for its instances and copies")
        return 0
    finally:
        await bus.close()
        await state.close()


async def show(settings: Settings, name: str) -> dict | None:
    state = await State.connect(settings)
    try:
        return await registry.describe(state, name)
    finally:
        await state.close()


def print_description(d: dict) -> None:
    m, f = d["model"], d["forecast"]
    print(f"{m['name']}: {m['path']}\n  {m['size_bytes'] / 1e6:.1f} MB, tp {m['tp']}, max_model_len "
          f"{m['max_model_len']}, dtype {m['dtype'] or 'default'}, tool parser {m['tool_parser']}, arch {m['arch']}, "
          f"sha256 {m['content_hash'][:12]}")
    print(f"  forecast: avg {f['avg']:.2f} peak {f['peak']:.2f} ({f['method']}, window {f['window_s']:.0f} s)"
          if f else "  forecast: none yet")
    for r in d["residency"] or [{"node": "-", "devices": [], "kind": "cold", "state": "no copy or instance"}]:
        extra = f"{r['instance_id']} inflight {r['inflight']}" if r["kind"] == "instance" else r.get("origin", "")
        print(f"  {r['node']:<10} devices {','.join(map(str, r['devices'])) or '-':<6} {r['kind']:<9} {r['state']:<10} {extra}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="warmserve models")
    actions = parser.add_subparsers(dest="action", required=True)
    adding = actions.add_parser("add", help="validate, hash and register a local Hugging Face-format checkpoint",
                                usage="%(prog)s NAME PATH [--tp N] [--max-model-len L] [--dtype D] "
                                      "[--tool-parser P] [options]")
    adding.add_argument("name", help="public model name (the OpenAI `model`)")
    adding.add_argument("path", type=Path, help="directory with config.json, tokenizer files and *.safetensors")
    adding.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (devices per copy)")
    adding.add_argument("--max-model-len", type=int, help="context length (default: the config's)")
    adding.add_argument("--dtype", choices=list(DTYPE_BYTES), help="engine dtype (default: bfloat16)")
    adding.add_argument("--tool-parser", default=DEFAULT_TOOL_PARSER,
                        help="vLLM's tool-call parser for the model's chat answers (default: %(default)s)")
    removing = actions.add_parser("remove", help="unregister; the placer drains and evicts it everywhere",
                                  usage="%(prog)s NAME [--force] [--wait-s S] [options]")
    removing.add_argument("name")
    removing.add_argument("--force", action="store_true", help="even while requests are held or in flight")
    removing.add_argument("--wait-s", type=float, default=60.0, help="wait this long for its instances and copies "
                                                                      "to go (0: do not wait)")
    showing = actions.add_parser("show", help="registry entry, forecast, and state per device",
                                 usage="%(prog)s NAME [--json] [options]")
    showing.add_argument("name")
    for sub in (adding, removing, showing):
        sub.add_argument("--json", action="store_true")
        add_arguments(sub, (*CONNECTION, "sample_interval_s"))
    args = parser.parse_args(argv)
    settings = load_settings(vars(args))
    log = lambda s: print(s, file=sys.stderr)  # noqa: E731
    if args.action == "add":
        try:
            info = hashed(args.name, args.path, args.tp, args.max_model_len, args.dtype, args.tool_parser)
            outcome = asyncio.run(add(settings, info))
        except (CheckpointError, registry.ModelConflict) as exc:
            log(f"error: {exc}")
            return 2
        print(json.dumps(info.model_dump(), indent=1) if args.json else f"{outcome} {info.name}: "
              f"{info.size_bytes / 1e6:.1f} MB, arch {info.arch}, sha256 {info.content_hash[:12]}")
        return 0
    if args.action == "remove":
        return asyncio.run(remove(settings, args.name, args.force, args.wait_s, log))
    described = asyncio.run(show(settings, args.name))
    if described is None:
        log(f"{args.name} is not registered")
        return 1
    if args.json:
        print(json.dumps(described, indent=1))
    else:
        print_description(described)
    return 0
