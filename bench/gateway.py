"""`warmserve bench gateway [--json]`: what the gateway costs and what it sustains.

Starts NATS, Redis and the gateway (`python -m services.gateway`, its own process) and serves from
simulated instances (bench.gateway_sim) in this process. Measures (1) the TTFT added by the gateway
against the same instance asked directly over NATS, (2) the highest Poisson request rate before the
p99 added latency passes 50 ms, (3) a burst of 200 requests for a cold model. About 1-2 minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp

from bench.gateway_sim import SimNode, SimPlacer, register
from shared.bus import Bus
from shared.schemas import InferChunk, InferRequest, SamplingSpec
from shared.settings import load_settings
from shared.state import State
from warmserve import infra

TARGET_ADDED_P50_MS = 2.0
RATE_LIMIT_P99_MS = 50.0
RATES = (50, 100, 150, 200, 300, 400, 500, 650, 800, 1000)
BURST = 200
COLD_START_S = 1.0  # simulated instance start for the cold model
MAX_TOKENS = 4


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] if ordered else float("nan")


class DirectClient:
    """Asks an instance over NATS exactly as the gateway does, without the gateway."""

    def __init__(self, bus: Bus):
        self.bus, self.client_id = bus, "bench" + uuid.uuid4().hex[:6]
        self.waiting: dict[str, asyncio.Future] = {}

    async def start(self) -> None:
        await self.bus.subscribe(self.bus.subjects.infer_replies(self.client_id), InferChunk, self._on_chunk,
                                 concurrent=False)

    async def _on_chunk(self, chunk: InferChunk) -> None:
        future = self.waiting.get(chunk.request_id)
        if future is not None and not future.done() and (chunk.text or chunk.finish_reason or chunk.error):
            future.set_result(None)

    async def ttft_s(self, instance_id: str, model: str) -> float:
        request_id = uuid.uuid4().hex
        future = self.waiting[request_id] = asyncio.get_running_loop().create_future()
        start = time.perf_counter()
        await self.bus.publish(self.bus.subjects.infer(instance_id), InferRequest(
            request_id=request_id, model=model, reply_to=self.bus.subjects.infer_reply(self.client_id, request_id),
            prompt="hello", sampling=SamplingSpec(max_tokens=MAX_TOKENS)))
        await future
        del self.waiting[request_id]
        return time.perf_counter() - start


async def gateway_ttft(http: aiohttp.ClientSession, url: str, model: str, prompt: str = "hello") -> tuple[float, int]:
    """TTFT of one streamed completion through the gateway (read to the end); (seconds, HTTP status)."""
    start, ttft = time.perf_counter(), None
    async with http.post(url + "/v1/completions", json={"model": model, "prompt": prompt, "stream": True,
                                                        "max_tokens": MAX_TOKENS}) as response:
        async for line in response.content:
            if ttft is None and line.startswith(b"data:"):
                ttft = time.perf_counter() - start
        return (ttft or time.perf_counter() - start), response.status


async def added_latency(direct: DirectClient, http: aiohttp.ClientSession, url: str, pairs: int,
                        gateway_pid: int) -> dict:
    """Alternate direct and gateway requests, one at a time; also the gateway's CPU per request."""
    direct_s, gateway_s = [], []
    for _ in range(20):  # warm up both paths
        await direct.ttft_s("warm-i0", "warm")
        await gateway_ttft(http, url, "warm")
    cpu_before = cpu_s(gateway_pid)
    for _ in range(pairs):
        direct_s.append(await direct.ttft_s("warm-i0", "warm"))
        gateway_s.append((await gateway_ttft(http, url, "warm"))[0])
    d = {q: percentile(direct_s, q) * 1000 for q in (50, 99)}
    g = {q: percentile(gateway_s, q) * 1000 for q in (50, 99)}
    return {"pairs": pairs, "direct_ttft_ms": {"p50": d[50], "p99": d[99]},
            "gateway_ttft_ms": {"p50": g[50], "p99": g[99]},
            "added_ms": {"p50": g[50] - d[50], "p99": g[99] - d[99]},
            "gateway_cpu_ms_per_request": (cpu_s(gateway_pid) - cpu_before) / pairs * 1000}


async def rate_step(http: aiohttp.ClientSession, url: str, rate: float, seconds: float, direct_p50_ms: float,
                    gateway_pid: int) -> dict:
    """Open-loop Poisson arrivals at `rate` for `seconds`; added latency = TTFT - direct p50 TTFT."""
    rng, tasks = random.Random(rate), []
    start, cpu_before, own_cpu_before = time.perf_counter(), cpu_s(gateway_pid), time.process_time()
    next_s = 0.0
    while next_s < seconds:
        delay = start + next_s - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(gateway_ttft(http, url, "warm")))
        next_s += rng.expovariate(rate)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    elapsed = time.perf_counter() - start
    ok = [r[0] * 1000 - direct_p50_ms for r in results if isinstance(r, tuple) and r[1] == 200]
    return {"rate": rate, "requests": len(tasks), "errors": len(tasks) - len(ok),
            "achieved_rps": len(ok) / elapsed, "p50_added_ms": percentile(ok, 50), "p99_added_ms": percentile(ok, 99),
            "gateway_cpu_share": (cpu_s(gateway_pid) - cpu_before) / elapsed,
            "client_and_engine_cpu_share": (time.process_time() - own_cpu_before) / elapsed}


async def cold_burst(http: aiohttp.ClientSession, url: str, node: SimNode, placer: SimPlacer) -> dict:
    start = time.perf_counter()
    results = await asyncio.gather(*(gateway_ttft(http, url, "cold", f"burst {i}") for i in range(BURST)),
                                   return_exceptions=True)
    wall_s = time.perf_counter() - start
    ok = [r[0] * 1000 for r in results if isinstance(r, tuple) and r[1] == 200]
    received = [r.request_id for r in node.journal if r.model == "cold"]
    return {"requests": BURST, "ok": len(ok), "errors": BURST - len(ok), "placer_asks": sum(need.model == "cold" for need in placer.needs),
            "released_in_order": received == sorted(received) and len(received) == BURST,
            "simulated_start_s": COLD_START_S, "wall_s": wall_s,
            "ttft_ms": {"p50": percentile(ok, 50), "p99": percentile(ok, 99)}}


@contextlib.asynccontextmanager
async def stack(workdir: Path):
    """NATS, Redis, a simulated node with a warm model and a placer, and the gateway process."""
    nats = infra.start_nats(workdir, infra.free_port(), workdir / "nats.log")
    redis = infra.start_redis(workdir, infra.free_port(), workdir / "redis.log")
    port = infra.free_port()
    flags = {"namespace": "bench" + uuid.uuid4().hex[:6], "nats_url": nats.url, "redis_url": redis.url,
             "gateway_port": str(port), "log_json": "true"}
    settings = load_settings(flags, env={})
    bus, state = await Bus.connect(settings, "bench"), await State.connect(settings)
    node = SimNode(bus, state)
    placer = SimPlacer(bus, node, start_s=COLD_START_S)
    gateway = None
    try:
        await placer.start()
        for model in ("warm", "cold"):
            await register(state, model)
        await node.add_instance("warm", "warm-i0")
        args = [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]
        gateway = subprocess.Popen([sys.executable, "-m", "services.gateway", *args],
                                   stderr=open(workdir / "gateway.log", "wb"), start_new_session=True)
        infra.wait_for_port(port, 30, gateway, "gateway")
        yield f"http://127.0.0.1:{port}", gateway.pid, bus, node, placer
    finally:
        if gateway is not None:
            gateway.terminate()
            gateway.wait(15)
        await bus.close()
        await state.close()
        nats.stop()
        redis.stop()


async def run(pairs: int, step_s: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp:
        async with stack(Path(tmp)) as (url, gateway_pid, bus, node, placer):
            direct = DirectClient(bus)
            await direct.start()
            connector = aiohttp.TCPConnector(limit=0)
            async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as http:
                latency = await added_latency(direct, http, url, pairs, gateway_pid)
                steps = []
                for rate in RATES:
                    step = await rate_step(http, url, rate, step_s, latency["direct_ttft_ms"]["p50"], gateway_pid)
                    steps.append(step)
                    if step["errors"] or step["p99_added_ms"] > RATE_LIMIT_P99_MS:
                        break
                passing = [s["rate"] for s in steps if not s["errors"] and s["p99_added_ms"] <= RATE_LIMIT_P99_MS]
                burst = await cold_burst(http, url, node, placer)
    return {"cpus": os.cpu_count(), "loadavg_1m": os.getloadavg()[0], "added_latency": latency,
            "target_added_p50_ms": TARGET_ADDED_P50_MS,
            "added_p50_within_target": latency["added_ms"]["p50"] <= TARGET_ADDED_P50_MS,
            "max_rate": {"rps": max(passing, default=0), "p99_limit_ms": RATE_LIMIT_P99_MS, "step_s": step_s,
                         "steps": steps},
            "cold_burst": burst}


def table(result: dict) -> str:
    lat = result["added_latency"]
    lines = [f"gateway bench on {result['cpus']} cpus (load average {result['loadavg_1m']:.2f})", "",
             f"(1) TTFT over {lat['pairs']} pairs      p50 ms    p99 ms",
             f"    direct to instance   {lat['direct_ttft_ms']['p50']:8.2f}  {lat['direct_ttft_ms']['p99']:8.2f}",
             f"    through gateway      {lat['gateway_ttft_ms']['p50']:8.2f}  {lat['gateway_ttft_ms']['p99']:8.2f}",
             f"    added                {lat['added_ms']['p50']:8.2f}  {lat['added_ms']['p99']:8.2f}"
             f"   (target p50 <= {result['target_added_p50_ms']} ms)",
             f"    gateway CPU per request: {lat['gateway_cpu_ms_per_request']:.2f} ms", "",
             f"(2) max rate with p99 added <= {result['max_rate']['p99_limit_ms']:g} ms: {result['max_rate']['rps']} req/s",
             "    offered  achieved  errors  p50 added  p99 added  gateway CPU  client+engine CPU"]
    for s in result["max_rate"]["steps"]:
        lines.append(f"    {s['rate']:7}  {s['achieved_rps']:8.1f}  {s['errors']:6}  {s['p50_added_ms']:9.2f}"
                     f"  {s['p99_added_ms']:9.2f}  {s['gateway_cpu_share']:11.0%}"
                     f"  {s['client_and_engine_cpu_share']:17.0%}")
    b = result["cold_burst"]
    lines += ["", f"(3) cold burst: {b['ok']}/{b['requests']} ok, {b['errors']} errors, placer asked "
                  f"{b['placer_asks']}x, released in order: {b['released_in_order']}, "
                  f"TTFT p50 {b['ttft_ms']['p50']:.0f} ms p99 {b['ttft_ms']['p99']:.0f} ms "
                  f"(simulated start {b['simulated_start_s']:g} s), all done in {b['wall_s']:.2f} s"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="warmserve bench gateway", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--pairs", type=int, default=500, help="direct/gateway request pairs for (1)")
    parser.add_argument("--step-s", type=float, default=4.0, help="seconds per offered rate in (2)")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv[1:] if argv[:1] == ["gateway"] else argv)
    result = asyncio.run(run(args.pairs, args.step_s))
    print(json.dumps(result, indent=2) if args.json else table(result))
    ok = result["cold_burst"]["errors"] == 0 and result["cold_burst"]["released_in_order"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
