"""Conformance with the engine the stack wraps: the same request shapes through the official `openai`
client against the stack (gateway -> NATS -> vLLM's own OpenAI server in the device worker) and
against a plain `vllm.entrypoints.openai.api_server` on the same checkpoint. Greedy or seeded answers
are equal ignoring ids, timestamps and fingerprints; errors have the same status codes."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import openai
import pytest

from tests.agent_helpers import running_stack
from warmserve import infra

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
MiB = 1 << 20
MODEL = "demo-qwen2"
KV_BYTES = 64 * MiB
SERVER_START_S = 300
VOLATILE = {"id", "created", "created_at", "item_id", "system_fingerprint"}  # differ between any two answers

TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                        "required": ["city"]}}}
SCHEMA = {"type": "json_schema", "json_schema": {"name": "city", "schema": {
    "type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}}}
HI = [{"role": "user", "content": "Say hello"}]
GREEDY = {"temperature": 0, "max_tokens": 6}

COMPLETIONS = {
    "plain": {"prompt": "def main(", **GREEDY},
    "stream": {"prompt": "def main(", "stream": True, **GREEDY},
    "stream_usage": {"prompt": "Hello", "stream": True, "stream_options": {"include_usage": True}, **GREEDY},
    "n2_seeded": {"prompt": "Once", "n": 2, "temperature": 1.0, "seed": 7, "max_tokens": 5},
    "logprobs": {"prompt": "The sky", "logprobs": 3, **GREEDY},
    "stream_logprobs": {"prompt": "The sky", "logprobs": 2, "stream": True, **GREEDY},
    "echo": {"prompt": "Echo me", "echo": True, "max_tokens": 3, "temperature": 0},
    "penalties": {"prompt": "a a a a", "presence_penalty": 1.5, "frequency_penalty": 1.0, **GREEDY},
    "logit_bias": {"prompt": "x", "logit_bias": {"100": 100}, **GREEDY},
    "seeded": {"prompt": "Random", "temperature": 0.9, "seed": 42, "max_tokens": 6},
    "token_ids": {"prompt": [1, 2, 3, 4], **GREEDY},
    "batch": {"prompt": ["first", "second"], **GREEDY},
    "batch_token_ids": {"prompt": [[5, 6], [7, 8, 9]], **GREEDY},
    "stop": {"prompt": "def main(", "stop": ["e", "a"], **GREEDY},
    "user": {"prompt": "Hi", "user": "u-1", **GREEDY},
    "vllm_extras": {"prompt": "Hi", "extra_body": {"top_k": 5, "repetition_penalty": 1.2, "min_tokens": 4,
                                                   "stop_token_ids": [0]}, **GREEDY},
    "choice": {"prompt": "Yes or no?", "extra_body": {"structured_outputs": {"choice": ["yes", "no"]}}, **GREEDY},
    "error_too_long": {"prompt": "x", "max_tokens": 5000},
    "error_temperature": {"prompt": "x", "temperature": -1},
    "error_n_greedy": {"prompt": "x", "n": 2, "temperature": 0},
    "error_model": {"prompt": "x", "model": "no-such-model"},
}
CHATS = {
    "plain": {"messages": HI, **GREEDY},
    "stream": {"messages": HI, "stream": True, **GREEDY},
    "stream_usage": {"messages": HI, "stream": True, "stream_options": {"include_usage": True}, **GREEDY},
    "logprobs": {"messages": HI, "logprobs": True, "top_logprobs": 2, **GREEDY},
    "n2_seeded": {"messages": HI, "n": 2, "temperature": 1.0, "seed": 3, "max_tokens": 5},
    "max_completion_tokens": {"messages": HI, "max_completion_tokens": 3, "temperature": 0},
    "json_object": {"messages": HI, "response_format": {"type": "json_object"}, **GREEDY},
    "json_schema": {"messages": HI, "response_format": SCHEMA, "temperature": 0, "max_tokens": 12},
    "tools_auto": {"messages": HI, "tools": [TOOL], "tool_choice": "auto", **GREEDY},
    "tools_required": {"messages": HI, "tools": [TOOL], "tool_choice": "required", "temperature": 0,
                       "max_tokens": 20},
    "tools_named": {"messages": HI, "tools": [TOOL], "temperature": 0, "max_tokens": 20,
                    "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
    "tools_named_stream": {"messages": HI, "tools": [TOOL], "temperature": 0, "max_tokens": 20, "stream": True,
                           "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
    "tool_turns": {"tools": [TOOL], **GREEDY, "messages": [
        *HI, {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]},
    "seeded": {"messages": HI, "temperature": 0.8, "seed": 11, "max_tokens": 6},
    "penalties": {"messages": HI, "presence_penalty": -1.0, "frequency_penalty": 2.0, **GREEDY},
    "error_temperature": {"messages": HI, "temperature": 3},
    "error_empty_messages": {"messages": [], **GREEDY},
    "error_model": {"messages": HI, "model": "no-such-model"},
}
RESPONSES = {  # OpenAI's Responses API, as vLLM serves it (stateless: no stored responses)
    "plain": {"input": "Say hello", "temperature": 0, "max_output_tokens": 6},
    "stream": {"input": "Say hello", "stream": True, "temperature": 0, "max_output_tokens": 6},
    "messages": {"input": HI, "instructions": "Be brief", "temperature": 0, "max_output_tokens": 6},
    "error_temperature": {"input": "x", "temperature": 3},
    "error_model": {"input": "x", "model": "no-such-model"},
}


def _vllm_args(port: int, info) -> list[str]:
    from services.gpuagent.vllm_openai import serve_args  # the flags the stack's engines serve with

    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", info.path, "--served-model-name",
            MODEL, "--port", str(port), "--host", "127.0.0.1", "--dtype", info.dtype or "bfloat16",
            "--max-model-len", str(info.max_model_len),
            "--enforce-eager", "--kv-cache-memory-bytes", str(KV_BYTES), "--max-num-seqs", "64",
            "--disable-log-stats", *serve_args(info.tool_parser)]


@pytest.fixture(scope="module")
async def plain_vllm(demo_models, tmp_path_factory):
    """A plain vLLM OpenAI server on the demo checkpoint (the reference)."""
    port = infra.free_port()
    log = tmp_path_factory.mktemp("plain-vllm") / "server.log"
    env = {**os.environ, "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1"}
    with open(log, "wb") as out:
        server = subprocess.Popen(_vllm_args(port, demo_models[MODEL]), stdout=out, stderr=subprocess.STDOUT,
                                  env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        await _wait_healthy(url, server, log)
        yield url
    finally:
        server.terminate()
        server.wait(30)


async def _wait_healthy(url: str, server: subprocess.Popen, log) -> None:
    import asyncio

    async with httpx.AsyncClient(timeout=2) as client:
        for _ in range(SERVER_START_S * 2):
            if server.poll() is not None:
                pytest.fail(f"plain vLLM server exited: {log.read_text()[-3000:]}")
            try:
                if (await client.get(url + "/health")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.5)
    pytest.fail(f"plain vLLM server not healthy after {SERVER_START_S} s")


@pytest.fixture(scope="module")
async def stack(infra_servers, demo_models, tmp_path_factory):
    """The whole stack with one real vLLM device serving the demo model (warmed by a first request)."""
    async with running_stack(infra_servers, [demo_models[MODEL]], tmp_path_factory.mktemp("conformance"),
                             devices=1, device_memory_bytes=900 * MiB, kv_cache_bytes=KV_BYTES) as url:
        async with httpx.AsyncClient(timeout=300) as client:  # cold start once, outside the compared cases
            warm = await client.post(url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1})
            assert warm.status_code == 200, warm.text
        yield url


def _stable(value):
    """An answer without what differs between two servers' answers (ids, timestamps, fingerprints)."""
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def _merged_text_deltas(events: list[dict]) -> list[dict]:
    """A Responses stream with consecutive text deltas joined, without sequence numbers: how many
    tokens one delta carries depends on when the server's reader caught up (plain vLLM joins what
    piled up), not on the answer."""
    merged: list[dict] = []
    for event in ({k: v for k, v in e.items() if k != "sequence_number"} for e in events):
        last = merged[-1] if merged else {}
        if event["type"] == last.get("type") == "response.output_text.delta":
            last["delta"] += event["delta"]
        else:
            merged.append(event)
    return merged


async def _answer(base_url: str, api: str, shape: dict):
    client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
    create = {"chat": client.chat.completions, "completions": client.completions,
              "responses": client.responses}[api].create
    try:
        result = await create(**{"model": MODEL, **shape})
        if shape.get("stream"):
            events = [_stable(chunk.model_dump()) async for chunk in result]
            return _merged_text_deltas(events) if api == "responses" else events
        return _stable(result.model_dump())
    except openai.APIStatusError as exc:
        return ("error", exc.status_code)
    finally:
        await client.close()


SHAPES = {"completions": COMPLETIONS, "chat": CHATS, "responses": RESPONSES}


@pytest.mark.parametrize("api,name", [(api, name) for api, shapes in SHAPES.items() for name in shapes])
async def test_same_answer_as_plain_vllm(stack, plain_vllm, api, name):
    shape = SHAPES[api][name]
    ours, theirs = await _answer(stack, api, shape), await _answer(plain_vllm, api, shape)
    assert ours == theirs
    assert isinstance(ours, tuple) == name.startswith("error_"), ours  # ("error", status) or the answer


@pytest.mark.parametrize("path,body", [
    ("/tokenize", {"model": MODEL, "prompt": "hello world"}),
    ("/tokenize", {"model": MODEL, "messages": HI}),
    ("/detokenize", {"model": MODEL, "tokens": [5, 6, 7]}),
    ("/detokenize", {"model": MODEL}),
])
async def test_tokenize_and_detokenize_as_plain_vllm(stack, plain_vllm, path, body):
    async with httpx.AsyncClient(timeout=60) as client:
        ours, theirs = await client.post(stack + path, json=body), await client.post(plain_vllm + path, json=body)
    assert ours.status_code == theirs.status_code
    if ours.status_code == 200:
        assert ours.json() == theirs.json()
