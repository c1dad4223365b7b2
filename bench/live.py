"""`warmserve bench live [--config FILE] [--systems a,b] [--engine vllm|fake] [--out DIR] [--json]`: the
real stack under a compressed real-trace slice, one system after another on the same slice.

Per system: a fresh `warmserve up` (bench.chaos.Stack: embedded NATS and Redis with credentials, the
node0 agent) and a second agent process (node1), each with `devices_per_node` logical devices whose
budget holds 2 copies (or one instance); `models` names over the demo checkpoints (more than the
devices can hold), the only models registered. The learn days are imported into the forecaster
(`forecast import`'s workload path; season and window compressed by `compress`); once the copies
they ask for are in place (what is measured is a running system, not its start), the slice's
ServeGen arrivals (Azure lengths, capped) go through the gateway's HTTP API at compressed times,
non-streaming. Per system:
P50/P95/P99 TTFT and wait for an instance (queue + instance start, the gateway's x-warmserve
headers), instance starts by what they found, bytes loaded, device-seconds (instances, over the
replay window), requests that did not finish. Beside each live run the simulator (bench.live_sim)
replays the same slice on the same cluster through the same cores, and an `oracle` (every model
always warm) gives the physical limit. Writes a TTFT CDF and per-device timelines into --out.
Progress on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np

from bench import live_sim
from bench.chaos import Stack
from services.forecaster.core.replay import Compression
from services.forecaster.core.windows import RequestTiming, window_index
from services.gpuagent.core.ledger import instance_kv_bytes, page_bytes
from shared import registry
from shared.bus import Bus
from shared.schemas import Event, ModelInfo
from shared.settings import load_settings
from shared.state import State
from shared.workload import DAY_S, Workload, build_workload
from sim import plots
from sim.cluster import state_of
from sim.replay import percentiles
from sim.run import RunResult
from warmserve import history
from warmserve.models import build_demo

START_KINDS = ("forecast_prewarm", "kept_copy", "loading", "miss")
COPY_EVENTS = ("prewarm_started", "prewarm_finished", "prewarm_failed", "evicted")
TIMELINE_EVENTS = {"prewarm_started": "loading", "prewarm_finished": "ready", "prewarm_failed": "", "evicted": "",
                   "instance_starting": "starting", "instance_ready": "ready", "instance_stopped": "",
                   "instance_failed": ""}  # what each event makes of the copy or instance it names ("": gone)
SYSTEMS = {  # settings that make each system (the rest are the defaults: ours)
    "ours": {},
    "paper": {"forecast_method": "csp", "allocation": "paper", "promotable_copies": "false", "unserved_first": "false",
              "standby_copies": "false"},
    "reactive": {"prewarm": "false"},
    "serverlessllm": {"prewarm": "false", "warm_engines": "false"},  # engines stay warm after a demote here
}
MiB = 1 << 20


@dataclass
class Config:
    models: int = 10  # names over the demo checkpoints (small-a, small-b alternately): 8 copies fit at most
    nodes: int = 2
    devices_per_node: int = 2
    device_memory_bytes: int = 170 * MiB  # bfloat16 demo sizes: 2 copies of 63 MB and an idle engine's KV cache
    #                                        (36 MiB), or an instance (copy + KV) and a copy (float32 hosts: double it)
    kv_cache_bytes: int = 32 * MiB
    alpha: float = 0.5
    rate_rps: float = 0.01  # total, in trace time (live: x compress); at 0.02 more models want an instance at
    #                        once than there are devices, and waits are for a device, whatever is prewarmed
    seed: int = 1
    client_order: str = "quiet"  # the burstiest ServeGen clients
    compress: float = 60.0  # a trace day in 24 live minutes
    learn_days: float = 7.0
    replay_day: float = 7.0
    replay_start_h: float = 10.0
    replay_live_s: float = 120.0
    drain_s: float = 90.0
    prompt_cap: int = 64  # words per prompt (Azure lengths capped: CPU engines)
    output_cap: int = 8
    prefill_s_per_token: float = 0.001  # how long a request is outstanding here, for the imported history
    decode_s_per_token: float = 0.03
    engine: str = "vllm"
    profile: str = "cpu_agent"  # the simulator's timing with --engine vllm: `bench agent`'s file in sim/measured/
    systems: list[str] = field(default_factory=lambda: list(SYSTEMS) + ["oracle"])

    @property
    def window_s(self) -> float:
        return 300.0 / self.compress

    @property
    def season_s(self) -> float:
        return DAY_S / self.compress


@dataclass(frozen=True)
class CappedTiming:
    """How long a request is outstanding here, with its lengths capped as the replay sends it."""

    config: Config

    def durations(self, prompt_tokens: np.ndarray, output_tokens: np.ndarray) -> np.ndarray:
        c = self.config
        return RequestTiming(c.prefill_s_per_token, c.decode_s_per_token).durations(
            np.minimum(prompt_tokens, c.prompt_cap), np.minimum(output_tokens, c.output_cap))


# ---------------------------------------------------------------- one system


class Recorder:
    """Agent and placer events of the run (kept for the timeline and --out), instance starts by
    kind, bytes loaded, device-seconds of instances within the replay window [start_s, end_s)."""

    def __init__(self, sizes: dict[str, int], start_s: float, end_s: float):
        self.sizes = sizes
        self.start_s, self.end_s = start_s, end_s
        self.starts = dict.fromkeys(START_KINDS, 0)
        self.other_starts = 0
        self.bytes_loaded = 0
        self.running: dict[str, float] = {}  # instance id -> start
        self.device_s = 0.0
        self.events: list[dict] = []

    async def on_event(self, event: Event) -> None:
        self.events.append(event.model_dump())
        if event.name == "instance_starting":
            kind = event.detail.get("start", "")
            if kind in self.starts:
                self.starts[kind] += 1
            else:
                self.other_starts += 1
            self.running[event.instance_id] = event.at_s
        elif event.name in ("instance_stopped", "instance_failed") and event.instance_id in self.running:
            self._held(self.running.pop(event.instance_id), event.at_s)
        elif event.name == "prewarm_finished":
            self.bytes_loaded += self.sizes.get(event.model, 0)

    def close(self, now_s: float) -> None:
        for since in self.running.values():
            self._held(since, now_s)
        self.running.clear()

    def _held(self, since: float, until: float) -> None:
        self.device_s += max(min(until, self.end_s) - max(since, self.start_s), 0.0)


def instance_spans(events: list[dict]) -> list[tuple]:
    """(start, end or inf, node, devices, model) of every instance, as the simulator records them."""
    spans: dict[str, list] = {}
    for e in sorted(events, key=lambda e: e["at_s"]):
        if e["name"] == "instance_starting":
            spans[e["instance_id"]] = [e["at_s"], float("inf"), int(e["node"].removeprefix("node")),
                                       tuple(e["devices"]), e["model"]]
        elif e["name"] in ("instance_stopped", "instance_failed") and e["instance_id"] in spans:
            spans[e["instance_id"]][1] = e["at_s"]
    return [tuple(span) for span in spans.values()]


def device_timeline(events: list[dict]) -> list[tuple[float, int, int, int]]:
    """(t, node, device, state) changes from the agents' events, in the simulator's timeline codes."""
    copies: dict[tuple[int, int], dict[str, str]] = {}  # (node, device) -> model -> loading | ready
    instances: dict[tuple[int, int], dict[str, str]] = {}  # (node, device) -> instance id -> starting | ready
    state: dict[tuple[int, int], int] = {}
    out = []
    for e in sorted(events, key=lambda e: e["at_s"]):
        if e["name"] not in TIMELINE_EVENTS or not e["devices"]:
            continue
        key = (int(e["node"].removeprefix("node")), e["devices"][0])
        held, name = (copies, e["model"]) if e["name"] in COPY_EVENTS else (instances, e["instance_id"])
        now_held = held.setdefault(key, {})
        if TIMELINE_EVENTS[e["name"]]:
            now_held[name] = TIMELINE_EVENTS[e["name"]]
        else:
            now_held.pop(name, None)
        code = state_of(list(instances.get(key, {}).values()), list(copies.get(key, {}).values()))
        if state.get(key) != code:
            state[key] = code
            out.append((e["at_s"], *key, code))
    return out


async def send(client: httpx.AsyncClient, at_s: float, model: str, prompt_words: int, max_tokens: int,
               outcomes: list[dict]) -> None:
    await asyncio.sleep(max(at_s - time.time(), 0.0))
    outcome = {"model": model, "sent_s": time.time(), "ok": False}
    outcomes.append(outcome)
    try:
        resp = await client.post("/v1/completions", json={"model": model, "prompt": "hello " * prompt_words,
                                                          "max_tokens": max_tokens, "temperature": 0})
    except httpx.HTTPError as exc:
        outcome["error"] = f"{type(exc).__name__}: {exc}"
        return
    outcome["status"] = resp.status_code
    if resp.status_code == 200:
        h = resp.headers
        outcome.update(ok=True, ttft_s=float(h["x-warmserve-ttft-ms"]) / 1000,
                       wait_s=(float(h["x-warmserve-queue-ms"]) + float(h["x-warmserve-instance-start-ms"])) / 1000)


async def until_engines_warm(stack: Stack, state: State, config: Config, engine_bytes: int, say,
                             timeout_s: float = 600.0) -> None:
    """Every device of every node is listed and, with warm_engines, holds the replay's idle engine
    (`engine_bytes`) and no other (those of the architectures unregistered are gone)."""
    deadline = time.monotonic() + timeout_s
    want_engines = stack.settings.warm_engines
    while time.monotonic() < deadline:
        views = await state.node_views()
        devices = [d for v in views.values() for d in v.devices]
        if len(views) == config.nodes and len(devices) == config.nodes * config.devices_per_node and (
                not want_engines or all(d.idle_engine_bytes == engine_bytes for d in devices)):
            say(f"{len(views)} nodes, {len(devices)} devices ready")
            return
        await asyncio.sleep(1.0)
    raise RuntimeError(f"agents not ready within {timeout_s:g} s: see {stack.data_dir}")


async def until_copies_settle(state: State, quiet_s: float, say, timeout_s: float = 90.0) -> None:
    """The copies the imported history asks for have landed: none loading and the same set for
    `quiet_s` (two windows: the relearnt forecasts are out by then; a running system is past its
    start, and the replay measures it, not the start)."""
    deadline, last, since = time.monotonic() + timeout_s, None, time.monotonic()
    while time.monotonic() < deadline:
        views = await state.node_views()
        copies = sorted((v.node, c.model, c.state.value) for v in views.values() for c in v.copies)
        if copies != last or any(state != "ready" for *_, state in copies):
            last, since = copies, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            say(f"{len(copies)} copies in place")
            return
        await asyncio.sleep(0.25)
    say(f"copies still moving after {timeout_s:g} s: replaying anyway")


@dataclass
class LiveRun:
    summary: dict  # the figures (JSON)
    result: RunResult  # per request TTFT (inf: unfinished) and the device timeline, as the simulator gives them
    events: list[dict]  # every agent and placer event
    requests: list[dict]  # per request sent: model, sent_s, ok, ttft_s, wait_s (or status, error)


def make_stack(name: str, config: Config, models_dir: str, data_dir: Path) -> Stack:
    """The stack's settings for `name` on the replay's cluster (the oracle's: ours')."""
    stack = Stack(data_dir, config.engine, config.devices_per_node, models_dir)
    stack.flags.update(window_s=str(config.window_s), season_s=str(config.season_s), placer_tick_s="0.5",
                       device_memory_bytes=str(config.device_memory_bytes), kv_cache_bytes=str(config.kv_cache_bytes),
                       **SYSTEMS.get(name, {}))
    stack.settings = load_settings(stack.flags, env={})
    return stack


async def run_system(name: str, config: Config, infos: list[ModelInfo], models_dir: str, say) -> LiveRun:
    tmp = Path(tempfile.mkdtemp(prefix=f"warmserve-live-{name}-"))
    stack = make_stack(name, config, models_dir, tmp)
    say(f"[{name}] starting the stack in {tmp}")
    stack.start()
    agents: list[subprocess.Popen] = []
    state: State | None = None
    try:
        await stack.wait_ready(say)
        state, bus = await State.connect(stack.settings), await Bus.connect(stack.settings, "bench-live")
        try:  # the replay's models only: another architecture's idle engines would take the copies' room
            for other in set(await state.models()) - {i.name for i in infos}:
                await registry.remove(state, bus, other, 0, force=True)
            for info in infos:
                await registry.register(state, bus, info)
        finally:
            await bus.close()
        for node in range(1, config.nodes):
            argv = [sys.executable, "-m", "warmserve.cli", "service", "gpuagent"]
            for flag, value in {**stack.flags, "node": f"node{node}", "identity": "gpuagent"}.items():
                argv += [f"--{flag.replace('_', '-')}", value]
            with open(tmp / f"gpuagent-node{node}.log", "ab") as log:
                agents.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        engine = page_bytes(instance_kv_bytes(infos[0].kv_bytes_per_token, infos[0].max_model_len, config.kv_cache_bytes))
        await until_engines_warm(stack, state, config, engine, say)
        return await replay(stack, state, config, infos, say, name)
    finally:
        if state is not None:
            await state.close()
        for proc in agents:
            proc.terminate()
        for proc in agents:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        stack.stop()


def workload_of(config: Config) -> Workload:
    return build_workload(config.models, config.alpha, config.rate_rps, config.seed, order=config.client_order)


async def replay(stack: Stack, state: State, config: Config, infos: list[ModelInfo], say, name: str) -> LiveRun:
    names = [i.name for i in infos]
    workload = workload_of(config)
    start_trace = config.replay_day * DAY_S + config.replay_start_h * 3600
    # the learn days end where the current window starts (the forecaster takes closed windows only) ...
    closed_s = window_index(time.time() - 1.0, config.window_s) * config.window_s
    imported = history.workload_history(workload, names, Compression(config.compress, start_trace, closed_s),
                                        config.learn_days, config.window_s, CappedTiming(config))
    await history.send(stack.settings, imported)
    await until_copies_settle(state, 2 * config.window_s, say)
    # ... and the slice starts at the next window once the forecaster has relearnt (the windows between are empty)
    anchor = (window_index(time.time(), config.window_s) + 1) * config.window_s
    compression = Compression(config.compress, start_trace, anchor)
    say(f"[{name}] imported {sum(map(len, imported.values()))} windows; replay starts in "
        f"{anchor - time.time():.1f} s, {(anchor - closed_s) / config.window_s:g} windows after the history")
    arrivals = workload.arrivals(start_trace, compression.trace(anchor + config.replay_live_s))
    recorder = Recorder({i.name: i.size_bytes for i in infos}, anchor, anchor + config.replay_live_s)
    bus = await Bus.connect(stack.settings, "bench-live")
    await bus.subscribe(bus.subjects.domain_events("agent"), Event, recorder.on_event)
    await bus.subscribe(bus.subjects.domain_events("placer"), Event, recorder.on_event)
    outcomes: list[dict] = []
    async with httpx.AsyncClient(base_url=stack.url, timeout=stack.settings.queue_deadline_s + 30) as client:
        tasks = [asyncio.create_task(send(client, float(compression.live(t)), names[m],
                                          int(min(p, config.prompt_cap)), int(max(min(o, config.output_cap), 1)),
                                          outcomes))
                 for t, m, p, o in zip(arrivals.time_s, arrivals.model, arrivals.prompt_tokens, arrivals.output_tokens)]
        say(f"[{name}] {len(tasks)} requests over {config.replay_live_s:g} s")
        done, pending = await asyncio.wait(tasks, timeout=config.replay_live_s + config.drain_s) if tasks else (set(), set())
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    await asyncio.sleep(1.0)  # the last events
    recorder.close(time.time())
    await bus.close()
    ok = [o for o in outcomes if o["ok"]]
    ttft, wait = percentiles([o["ttft_s"] for o in ok]), percentiles([o["wait_s"] for o in ok])
    summary = {"requests": len(arrivals), "ok": len(ok), "unfinished": len(arrivals) - len(ok),
               "ttft_p50_s": ttft["p50"], "ttft_p95_s": ttft["p95"], "ttft_p99_s": ttft["p99"],
               "wait_p50_s": wait["p50"], "wait_p95_s": wait["p95"], "wait_p99_s": wait["p99"],
               "starts": dict(recorder.starts), "other_starts": recorder.other_starts,
               "bytes_loaded": recorder.bytes_loaded, "device_seconds": round(recorder.device_s, 1),
               "history_gap_windows": round((anchor - closed_s) / config.window_s),
               "errors": sorted({o.get("error") or str(o.get("status")) for o in outcomes if not o["ok"]})[:5]}
    ttfts = np.array([o["ttft_s"] if o["ok"] else np.inf for o in outcomes] + [np.inf] * (len(arrivals) - len(outcomes)))
    result = RunResult(name, summary, ttfts, device_timeline(recorder.events), anchor, anchor + config.replay_live_s,
                       instance_spans(recorder.events))
    return LiveRun(summary, result, recorder.events, outcomes)


# ---------------------------------------------------------------- command


def model_infos(config: Config, models_dir: str) -> list[ModelInfo]:
    demo = {i.name: i for i in build_demo(Path(models_dir).resolve(), log=lambda _: None)}
    bases = [demo["demo-small-a"], demo["demo-small-b"]]
    return [bases[i % 2].model_copy(update={"name": f"live-{i:02d}"}) for i in range(config.models)]


def table(result: dict) -> str:
    lines = [f"{'system':<20}{'req':>5}{'unfin':>6}{'TTFT p50':>9}{'p99':>8}{'wait p50':>9}{'p99':>8}"
             f"{'fcst':>6}{'kept':>6}{'load':>6}{'miss':>6}{'MB loaded':>10}{'dev-s':>8}"]
    rows = [(name, "live", r) for name, r in result["systems"].items()] + \
        [(name, "sim", r) for name, r in result["sim"].items()]
    for name, side, r in sorted(rows, key=lambda row: (list(result["sim"]).index(row[0]), row[1])):
        s = r["starts"]
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        lines.append(f"{name + ' ' + side:<20}{r['requests']:>5}{r['unfinished']:>6}{fmt(r['ttft_p50_s']):>9}"
                     f"{fmt(r['ttft_p99_s']):>8}{fmt(r['wait_p50_s']):>9}{fmt(r['wait_p99_s']):>8}"
                     f"{s['forecast_prewarm']:>6}{s['kept_copy']:>6}{s['loading']:>6}{s['miss']:>6}"
                     f"{r['bytes_loaded'] / 1e6:>10.0f}{r['device_seconds']:>8.0f}")
    c = result["config"]
    lines.append(f"{c['models']} models on {c['nodes']}x{c['devices_per_node']} devices of "
                 f"{c['device_memory_bytes'] // MiB} MiB; a trace day in {DAY_S / c['compress'] / 60:g} min "
                 f"(window {300 / c['compress']:g} s); replay {c['replay_live_s']:g} s live from day "
                 f"{c['replay_day']:g} {c['replay_start_h']:g} h; starts: fcst = forecast_prewarm, kept = kept_copy; "
                 f"sim timing: {next(iter(result['sim'].values()), {}).get('profile', '-')}")
    lines += [f"wrote {path}" for path in result["files"]]
    return "\n".join(lines)


def write_files(out: Path, config: Config, runs: dict[str, LiveRun], simulated: list[RunResult]) -> list[str]:
    """The TTFT CDF of every system (live and simulated), a device timeline per run, each live
    run's events and requests (JSON lines)."""
    out.mkdir(parents=True, exist_ok=True)
    live = [dataclasses.replace(run.result, system=f"{name} live") for name, run in runs.items()]
    sim = [dataclasses.replace(r, system=f"{r.system} sim") for r in simulated]
    files = [plots.ttft_cdf(live + sim, out / "ttft-cdf.png")]
    for r in live + [r for r in sim if r.system != "oracle sim"]:  # the oracle holds a device per instance
        files.append(plots.gpu_timeline(r, config.nodes, config.devices_per_node,
                                        out / f"devices-{r.system.replace(' ', '-')}.png"))
    for name, run in runs.items():
        for what, rows in (("events", run.events), ("requests", run.requests)):
            path = out / f"{what}-{name}.jsonl"
            path.write_text("".join(json.dumps(row) + "\n" for row in rows))
            files.append(path)
    return [str(f) for f in files]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="warmserve bench live", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="JSON file with any of the Config fields")
    parser.add_argument("--systems", help=f"comma-separated, of {', '.join(SYSTEMS)}, oracle (simulated only)")
    parser.add_argument("--engine", choices=["vllm", "fake"])
    parser.add_argument("--replay-s", type=float, help="live seconds of the slice to replay")
    parser.add_argument("--models-dir", default="models")
    parser.add_argument("--out", default="out/bench-live", help="directory for the PNGs, result.json and the events")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv[1:] if argv[:1] == ["live"] else argv)
    config = Config(**(json.loads(Path(args.config).read_text()) if args.config else {}))
    if args.systems:
        config.systems = args.systems.split(",")
    if args.engine:
        config.engine = args.engine
    if args.replay_s:
        config.replay_live_s = args.replay_s
    unknown = set(config.systems) - set(SYSTEMS) - {"oracle"}
    if unknown:
        parser.error(f"unknown systems {sorted(unknown)}")

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    infos = model_infos(config, args.models_dir)
    workload = workload_of(config)
    result: dict = {"config": asdict(config), "systems": {}, "sim": {}}
    runs: dict[str, LiveRun] = {}
    simulated = []
    for name in config.systems:
        if name in SYSTEMS:
            runs[name] = asyncio.run(run_system(name, config, infos, args.models_dir, say))
            result["systems"][name] = runs[name].summary
            say(json.dumps({name: runs[name].summary}))
        settings = make_stack(name, config, args.models_dir, Path(args.out)).settings
        gap = runs[name].summary["history_gap_windows"] if name in runs else 1
        result["sim"][name], sim_result = live_sim.simulate(name, config, infos, settings, workload,
                                                            CappedTiming(config), gap)
        simulated.append(sim_result)
        say(json.dumps({f"{name} (sim)": result["sim"][name]}))
        result["files"] = write_files(Path(args.out), config, runs, simulated)  # after each system: a later
        (Path(args.out) / "result.json").write_text(json.dumps(result, indent=1))  # failure keeps these
    print(json.dumps(result, indent=1) if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
