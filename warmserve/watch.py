"""`warmserve watch [--model M] [--json] [--since SECONDS]`: print lifecycle events as they happen
(optionally replaying the last SECONDS from the JetStream event stream first)."""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from shared.bus import Bus
from shared.codec import DecodeError, decode
from shared.credentials import with_identity
from shared.schemas import Event
from shared.settings import CONNECTION, add_arguments, load_settings


def figure(value: object) -> str:
    """A detail value for people: floats rounded to what matters (5502.8037 ms -> 5503)."""
    if isinstance(value, list):
        return ",".join(map(figure, value))
    if not isinstance(value, float):
        return str(value)
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}" if abs(value) >= 1 else f"{value:.3g}"


def render(subject: str, event: Event, as_json: bool) -> str:
    if as_json:
        return json.dumps({"subject": subject, **event.model_dump(mode="json")})
    stamp = time.strftime("%H:%M:%S", time.localtime(event.at_s)) + f".{int(event.at_s * 1000) % 1000:03d}"
    where = event.node + (f"/{','.join(map(str, event.devices))}" if event.devices else "")
    parts = [stamp, f"{event.name:<20}", f"{event.model or '-':<16}", where or "-"]
    if event.instance_id:
        parts.append(f"instance={event.instance_id}")
    if event.reason:
        parts.append(f"reason={event.reason}")
    if event.detail:
        parts.append(" ".join(f"{k}={figure(v)}" for k, v in event.detail.items()))
    return "  ".join(parts)


async def watch(settings, model: str | None, as_json: bool, since_s: float | None) -> None:
    bus = await Bus.connect(settings, "warmserve-watch")

    def show(subject: str, payload: bytes) -> None:
        try:
            event = decode(Event, payload)
        except DecodeError as exc:
            print(f"# undecodable event on {subject}: {exc}", flush=True)
            return
        if model is None or event.model == model:
            print(render(subject, event, as_json), flush=True)

    try:
        live = bus.raw_events(bus.subjects.all_events())
        first = asyncio.ensure_future(live.__anext__())  # subscribe before replaying: nothing falls between
        if since_s is not None:
            async for subject, payload in bus.replay_events(time.time() - since_s):
                show(subject, payload)
        subject, payload = await first
        show(subject, payload)
        async for subject, payload in live:
            show(subject, payload)
    finally:
        await bus.close()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="warmserve watch", description=__doc__)
    parser.add_argument("--model", dest="watch_model", default=None, help="only events of this model")
    parser.add_argument("--json", dest="as_json", action="store_true", help="one JSON object per line")
    parser.add_argument("--since", dest="since_s", type=float, default=None, help="replay the last N seconds first")
    add_arguments(parser, CONNECTION)
    args = vars(parser.parse_args(argv))
    own = {k: args.pop(k) for k in ("watch_model", "as_json", "since_s")}
    settings = with_identity(load_settings(args), "monitor")
    try:
        asyncio.run(watch(settings, own["watch_model"], own["as_json"], own["since_s"]))
    except KeyboardInterrupt:
        pass
    return 0
