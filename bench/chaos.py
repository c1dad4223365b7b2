"""`warmserve bench chaos [--engine vllm|fake] [--faults a,b] [--json]`: break the real stack under load.

Starts `warmserve up` (embedded NATS and Redis with credentials, supervision on) in a data directory
of its own and keeps a bounded load of streaming chat requests over the registered models. Then, one
at a time, it kill -9s each service, a device worker, nats-server and redis-server, and SIGTERMs the
gateway. Per fault it reports the requests that were ok, failed with a clear error (an OpenAI-format
error body or stream event), failed obscurely (reset, truncated stream, a 5xx that is not JSON) or
hung; the seconds until requests sent after the fault succeed again for every model (each model
probed one request at a time; for the "-10s" outages, where `warmserve up` is paused so the server
stays down 10 s, counted from the server's return); and whether the state converged:
every ready instance and copy in Redis is held by its device worker and the worker holds no other.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from shared.bus import Bus, BusError
from shared.logs import configure_logging
from shared.schemas import CommandResult, CopyState, DeviceCall, DeviceOp, InstanceState, NodeView
from shared.settings import Settings, load_settings
from shared.state import State
from warmserve import infra

FAULTS = ("forecaster", "placer", "gpuagent", "device-worker", "nats", "redis", "nats-10s", "redis-10s", "gateway")
OUTAGE_S = 10.0  # "-10s" faults: the server stays down this long (warmserve up is paused meanwhile)
OUTCOMES = ("ok", "clear_errors", "obscure_failures", "hung", "unreachable")
HUNG_S = 150.0  # longer than the gateway's queue deadline (120 s): a request still open then is hung
RECOVERY_LIMIT_S = 240.0
CONVERGE_S = 30.0
BASELINE_S = 5.0  # load before each fault
PROBE_EVERY_S = 0.5
READY_TIMEOUT_S = 900.0


@dataclass
class Tally:
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    examples: list[str] = field(default_factory=list)  # what the obscure failures and hangs were

    def add(self, outcome: str, detail: str) -> None:
        self.counts[outcome] += 1
        if outcome in ("obscure_failures", "hung") and len(self.examples) < 5:
            self.examples.append(detail)


# ---------------------------------------------------------------- requests


async def ask(client: httpx.AsyncClient, model: str, max_tokens: int) -> tuple[str, str]:
    """One streaming chat request: (outcome, detail)."""
    body = {"model": model, "stream": True, "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": "Tell me about warm starts."}]}
    try:
        async with asyncio.timeout(HUNG_S):
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    raw = await response.aread()
                    return ("clear_errors" if _openai_error(raw) else "obscure_failures",
                            f"{response.status_code} {raw[:120]!r}")
                events = [line[6:] async for line in response.aiter_lines() if line.startswith("data: ")]
    except TimeoutError:
        return "hung", f"no answer within {HUNG_S:g} s"
    except httpx.ConnectError as exc:
        return "unreachable", f"{type(exc).__name__}: {exc}"  # nothing listening: the client may retry
    except httpx.HTTPError as exc:
        return "obscure_failures", f"{type(exc).__name__}: {exc}"
    if not events or events[-1] != "[DONE]":
        return "obscure_failures", f"stream ended without [DONE] after {len(events)} events"
    if any(_openai_error(e.encode()) for e in events[:-1]):
        return "clear_errors", "error event in the stream"
    return "ok", ""


def _openai_error(raw: bytes) -> bool:
    try:
        error = json.loads(raw).get("error")
    except (ValueError, AttributeError):
        return False
    return isinstance(error, dict) and isinstance(error.get("message"), str)


class Load:
    """`concurrency` clients asking in a loop; each outcome is counted under the phase it started in."""

    def __init__(self, url: str, models: list[str], concurrency: int, max_tokens: int):
        self.client = httpx.AsyncClient(base_url=url, timeout=HUNG_S + 10)
        self.models, self.concurrency, self.max_tokens = models, concurrency, max_tokens
        self.phase = "warmup"
        self.tallies: dict[str, Tally] = {}
        self.open: set[asyncio.Task] = set()
        self._stop = asyncio.Event()
        self._next_model = itertools.cycle(models)

    async def request(self, model: str | None = None) -> str:
        phase, tally = self.phase, self.tallies.setdefault(self.phase, Tally())
        outcome, detail = await ask(self.client, model or next(self._next_model), self.max_tokens)
        tally.add(outcome, f"[{phase}] {detail}")
        return outcome

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self.open.add(task)
        task.add_done_callback(self.open.discard)
        return task

    async def _client(self) -> None:
        while not self._stop.is_set():
            await self.request()
            await asyncio.sleep(0.1)

    def start(self) -> None:
        for _ in range(self.concurrency):
            self.spawn(self._client())

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self.open, return_exceptions=True)
        await self.client.aclose()


# ---------------------------------------------------------------- the stack and its processes


class Stack:
    def __init__(self, data_dir: Path, engine: str, devices: int, models_dir: str):
        self.data_dir, self.engine, self.devices = data_dir, engine, devices
        self.namespace = "chaos" + uuid.uuid4().hex[:6]
        self.ports = {name: infra.free_port() for name in ("nats", "redis", "gateway")}
        self.flags = {"data_dir": str(data_dir), "namespace": self.namespace, "devices": str(devices),
                      "nats_url": f"nats://127.0.0.1:{self.ports['nats']}",
                      "redis_url": f"redis://127.0.0.1:{self.ports['redis']}/0",
                      "gateway_port": str(self.ports["gateway"]), "heartbeat_s": "0.5", "placer_tick_s": "1",
                      "engine": engine, "models_dir": str(Path(models_dir).resolve())}
        if engine == "fake":
            self.flags.update(fake_worker_processes="true", fake_token_s="0.01")
        self.settings: Settings = load_settings(self.flags, env={})
        self.proc: subprocess.Popen | None = None
        self.url = f"http://127.0.0.1:{self.ports['gateway']}"

    def start(self) -> None:
        argv = [sys.executable, "-m", "warmserve.cli", "up"]
        for name, value in self.flags.items():
            argv += [f"--{name.replace('_', '-')}", value]
        log = open(self.data_dir / "up.log", "ab")
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    async def wait_ready(self, say) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        async with httpx.AsyncClient(base_url=self.url, timeout=2) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"warmserve up exited with {self.proc.returncode}: "
                                       f"see {self.data_dir / 'up.log'}")
                try:
                    if (await client.get("/readyz")).status_code == 200:
                        say("stack ready")
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(1)
        raise RuntimeError(f"stack not ready within {READY_TIMEOUT_S:g} s: see {self.data_dir / 'up.log'}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def pids(self, fault: str) -> list[int]:
        """The processes a fault hits, found in /proc by their command line and this stack's namespace."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().rstrip(b"\0").split(b"\0")
                environ = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if self._hits(fault, [a.decode(errors="replace") for a in argv], environ):
                found.append(int(entry.name))
        return found

    def _hits(self, fault: str, argv: list[str], environ: list[bytes]) -> bool:
        ours = f"WARMSERVE_NAMESPACE={self.namespace}".encode() in environ
        if fault in ("nats", "redis"):  # redis-server retitles itself "redis-server HOST:PORT"
            port, line = str(self.ports[fault]), " ".join(argv)
            return Path(argv[0]).name.startswith(f"{fault}-server") and (port in argv or f":{port}" in line)
        if fault == "device-worker":
            return ours and "services.gpuagent.worker" in argv and argv[argv.index("--device-index") + 1] == "0"
        return ours and "warmserve.cli" in argv and argv[-2:] == ["service", fault]

    async def inject(self, fault: str) -> list[int]:
        """Kill what `fault` names; for an outage, keep it down OUTAGE_S by pausing its supervisor."""
        target = fault.removesuffix("-10s")
        pids = self.pids(target)
        if not pids:
            raise RuntimeError(f"no process found for fault {fault!r}")
        outage = target != fault
        if outage:
            os.kill(self.proc.pid, signal.SIGSTOP)
        for pid in pids:
            os.kill(pid, signal.SIGTERM if fault == "gateway" else signal.SIGKILL)
        if outage:
            await asyncio.sleep(OUTAGE_S)
            os.kill(self.proc.pid, signal.SIGCONT)
        return pids


# ---------------------------------------------------------------- convergence


async def state_problem(settings: Settings, devices: int) -> str:
    """Why the observed state is not the truth yet ("" when it is)."""
    bus = state = None
    try:
        bus, state = await Bus.connect(settings, "chaos-check"), await State.connect(settings)
        view: NodeView | None = (await state.node_views(alive_only=True)).get(settings.node)
        if view is None:
            return f"no live view of {settings.node} in Redis"
        if len(view.devices) != devices:
            return f"{len(view.devices)} of {devices} devices in the view"
        for device in range(devices):
            try:
                status = await bus.request(bus.subjects.device_call(settings.node, device),
                                           DeviceCall(op=DeviceOp.status), CommandResult, timeout_s=2.0)
            except BusError as exc:
                return f"device {device}'s worker does not answer: {exc}"
            instances = {i.instance_id: i.state == InstanceState.ready for i in view.instances if device in i.devices}
            copies = {c.model: c.state == CopyState.ready for c in view.copies if device in c.devices}
            problem = (_mismatch("instance", instances, set(status.detail["inflight"]))
                       or _mismatch("copy", copies, set(status.detail.get("copies", []))))
            if problem:
                return f"device {device}: {problem}"
        return ""
    except Exception as exc:  # noqa: BLE001 - NATS or Redis not back yet
        return f"{type(exc).__name__}: {exc}"
    finally:
        for connection in (bus, state):
            if connection is not None:
                await connection.close()


def _mismatch(kind: str, listed: dict[str, bool], held: set[str]) -> str:
    """A ready one listed but not held is a phantom; one held but not listed at all is unknown."""
    if phantoms := sorted(name for name, ready in listed.items() if ready and name not in held):
        return f"phantom {kind} {phantoms}"
    if unknown := sorted(held - set(listed)):
        return f"{kind} held but not listed: {unknown}"
    return ""


async def converge(settings: Settings, devices: int) -> tuple[bool, str]:
    deadline, problem = time.monotonic() + CONVERGE_S, "not checked"
    while time.monotonic() < deadline:
        problem = await state_problem(settings, devices)
        if not problem:
            return True, ""
        await asyncio.sleep(1)
    return False, problem


# ---------------------------------------------------------------- one fault


async def recover(load: Load, fault_s: float) -> dict[str, float | None]:
    """Per model, requests one after another (a pause between failures) until one succeeds: seconds
    from `fault_s` to that success (None: not within RECOVERY_LIMIT_S; negative: before it)."""

    async def probe(model: str) -> float | None:
        while time.monotonic() < fault_s + RECOVERY_LIMIT_S:
            if await load.request(model) == "ok":
                return time.monotonic() - fault_s
            await asyncio.sleep(PROBE_EVERY_S)
        return None

    return dict(zip(load.models, await asyncio.gather(*(probe(m) for m in load.models))))


async def run_fault(stack: Stack, load: Load, fault: str, baseline_s: float, say) -> dict[str, Any]:
    load.phase = fault
    await asyncio.sleep(baseline_s)
    fault_s = time.monotonic()
    back_s = fault_s + (OUTAGE_S if fault.endswith("-10s") else 0.0)  # when the server may return
    injecting = asyncio.create_task(stack.inject(fault))  # probes start at once, outage or not
    per_model = await recover(load, back_s)
    say(f"{fault}: {'SIGTERM' if fault == 'gateway' else 'kill -9'} pid {await injecting}")
    times = [t for t in per_model.values() if t is not None]
    recovery_s = max(times) if len(times) == len(per_model) else None
    say(f"{fault}: requests to every model succeed again after "
        f"{'never' if recovery_s is None else round(recovery_s, 1)} s ({_rounded(per_model)})")
    converged, problem = await converge(stack.settings, stack.devices)
    load.phase = f"after-{fault}"
    return {"fault": fault, "recovery_s": recovery_s, "converged": converged,
            "first_ok_s": min(times, default=None), "recovery_s_per_model": _rounded(per_model), "problem": problem}


def _rounded(per_model: dict[str, float | None]) -> dict[str, float | None]:
    return {m: None if t is None else round(t, 2) for m, t in per_model.items()}


async def run(engine: str, faults: list[str], devices: int, concurrency: int, max_tokens: int, say,
              data_dir: str = "", models_dir: str = "models", baseline_s: float = BASELINE_S,
              names: list[str] | None = None) -> dict:
    """Start the stack, warm every model, keep the load on and inject each fault in turn."""
    with tempfile.TemporaryDirectory(prefix="warmserve-chaos-") as tmp:
        stack = Stack(Path(data_dir or tmp).resolve(), engine, devices, models_dir)
        stack.data_dir.mkdir(parents=True, exist_ok=True)
        say(f"stack data and logs in {stack.data_dir}")
        stack.start()
        try:
            await stack.wait_ready(say)
            state = await State.connect(stack.settings)
            registered = await state.models()
            await state.close()
            models = names or [m.name for m in sorted(registered.values(), key=lambda m: (m.size_bytes, m.name))]
            models = sorted(models[:devices] if not names else models)  # by default a load the devices can hold
            load = Load(stack.url, models, concurrency, max_tokens)
            say(f"warming up: one request per model ({', '.join(models)})")
            await asyncio.gather(*(load.request(m) for m in models))
            load.start()
            results = []
            for fault in faults:
                results.append(await run_fault(stack, load, fault, baseline_s, say))
            await load.stop()  # every request is counted under the phase it started in, once it ended
            for result in results:
                tally = load.tallies.get(result["fault"], Tally())
                result.update(tally.counts, examples=tally.examples)
            warmup = load.tallies.get("warmup", Tally()).counts
            return {"engine": engine, "devices": devices, "concurrency": concurrency, "models": models,
                    "warmup": warmup,
                    "faults": results, "load_average": os.getloadavg()}
        finally:
            stack.stop()


def table(result: dict[str, Any]) -> str:
    head = (f"{'fault':<14}{'ok':>6}{'clear':>7}{'obscure':>9}{'hung':>6}{'unreach':>9}{'recovery_s':>12}"
            f"{'first_ok_s':>12}  converged")
    lines = [f"engine {result['engine']}, {result['devices']} devices, {result['concurrency']} clients over "
             f"{', '.join(result['models'])}, "
             f"load average {', '.join(f'{x:.2f}' for x in result['load_average'])}", head]
    for f in result["faults"]:
        recovery, first = ("never" if t is None else f"{t:.1f}" for t in (f["recovery_s"], f["first_ok_s"]))
        lines.append(f"{f['fault']:<14}{f['ok']:>6}{f['clear_errors']:>7}{f['obscure_failures']:>9}{f['hung']:>6}"
                     f"{f['unreachable']:>9}{recovery:>12}{first:>12}  "
                     f"{'yes' if f['converged'] else 'NO: ' + f['problem']}")
        lines += [f"    {example}" for example in f["examples"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="warmserve bench chaos", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=("vllm", "fake"), default="vllm")
    parser.add_argument("--faults", default=",".join(FAULTS), help=f"comma-separated, of {', '.join(FAULTS)}")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=3, help="clients sending requests in a loop")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--models", default="", help="comma-separated models to load (default: the DEVICES "
                                                     "smallest registered, one instance per device)")
    parser.add_argument("--models-dir", default="models", help="demo models are built here if missing")
    parser.add_argument("--data-dir", default="", help="keep the stack's data and logs here (default: a "
                                                          "temporary directory, removed at the end)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv[1:] if argv[:1] == ["chaos"] else argv)
    faults = [f for f in args.faults.split(",") if f]
    if unknown := [f for f in faults if f not in FAULTS]:
        parser.error(f"unknown faults {unknown}: choose from {', '.join(FAULTS)}")
    say = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    configure_logging("error")  # the checker's reconnect warnings during NATS faults are expected
    result = asyncio.run(run(args.engine, faults, args.devices, args.concurrency, args.max_tokens, say,
                             args.data_dir, args.models_dir, names=[m for m in args.models.split(",") if m]))
    print(json.dumps(result, indent=2) if args.json else table(result))
    good = all(f["hung"] == 0 and f["obscure_failures"] == 0 and f["converged"] and f["recovery_s"] is not None
               for f in result["faults"])
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
