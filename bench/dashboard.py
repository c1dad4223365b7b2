"""`warmserve bench dashboard [--seconds S] [--out PNG]`: the Grafana dashboard's main panels drawn
with matplotlib from a live stack, where no Grafana runs (the README's picture is made this way).

It starts embedded NATS and Redis and the four services in this process (fake engine: the whole
control path, no vLLM; three models on four small devices), drives a load that swings between the
models, scrapes every service's /metrics once a second and computes what the panels' queries would.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

MiB = 1 << 20
MODELS = ("chat-a", "code-b", "batch-c")
PERIOD_S = 60.0  # each model's load swings over this, a third of a period apart
PARTS = ("queue_wait", "instance_start_wait", "engine_ttft", "overhead")
MARKS = {"serving": "S", "ready": "P", "loading": "L", "starting": "s", "draining": "d", "evicting": "E"}

Samples = dict[tuple[str, frozenset], float]


def parse(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples named `name` whose labels include `labels` (PromQL's sum(name{labels}))."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls)


def quantile(q: float, before: Samples, after: Samples, name: str, **labels: str) -> float:
    """histogram_quantile over the increase between two scrapes (linear within a bucket), NaN if none."""
    buckets: dict[float, float] = defaultdict(float)
    for (n, ls), v in after.items():
        if n == name + "_bucket" and set(labels.items()) <= ls:
            buckets[float(dict(ls)["le"])] += v - before.get((n, ls), 0.0)
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return math.nan
    rank, lower, below = q * buckets[bounds[-1]], 0.0, 0.0
    for bound in bounds:
        if buckets[bound] >= rank:
            if math.isinf(bound):
                return lower
            return lower + (bound - lower) * (rank - below) / max(buckets[bound] - below, 1e-12)
        lower, below = bound, buckets[bound]
    return math.nan


async def load(url: str, seconds: float) -> None:
    """Concurrent clients per model, their number following a sine a third of a period apart."""
    async def client(http: httpx.AsyncClient, model: str, k: int, phase: float, started: float) -> None:
        while (now := time.monotonic() - started) < seconds:
            wanted = 3 * (1 + math.sin(2 * math.pi * now / PERIOD_S + phase))  # 0..6 clients
            if k < wanted:
                await http.post(url + "/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 8})
            else:
                await asyncio.sleep(0.2)

    started = time.monotonic()
    async with httpx.AsyncClient(timeout=120) as http:
        await asyncio.gather(*[client(http, model, k, 2 * math.pi * i / len(MODELS), started)
                               for i, model in enumerate(MODELS) for k in range(6)])


async def run_stack(seconds: float, data: Path) -> list[tuple[float, Samples]]:
    """Scrapes (seconds since start, every service's samples) once a second while the load runs."""
    from services.forecaster.service import ForecasterService
    from services.gateway.service import GatewayService
    from services.gpuagent.service import AgentService
    from services.placer.service import PlacerService
    from shared.logs import configure_logging
    from shared.runner import Running
    from shared.schemas import ModelInfo
    from shared.settings import load_settings
    from shared.state import State
    from warmserve import infra

    configure_logging("warning")
    nats = infra.start_nats(data, infra.free_port(), data / "nats.log")
    redis = infra.start_redis(data, infra.free_port(), data / "redis.log")
    s = load_settings({"namespace": "dash" + uuid.uuid4().hex[:6], "nats_url": nats.url, "redis_url": redis.url,
                       "data_dir": str(data), "engine": "fake", "fake_token_s": 0.01, "fake_load_bytes_s": 2e8,
                       "devices": 4, "device_memory_bytes": 512 * MiB, "kv_cache_bytes": 16 * MiB,
                       "gateway_port": 0, "heartbeat_s": 0.5, "placer_tick_s": 1.0, "window_s": 10.0,
                       "sample_interval_s": 0.5, "scale_window_s": 3.0, "warm_engines": False,
                       "max_inflight_per_instance": 2}, env={})  # 2: the swings need more instances than fit
    state = await State.connect(s)
    for name in MODELS:
        await state.register_model(ModelInfo(name=name, path=str(data), size_bytes=200 * MiB, content_hash=name,
                                             arch=name, max_model_len=256, kv_bytes_per_token=1024))
    services = []
    try:
        for cls in (AgentService, ForecasterService, PlacerService, GatewayService):
            services.append(await Running.start(cls(s)))
        ports = [r.health.port for r in services]
        driving = asyncio.create_task(load(f"http://127.0.0.1:{services[-1].service.port}", seconds))
        scrapes, started = [], time.monotonic()
        async with httpx.AsyncClient(timeout=10) as http:
            while not driving.done():
                merged: Samples = {}
                for port in ports:
                    merged.update(parse((await http.get(f"http://127.0.0.1:{port}/metrics")).text))
                scrapes.append((time.monotonic() - started, merged))
                await asyncio.sleep(1.0)
        await driving
        return scrapes
    finally:
        for running in reversed(services):
            await running.shutdown()
        await state.close()
        nats.stop()
        redis.stop()


def draw(scrapes: list[tuple[float, Samples]], out: Path, window: int = 10) -> None:
    """Six panels, each computed over `window` scrapes as the dashboard's rate()s would."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 2, figsize=(14, 11))
    fig.suptitle("WarmServe dashboard panels - stand-in rendered with matplotlib from a live in-process stack "
                 "(fake engine), not a Grafana screenshot", fontsize=11)
    pairs = [(scrapes[i - window], scrapes[i]) for i in range(window, len(scrapes))]
    t = [b[0] for _, b in pairs]

    ax = axes[0][0]
    for model in MODELS:
        for q, style in ((0.5, "-"), (0.99, "--")):
            ax.plot(t, [quantile(q, a[1], b[1], "warmserve_gateway_ttft_seconds", model=model) for a, b in pairs],
                    style, label=f"p{int(q * 100)} {model}")
    ax.set(title="TTFT p50 / p99 per model", ylabel="s")
    ax.legend(fontsize=7, ncol=2)

    ax = axes[0][1]
    means = []
    for part in PARTS:
        name = f"warmserve_gateway_{part}_seconds"
        means.append([(total(b[1], name + "_sum") - total(a[1], name + "_sum"))
                      / max(total(b[1], name + "_count") - total(a[1], name + "_count"), 1) for a, b in pairs])
    ax.stackplot(t, means, labels=[p.replace("_", " ") for p in PARTS])
    ax.set(title="Mean TTFT by part", ylabel="s")
    ax.legend(fontsize=7, loc="upper left")

    ax = axes[1][0]
    def hits(a: Samples, b: Samples) -> float:
        name = "warmserve_placer_decisions_total"
        promoted = total(b, name, kind="promote") - total(a, name, kind="promote")
        cold = total(b, name, kind="cold_start") - total(a, name, kind="cold_start")
        return promoted / (promoted + cold) if promoted + cold else math.nan

    def unwaited(a: Samples, b: Samples) -> float:
        name = "warmserve_gateway_instance_start_wait_seconds"
        count = total(b, name + "_count") - total(a, name + "_count")
        return (total(b, name + "_bucket", le="0.0005") - total(a, name + "_bucket", le="0.0005")) / count \
            if count else math.nan

    ax.plot(t, [hits(a[1], b[1]) for a, b in pairs], label="instances promoted from a prewarmed copy")
    ax.plot(t, [unwaited(a[1], b[1]) for a, b in pairs], label="requests that never waited for an instance")
    ax.set(title="Prewarm hit rate", ylim=(-0.05, 1.05))
    ax.legend(fontsize=7)

    ax = axes[1][1]
    last = scrapes[-1][1]
    cells = defaultdict(dict)
    for (name, labels), value in last.items():
        if name == "warmserve_agent_model_resident" and value:
            ls = dict(labels)
            cells[f"{ls['node']}/{ls['device']}"][ls["model"]] = MARKS.get(ls["state"], "?")
    devices = sorted(cells)
    ax.axis("off")
    if devices:
        table = ax.table(cellText=[[cells[d].get(m, ".") for m in MODELS] for d in devices], rowLabels=devices,
                         colLabels=list(MODELS), loc="center", cellLoc="center")
        table.scale(1, 1.6)
    ax.set_title("Models on devices at the end\n(S serving, P prewarmed, L loading, s starting, d draining)")

    ax = axes[2][0]
    for model in MODELS:
        line, = ax.plot([x for x, _ in scrapes], [total(s, "warmserve_gateway_outstanding_requests", model=model)
                                                  for _, s in scrapes], label=f"now {model}", alpha=0.5)
        ax.step([x for x, _ in scrapes], [total(s, "warmserve_forecaster_forecast", model=model, stat="avg")
                                           for _, s in scrapes], where="post", color=line.get_color(),
                label=f"forecast {model}")
    ax.set(title="Forecast vs actual load (outstanding requests)", xlabel="s")
    ax.legend(fontsize=7, ncol=2)

    ax = axes[2][1]
    for source in ("planned", "observed"):
        ax.plot([x for x, _ in scrapes], [total(s, "warmserve_placer_copies", source=source) for _, s in scrapes],
                label=f"copies {source}")
        ax.plot([x for x, _ in scrapes], [total(s, "warmserve_placer_instances", source=source) for _, s in scrapes],
                "--", label=f"instances {source}")
    ax.set(title="Copies and instances: planned vs observed", xlabel="s")
    ax.legend(fontsize=7)

    fig.tight_layout(rect=(0, 0, 1, 0.97))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="warmserve bench dashboard", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=120.0, help="how long the load runs")
    parser.add_argument("--out", type=Path, default=Path("out/dashboard.png"), help="where the picture goes")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv[1:] if argv[:1] == ["dashboard"] else argv)
    with tempfile.TemporaryDirectory(prefix="warmserve-dashboard-") as tmp:
        scrapes = asyncio.run(run_stack(args.seconds, Path(tmp)))
    draw(scrapes, args.out)
    print(f"{len(scrapes)} scrapes; wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
