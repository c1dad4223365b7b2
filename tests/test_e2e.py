"""End to end on the real parts: all four services over real NATS and Redis, a real vLLM
engine (CPU build) on a demo model. A request for a cold model goes gateway -> placer ->
gpuagent (prewarm/cold start) -> tokens streamed back over NATS -> SSE to the client."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.agent_helpers import running_stack

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
MiB = 1 << 20


@pytest.fixture(scope="module")
async def stack(infra_servers, demo_models, tmp_path_factory):
    """One stack for the module: starting vLLM workers is the slow part."""
    async with running_stack(infra_servers, demo_models.values(), tmp_path_factory.mktemp("e2e"), devices=2,
                             device_memory_bytes=900 * MiB, kv_cache_bytes=32 * MiB) as url:
        async with httpx.AsyncClient(base_url=url, timeout=300) as client:
            yield client


async def test_streaming_chat_through_the_whole_stack(stack):
    body = {"model": "demo-small-a", "stream": True, "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": "Hello"}]}
    events = []
    async with stack.stream("POST", "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200, await resp.aread()
        assert resp.headers["content-type"].startswith("text/event-stream")
        async for line in resp.aiter_lines():
            if line.startswith("data: "):
                events.append(line[len("data: "):])
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text and chunks[0]["model"] == "demo-small-a"

    # the instance is warm now: a plain completion goes straight to it
    resp = await stack.post("/v1/completions", json={"model": "demo-small-a", "prompt": "def f(", "max_tokens": 4})
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] <= 4
    assert float(resp.headers["x-warmserve-ttft-ms"]) >= 0

    models = (await stack.get("/v1/models")).json()["data"]
    assert {m["id"] for m in models} >= {"demo-small-a", "demo-small-b", "demo-large"}


async def test_bad_input_gets_clear_answers(stack):
    unknown = await stack.post("/v1/completions", json={"model": "nope", "prompt": "x"})
    assert unknown.status_code == 404 and unknown.json()["error"]["message"]
    malformed = await stack.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert malformed.status_code == 400
    wrong_type = await stack.post("/v1/completions", json={"model": "demo-small-a", "prompt": "x", "max_tokens": "many"})
    assert wrong_type.status_code == 400 and "max_tokens" in wrong_type.text
    too_long = await stack.post("/v1/completions", json={"model": "demo-small-a", "prompt": "word " * 3000,
                                                           "max_tokens": 4})
    assert too_long.status_code == 400, too_long.text


async def test_official_openai_client_against_real_vllm(stack):
    import openai

    client = openai.AsyncOpenAI(base_url=str(stack.base_url).rstrip("/") + "/v1", api_key="unused")
    stream = await client.chat.completions.create(
        model="demo-small-b", messages=[{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True})
    parts, usage = [], None
    async for chunk in stream:
        parts += [c.delta.content or "" for c in chunk.choices]
        usage = chunk.usage or usage
    assert "".join(parts) and usage.completion_tokens <= 6
    plain = await client.completions.create(model="demo-small-b", prompt="def main(", max_tokens=12, temperature=0)
    text = plain.choices[0].text
    assert len(text) > 1
    stop = text[len(text) // 2:][:2]  # a stop sequence taken from the greedy output itself
    stopped = await client.completions.create(model="demo-small-b", prompt="def main(", max_tokens=12, temperature=0,
                                              stop=[stop])
    assert stopped.choices[0].finish_reason == "stop" and stop not in stopped.choices[0].text
    await client.close()
