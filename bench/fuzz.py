"""`warmserve bench fuzz [--bodies N] [--messages N] [--json]`: hostile input against the running stack.

Hypothesis generates request bodies (wrong types, NaN and huge numbers written raw, lone
surrogates, absurd nesting, every OpenAI/vLLM parameter with odd values, bytes that are not JSON)
and raw bus messages (bytes and msgpack maps shaped like our schemas) for every subject the
services listen on. After each hostile input a valid request must still succeed; no body may get
a 5xx. By default it starts its own stack in this process: embedded NATS and Redis, the four
services with the fake engine (the whole control path, no vLLM); `--url` fuzzes a running gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import httpx
import msgpack
from hypothesis import HealthCheck, Phase, given, settings, strategies as st

from shared.logs import configure_logging
from shared.schemas import AgentCommand, DeviceCall, Event, InferRequest, InstanceNeed, LoadSample, NodeView
from shared.subjects import Subjects

FUZZ_MODEL = "fuzz-model"
VALID_BODY = {"model": FUZZ_MODEL, "prompt": "hello", "max_tokens": 2}
REQUEST_TIMEOUT_S = 30.0
PARAMETERS = [  # OpenAI's and vLLM's request parameters (the gateway forwards them all to vLLM)
    "add_generation_prompt", "allowed_token_ids", "audio", "bad_words", "best_of", "continue_final_message", "echo",
    "frequency_penalty", "function_call", "functions", "ignore_eos", "include_stop_str_in_output", "length_penalty",
    "logit_bias", "logprobs", "max_completion_tokens", "max_tokens", "messages", "metadata", "min_p", "min_tokens",
    "modalities", "model", "n", "parallel_tool_calls", "prediction", "presence_penalty", "priority", "prompt",
    "prompt_cache_key", "prompt_logprobs", "reasoning_effort", "repetition_penalty", "response_format",
    "return_tokens_as_token_ids", "safety_identifier", "seed", "service_tier", "skip_special_tokens",
    "spaces_between_special_tokens", "stop", "stop_token_ids", "store", "stream", "stream_options",
    "structured_outputs", "suffix", "temperature", "tool_choice", "tools", "top_k", "top_logprobs", "top_p",
    "truncate_prompt_tokens", "use_beam_search", "user", "verbosity", "web_search_options"]
HOSTILE_TEXT = ["\ud800", "\udfff", "a\ud800b", "", " ", "\x00", "é" * 3, "🙂", "x" * 300]

# ---------------------------------------------------------------- strategies

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20), st.sampled_from(HOSTILE_TEXT),
)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=12)
messages = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", "robot", ""]) | json_values},
    optional={"content": st.text(max_size=40) | st.sampled_from(HOSTILE_TEXT) | json_values
              | st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]),
                                                "text": st.text(max_size=10) | json_values}), max_size=3)}),
    max_size=4) | json_values


@st.composite
def request_objects(draw) -> dict[str, Any]:
    body: dict[str, Any] = {"model": draw(st.sampled_from([FUZZ_MODEL, FUZZ_MODEL, "no-such-model"]) | json_values)}
    if draw(st.booleans()):
        body["messages"] = draw(messages)
    else:
        body["prompt"] = draw(st.text(max_size=40) | st.sampled_from(HOSTILE_TEXT) | json_values)
    for name in draw(st.lists(st.sampled_from(PARAMETERS), max_size=5, unique=True)):
        body[name] = draw(json_values | st.integers(min_value=-3, max_value=64))
    if draw(st.booleans()):  # keep most bodies short to answer
        body["max_tokens"] = draw(st.integers(min_value=-2, max_value=8) | json_values)
    body.update(draw(st.dictionaries(st.text(max_size=8) | st.sampled_from(HOSTILE_TEXT), json_values, max_size=2)))
    return body


def _dump(body: dict[str, Any]) -> bytes:
    """JSON as a hostile client writes it: NaN/Infinity literals, surrogates as \\u escapes."""
    return json.dumps(body, allow_nan=True).encode()


request_bodies = st.one_of(
    request_objects().map(_dump),
    st.binary(max_size=64),
    st.integers(min_value=1, max_value=200_000).map(
        lambda depth: b'{"model": "' + FUZZ_MODEL.encode() + b'", "prompt": ' + b"[" * depth + b"]" * depth + b"}"),
    st.sampled_from([b"1e999", b"-1e999", b"NaN", b"Infinity", b"9" * 400, b"1" + b"0" * 30]).map(
        lambda number: b'{"model": "' + FUZZ_MODEL.encode() + b'", "prompt": "x", "temperature": ' + number + b"}"),
)

SCHEMAS = {"load": LoadSample, "need": InstanceNeed, "command": AgentCommand, "device": DeviceCall,
           "infer": InferRequest, "heartbeat": NodeView, "event": Event}


@st.composite
def bus_messages(draw) -> tuple[str, bytes]:
    """(target, payload): random bytes, or a msgpack map with a schema's field names and odd values.
    Model names are never the served model's: a well-formed command about it is an authorisation
    matter (only the placer may send commands), not a decoding one."""
    target = draw(st.sampled_from(sorted(SCHEMAS)))
    if draw(st.integers(0, 4)) == 0:
        return target, draw(st.binary(max_size=64))
    names = list(SCHEMAS[target].model_fields)
    raw = {name: draw(json_values | st.integers(min_value=-1, max_value=3)) for name in
           draw(st.lists(st.sampled_from(names), max_size=len(names), unique=True))}
    raw = {k: v for k, v in raw.items() if v != FUZZ_MODEL}
    try:
        return target, msgpack.packb(raw, use_bin_type=True)
    except (OverflowError, UnicodeEncodeError, ValueError, TypeError):
        return target, draw(st.binary(max_size=64))


def bus_subject(subjects: Subjects, target: str, node: str) -> str:
    return {"load": subjects.load_samples(), "need": subjects.instance_need(),
            "command": subjects.agent_command(node), "device": subjects.device_call(node, 0),
            "infer": subjects.infer(f"{FUZZ_MODEL}-fuzz"), "heartbeat": subjects.agent_heartbeat(),
            "event": subjects.event("agent", "instance_ready")}[target]


# ---------------------------------------------------------------- driving

@dataclass
class FuzzResult:
    bodies: int = 0
    messages: int = 0
    statuses: Counter = field(default_factory=Counter)
    server_errors: list[str] = field(default_factory=list)  # first few 5xx bodies (repr), with their answers
    follow_up_failures: list[str] = field(default_factory=list)  # valid requests that failed after hostile input

    def as_dict(self) -> dict[str, Any]:
        return {"bodies": self.bodies, "messages": self.messages,
                "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
                "server_errors": sum(v for k, v in self.statuses.items() if k >= 500),
                "follow_up_failures": len(self.follow_up_failures),
                "examples": (self.server_errors + self.follow_up_failures)[:5]}


def _explore(strategy, count: int, check: Callable[[Any], None]) -> None:
    """Feed `count` generated examples to `check` (no shrinking: every example is counted once)."""
    @settings(max_examples=count, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def run(example):
        check(example)
    run()


def fuzz(url: str, bodies: int, messages: int, publish: Callable[[str, bytes], None] | None,
         progress: Callable[[str], None] = lambda _: None) -> FuzzResult:
    """Blocking: run from a thread while the stack (if in-process) serves on its loop."""
    result = FuzzResult()
    client = httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S)

    def follow_up(after: str) -> None:
        try:
            response = client.post("/v1/completions", json=VALID_BODY)
            ok = response.status_code == 200
        except httpx.HTTPError as exc:
            ok, response = False, exc
        if not ok and len(result.follow_up_failures) < 20:
            result.follow_up_failures.append(f"after {after}: {response!r}")

    def post(body: bytes) -> None:
        endpoint = "/v1/chat/completions" if b'"messages"' in body else "/v1/completions"
        try:
            response = client.post(endpoint, content=body, headers={"content-type": "application/json"})
            status, answer = response.status_code, response.text[:200]
        except httpx.HTTPError as exc:
            status, answer = 599, f"{type(exc).__name__}: {exc}"  # a reset or a hang counts as a server error
        result.statuses[status] += 1
        result.bodies += 1
        if status >= 500 and len(result.server_errors) < 20:
            result.server_errors.append(f"{body[:200]!r} -> {status} {answer}")
        follow_up(f"body {result.bodies}")
        if result.bodies % 500 == 0:
            progress(f"fuzz: {result.bodies}/{bodies} bodies, statuses {dict(result.statuses)}")

    def send(message: tuple[str, bytes]) -> None:
        publish(*message)
        result.messages += 1
        follow_up(f"message {result.messages} to {message[0]}")

    with client:
        _explore(request_bodies, bodies, post)
        if publish is not None and messages:
            _explore(bus_messages(), messages, send)
    return result


# ---------------------------------------------------------------- an in-process stack

@contextlib.asynccontextmanager
async def local_stack(data_dir: Path):
    """Embedded NATS and Redis, the four services in this process with the fake engine, one model."""
    from services.forecaster.service import ForecasterService
    from services.gateway.service import GatewayService
    from services.gpuagent.service import AgentService
    from services.placer.service import PlacerService
    from shared.bus import Bus
    from shared.runner import Running
    from shared.schemas import ModelInfo
    from shared.settings import load_settings
    from shared.state import State
    from warmserve import infra

    nats = infra.start_nats(data_dir, infra.free_port(), data_dir / "nats.log")
    redis = infra.start_redis(data_dir, infra.free_port(), data_dir / "redis.log")
    s = load_settings({"namespace": "fuzz" + uuid.uuid4().hex[:6], "nats_url": nats.url, "redis_url": redis.url,
                       "data_dir": str(data_dir), "engine": "fake", "fake_token_s": 0.0, "gateway_port": 0,
                       "heartbeat_s": 0.5, "placer_tick_s": 0.5, "warm_engines": False}, env={})
    state = await State.connect(s)
    await state.register_model(ModelInfo(name=FUZZ_MODEL, path=str(data_dir), size_bytes=1 << 20,
                                         content_hash="fuzz", arch="fuzz", max_model_len=256))
    services = []
    bus = await Bus.connect(s, "fuzzer")
    try:
        for cls in (AgentService, ForecasterService, PlacerService, GatewayService):
            services.append(await Running.start(cls(s), with_health=False))
        yield f"http://127.0.0.1:{services[-1].service.port}", bus, s, services
    finally:
        for running in reversed(services):
            await running.shutdown()
        await bus.close()
        await state.close()
        nats.stop()
        redis.stop()


async def fuzz_local(bodies: int, messages: int, progress: Callable[[str], None]) -> tuple[FuzzResult, list[str]]:
    """Fuzz a fresh in-process stack; also report services whose loops died."""
    with tempfile.TemporaryDirectory(prefix="warmserve-fuzz-") as tmp:
        async with local_stack(Path(tmp)) as (url, bus, s, services):
            loop = asyncio.get_running_loop()
            subjects = Subjects(s.namespace)

            def publish(target: str, payload: bytes) -> None:
                asyncio.run_coroutine_threadsafe(bus.publish_bytes(bus_subject(subjects, target, s.node), payload),
                                                 loop).result(10)

            result = await asyncio.to_thread(fuzz, url, bodies, messages, publish, progress)
            dead = [r.service.name for r in services if r._run_task.done()]
            return result, dead


def table(result: dict[str, Any]) -> str:
    lines = [f"bodies {result['bodies']}, bus messages {result['messages']}, {result['seconds']:.0f} s",
             f"statuses: {result['statuses']}",
             f"5xx: {result['server_errors']}   valid follow-ups that failed: {result['follow_up_failures']}   "
             f"services whose loops died: {result['dead_services'] or 'none'}"]
    lines += [f"  e.g. {example}" for example in result["examples"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="warmserve bench fuzz", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bodies", type=int, default=10_000, help="hostile request bodies")
    parser.add_argument("--messages", type=int, default=2_000, help="hostile bus messages (in-process stack only)")
    parser.add_argument("--url", default="", help="fuzz this running gateway instead (bodies only)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv[1:] if argv[:1] == ["fuzz"] else argv)
    say = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    configure_logging("warning")  # the services' logs (thousands of rejections) on stderr, stdout for the result
    started = time.monotonic()
    if args.url:
        result, dead = fuzz(args.url, args.bodies, 0, None, say), []
    else:
        result, dead = asyncio.run(fuzz_local(args.bodies, args.messages, say))
    summary = {**result.as_dict(), "dead_services": dead, "seconds": time.monotonic() - started}
    print(json.dumps(summary, indent=2) if args.json else table(summary))
    return 0 if not (summary["server_errors"] or summary["follow_up_failures"] or dead) else 1


if __name__ == "__main__":
    sys.exit(main())
