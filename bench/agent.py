"""`warmserve bench agent [--json]`: time to first token with real vLLM, side by side, per model:
(a) nothing resident: cold start from disk on a fresh device (engine init + weights),
(a2) cold from disk on a device whose warm engine is idle (disk read + module build + bind),
(b) a prewarmed copy: promote (zero-copy: the warm engine computes with the pool's module; timed to the agent's
instance_ready event, which the gateway dispatches on),
(c) a running instance, and (d) a fresh `python -m vllm.entrypoints.openai.api_server` process.
Also prewarm and evict times and the peak RSS of each device worker. CPU by default; CUDA with
`--device-kind cuda` (bench/gpu_agent.sh)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

from services.gpuagent.service import AgentService
from shared.bus import Bus
from shared.logs import configure_logging
from shared.model_files import DTYPE_BYTES, checkpoint_info
from shared.runner import Running
from shared.schemas import AgentCommand, CommandKind, CommandResult, Event, InferChunk, InferRequest, SamplingSpec
from shared.settings import load_settings
from shared.state import State
from sim.timing import MEASURED_DIR
from warmserve import infra
from warmserve.models import DEMO_MODELS, DemoSpec, build_model, build_tokenizer

REPEATS = 9
FRESH_SERVER_KV_BYTES = 1 << 30  # vLLM refuses a KV cache too small for one max-length request
PROMPT = "def fibonacci(n):"
TIMING_PROMPT_WORDS = 200  # the long prompt of token_timing ("hello " repeated: about a token a word)


def build_pairs(root: Path, large: DemoSpec | None) -> list[tuple[str, str]]:
    """Two checkpoints per architecture (so promotion really swaps weights): (measured, other)."""
    build_tokenizer(root / "_tokenizer")
    small, big = DEMO_MODELS[0], large or DEMO_MODELS[2]
    pairs = []
    for spec in (small, big):
        names = (spec.name, spec.name + "-other")
        for name, seed in zip(names, (spec.seed, spec.seed + 100)):
            if not (root / name / "model.safetensors").exists():
                build_model(DemoSpec(name, spec.hidden, spec.layers, spec.heads, spec.intermediate, seed),
                            root / name, root / "_tokenizer")
        pairs.append(names)
    return pairs


class Bench:
    def __init__(self, bus: Bus, node: str):
        self.bus, self.node = bus, node

    async def cmd(self, kind: CommandKind, model: str = "", device: int = 0, instance_id: str = "") -> CommandResult:
        result = await self.bus.request(self.bus.subjects.agent_command(self.node), AgentCommand(
            command_id=uuid.uuid4().hex, kind=kind, model=model, devices=[device], instance_id=instance_id),
            CommandResult, timeout_s=900)
        if not result.ok:
            raise RuntimeError(f"{kind.value} {model}: {result.reason}")
        return result

    async def promote_until_ready(self, model: str, device: int, instance_id: str) -> tuple[float, CommandResult]:
        """Order a promotion; seconds until the agent's `instance_ready` event for it arrives (what the
        gateway dispatches on; the command's reply follows after the agent's state write)."""
        ready = asyncio.get_running_loop().create_future()

        async def on_event(event: Event) -> None:
            if event.instance_id == instance_id and not ready.done():
                ready.set_result(None)

        sub = await self.bus.subscribe(self.bus.subjects.event("agent", "instance_ready"), Event, on_event)
        started = time.perf_counter()
        command = asyncio.ensure_future(self.cmd(CommandKind.promote, model, device, instance_id))
        await asyncio.wait({ready, command}, return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            await command  # raises: the promotion was refused
        seconds = time.perf_counter() - started
        await self.bus.unsubscribe(sub)
        return seconds, await command

    async def first_token_s(self, instance_id: str) -> float:
        """Send one request; seconds until its first token arrives (the rest is drained)."""
        return (await self.request_s(instance_id))[0]

    async def request_s(self, instance_id: str, prompt: str = PROMPT, max_tokens: int = 8) -> tuple[float, float]:
        """Send one request; seconds until its first token arrives and until its last."""
        request_id = uuid.uuid4().hex
        reply = self.bus.subjects.infer_reply("bench", request_id)
        chunks = self.bus.stream(reply, InferChunk)
        first = asyncio.ensure_future(chunks.__anext__())
        await asyncio.sleep(0.01)
        await self.bus.nc.flush()
        started = time.perf_counter()
        await self.bus.publish(self.bus.subjects.infer(instance_id), InferRequest(
            request_id=request_id, model="", reply_to=reply, prompt=prompt,
            sampling=SamplingSpec(max_tokens=max_tokens, temperature=0, ignore_eos=True)))
        chunk = await asyncio.wait_for(first, 120)
        while not (chunk.text or chunk.finish_reason or chunk.error):  # the acknowledgement is no token
            chunk = await asyncio.wait_for(chunks.__anext__(), 120)
        elapsed = time.perf_counter() - started
        while not (chunk.finish_reason or chunk.error):
            chunk = await chunks.__anext__()
        total = time.perf_counter() - started
        await chunks.aclose()
        if chunk.error:
            raise RuntimeError(chunk.error)
        return elapsed, total

    async def timed(self, coro) -> tuple[float, object]:
        started = time.perf_counter()
        result = await coro
        return time.perf_counter() - started, result


async def token_timing(b: Bench, instance_id: str) -> dict:
    """Prefill per prompt token (a short and a long prompt, one output token) and decode per output
    token (32 more), medians of 3, on a running instance at batch 1."""
    short, long_ = [statistics.median([(await b.request_s(instance_id, "hello " * words, 1))[0] for _ in range(3)])
                    for words in (8, TIMING_PROMPT_WORDS)]
    first, total = zip(*[await b.request_s(instance_id, "hello " * 8, 33) for _ in range(3)])
    per_token = max(long_ - short, 0.0) / (TIMING_PROMPT_WORDS - 8)
    return {"prefill_s_per_token": per_token, "prefill_overhead_s": max(short - 8 * per_token, 0.0),
            "decode_s_per_token": statistics.median(t - f for f, t in zip(first, total)) / 32}


async def measure_model(b: Bench, model: str, other: str, device: int) -> dict:
    """Instance ids name the model: a stopped instance answers its id with 503s for a while."""
    out: dict = {"model": model}
    # (a) nothing resident on a fresh device: the cold start every cache miss pays
    seconds, result = await b.timed(b.cmd(CommandKind.cold_start, model, device, f"{model}-cold"))
    out["a_cold_start_s"] = seconds + await b.first_token_s(f"{model}-cold")
    out["a_detail"] = {k: v for k, v in result.detail.items() if k.endswith("_ms") or k == "path"}
    await b.cmd(CommandKind.demote, instance_id=f"{model}-cold")
    # (a2) cold from disk, engine warm: evict the copy, load again
    await b.cmd(CommandKind.evict, model, device)
    seconds, _ = await b.timed(b.cmd(CommandKind.cold_start, model, device, f"{model}-cold2"))
    out["a2_disk_into_warm_engine_s"] = seconds + await b.first_token_s(f"{model}-cold2")
    await b.cmd(CommandKind.demote, instance_id=f"{model}-cold2")
    # prewarm/evict of the other checkpoint, then (b) promote with a real weight swap each time
    prewarm, evict, promote, command, warm = [], [], [], [], []
    await b.cmd(CommandKind.prewarm, other, device)
    for i in range(REPEATS):
        await b.cmd(CommandKind.promote, other, device, f"{model}-o{i}")  # the engine now holds other weights
        await b.cmd(CommandKind.demote, instance_id=f"{model}-o{i}")
        seconds, result = await b.promote_until_ready(model, device, f"{model}-p{i}")
        command.append(seconds)  # the promote command's own time: ordered -> ready
        promote.append(seconds + await b.first_token_s(f"{model}-p{i}"))
        out["promote_copied_bytes"] = max(out.get("promote_copied_bytes", 0), result.detail["copied_bytes"])
        warm.extend([await b.first_token_s(f"{model}-p{i}") for _ in range(3)])  # (c) running instance
        if i == 0:
            out["tokens"] = await token_timing(b, f"{model}-p{i}")
        await b.cmd(CommandKind.demote, instance_id=f"{model}-p{i}")
    for _ in range(3):
        seconds, _ = await b.timed(b.cmd(CommandKind.evict, other, device))
        evict.append(seconds)
        seconds, _ = await b.timed(b.cmd(CommandKind.prewarm, other, device))
        prewarm.append(seconds)
    await b.cmd(CommandKind.evict, other, device)
    await b.cmd(CommandKind.evict, model, device)
    out.update(b_promote_s=statistics.median(promote), c_running_s=statistics.median(warm),
               promote_command_s=statistics.median(command), prewarm_s=statistics.median(prewarm),
               evict_s=statistics.median(evict))
    out["ratio_b_over_c"] = out["b_promote_s"] / out["c_running_s"]
    return out


def fresh_server_ttft_s(path: str, kv_bytes: int, max_model_len: int, dtype: str) -> float:
    """(d) spawn vLLM's own OpenAI server for the model; seconds from spawn to the first token."""
    port = infra.free_port()
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1", HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1")
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", path,
                             "--port", str(port), "--enforce-eager", "--dtype", dtype,
                             "--kv-cache-memory-bytes", str(kv_bytes), "--max-model-len", str(max_model_len)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        body = json.dumps({"model": path, "prompt": PROMPT, "max_tokens": 1, "temperature": 0}).encode()
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm api_server exited with {proc.returncode}")
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                             {"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=30) as resp:
                    resp.read()
                    return time.perf_counter() - started
            except OSError:
                time.sleep(0.2)
            if time.perf_counter() - started > 600:
                raise RuntimeError("vllm api_server not serving after 600 s")
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(30)


def worker_peak_rss(agent: AgentService) -> list[int]:
    peaks = []
    for index in range(len(agent.ledgers)):
        status = Path(f"/proc/{agent.workers.pid(index)}/status").read_text()
        peaks.append(int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))) * 1024)
    return peaks


async def run(models_dir: Path, device_kind: str, skip_fresh: bool, large: DemoSpec | None) -> dict:
    pairs = build_pairs(models_dir, large)
    data = Path(tempfile.mkdtemp(prefix="bench-agent-"))
    nats = infra.start_nats(data, infra.free_port())
    redis = infra.start_redis(data, infra.free_port())
    settings = load_settings({"nats_url": nats.url, "redis_url": redis.url, "namespace": "benchagent",
                              "engine": "vllm", "device_kind": device_kind, "devices": 2,
                              "device_memory_bytes": 8 << 30, "kv_cache_bytes": 128 << 20,
                              "warm_engines": False}, env={})  # (a) must find no engine at all
    try:
        state = await State.connect(settings)
        for name in (n for pair in pairs for n in pair):
            await state.register_model(checkpoint_info(name, models_dir / name))
        await state.close()
        running = await Running.start(AgentService(settings), with_health=False)
        bus = await Bus.connect(settings, "bench")
        b = Bench(bus, settings.node)
        devices = len(running.service.ledgers)  # cuda: the visible GPUs; one GPU measures both pairs
        results = []
        for i, (model, other) in enumerate(pairs):
            results.append(await measure_model(b, model, other, i % devices))
            print(f"measured {json.dumps(results[-1])}", file=sys.stderr, flush=True)  # progress, kept if (d) fails
        peaks = worker_peak_rss(running.service)
        await bus.close()
        await running.shutdown()
        for r, (model, _) in zip(results, pairs):
            info = checkpoint_info(model, models_dir / model)
            r["size_bytes"], r["dtype"] = info.size_bytes, info.dtype
            r["params_m"] = round(info.size_bytes / DTYPE_BYTES[info.dtype] / 1e6, 1)
            if not skip_fresh:
                r["d_fresh_api_server_s"] = fresh_server_ttft_s(str(models_dir / model), FRESH_SERVER_KV_BYTES,
                                                                  info.max_model_len, info.dtype)
                r["ratio_b_over_d"] = r["b_promote_s"] / r["d_fresh_api_server_s"]
            r["ratio_b_over_a"] = r["b_promote_s"] / r["a_cold_start_s"]
        return {"device_kind": device_kind, "models": results, "worker_peak_rss_bytes": peaks,
                "repeats": REPEATS}
    finally:
        nats.stop()
        redis.stop()


def timing_profile(report: dict, models_dir: Path) -> dict:
    """This machine's figures for the simulator (sim.timing.apply_measured's format; bench live reads
    them): load bytes per second and what a promote, a cold start into a warm engine (worker) and a
    fresh engine add to a running instance's first token beyond the load; per measured model, its
    prefill and decode per token. Not measured here: the batch slowdown (0) and the demote (the
    base profile's)."""
    rows = report["models"]
    bandwidth = statistics.median(r["size_bytes"] / r["prewarm_s"] for r in rows)
    beyond = lambda key: statistics.median(max(r[key] - r["c_running_s"] - r["size_bytes"] / bandwidth, 0.0)  # noqa: E731
                                           for r in rows)
    engine_s = beyond("a_cold_start_s")
    gpu = {"host_to_gpu_bytes_s": bandwidth,
           "promote_s": statistics.median(max(r["b_promote_s"] - r["c_running_s"], 0.0) for r in rows),
           "worker_start_s": beyond("a2_disk_into_warm_engine_s"), "engine_start_s": engine_s,
           "eager_engine_start_s": engine_s}  # the agent's engines are in-process and eager
    models = {r["model"]: {"size_bytes": r["size_bytes"], "tp": 1,
                           "kv_bytes_per_token": checkpoint_info(r["model"], models_dir / r["model"]).kv_bytes_per_token,
                           **r["tokens"], "decode_batch_slowdown": 0.0} for r in rows}
    return {"notes": [f"Measured by `warmserve bench agent --device-kind {report['device_kind']}` on "
                      f"{platform.node()} ({os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at the end)."],
            "gpu": gpu, "models": models}


def render(report: dict) -> str:
    cols = [("model", "model", "{}"), ("params_m", "M params", "{}"), ("a_cold_start_s", "(a) cold s", "{:.3f}"),
            ("a2_disk_into_warm_engine_s", "(a2) disk->warm s", "{:.3f}"), ("b_promote_s", "(b) promote s", "{:.3f}"),
            ("c_running_s", "(c) running s", "{:.4f}"), ("d_fresh_api_server_s", "(d) api_server s", "{:.1f}"),
            ("ratio_b_over_c", "b/c", "{:.2f}"), ("promote_command_s", "promote cmd s", "{:.4f}"),
            ("promote_copied_bytes", "promote copied B", "{}"),
            ("ratio_b_over_a", "b/a", "{:.4f}"), ("ratio_b_over_d", "b/d", "{:.5f}"),
            ("prewarm_s", "prewarm s", "{:.3f}"), ("evict_s", "evict s", "{:.4f}")]
    lines = ["  ".join(f"{title:>16}" for _, title, _ in cols)]
    for r in report["models"]:
        lines.append("  ".join(f"{(fmt.format(r[key]) if key in r else '-'):>16}" for key, _, fmt in cols))
    lines.append(f"device worker peak RSS (MiB): {[round(p / 2**20) for p in report['worker_peak_rss_bytes']]}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="warmserve bench agent", description=__doc__)
    parser.add_argument("action", nargs="?", default="agent")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--models-dir", default="out/bench-models")
    parser.add_argument("--device-kind", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--skip-fresh-server", action="store_true", help="skip (d), the slowest part")
    parser.add_argument("--large", default="", help="hidden,layers,heads,intermediate of the large model "
                                                    "(e.g. 4096,32,32,11008 for a 7B Llama on a GPU)")
    args = parser.parse_args(argv)
    large = None
    if args.large:
        h, n, heads, f = (int(x) for x in args.large.split(","))
        large = DemoSpec(f"bench-{h}x{n}", h, n, heads, f, seed=7)
    configure_logging("warning")
    root = Path(args.models_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    report = asyncio.run(run(root, args.device_kind, args.skip_fresh_server, large))
    profile = MEASURED_DIR / f"{args.device_kind}_agent.json"
    profile.write_text(json.dumps(timing_profile(report, root), indent=1) + "\n")
    print(f"wrote the simulator's timing profile of this machine to {profile}", file=sys.stderr)
    print(json.dumps(report, indent=1) if args.json else render(report))
    return 0
