"""Gateway contract tests: the official `openai` client against the gateway running in-process over
real NATS and Redis, with a simulated engine node and placer (bench.gateway_sim) on the other side."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import httpx
import openai
import pytest

from bench.gateway_sim import SimNode, SimPlacer, register
from services.gateway import runtime as gateway_runtime
from services.gateway.service import GatewayService
from shared.bus import Bus
from shared.runner import Running
from shared.schemas import InstanceState, InstanceView, LoadSample, NodeView
from shared.state import State


@dataclass
class Cluster:
    gateway: GatewayService
    node: SimNode
    placer: SimPlacer
    bus: Bus
    state: State
    url: str

    def openai(self, api_key: str = "none") -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=20)

    def http(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=20)

    @property
    def scheduler(self):
        return self.gateway.runtime.scheduler


@pytest.fixture
async def make_cluster(settings):
    started: list[tuple[Running, Bus, State]] = []

    async def make(token_s: float = 0.0, placer_start_s: float | None = None, **overrides) -> Cluster:
        s = settings.with_overrides(gateway_port=0, sample_interval_s=0.2, **overrides)
        bus, state = await Bus.connect(s, "sim"), await State.connect(s)
        node = SimNode(bus, state, token_s=token_s)
        placer = SimPlacer(bus, node, placer_start_s)
        await placer.start()
        for model in ("warm", "cold", "other"):
            await register(state, model, max_model_len=64)
        await node.add_instance("warm", "warm-i0", max_model_len=64)
        running = await Running.start(GatewayService(s), with_health=False)
        started.append((running, bus, state))
        gateway = running.service
        return Cluster(gateway, node, placer, bus, state, f"http://127.0.0.1:{gateway.port}")

    yield make
    for running, bus, state in started:
        await running.shutdown()
        await bus.close()
        await state.close()


async def eventually(condition, timeout_s: float = 5.0) -> None:
    """Wait for a condition on state we do not own (polling, bounded)."""
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.01)


# ---------------------------------------------------------------- the official client


async def test_completion_passes_sampling_and_reports_usage(make_cluster):
    c = await make_cluster()
    out = await c.openai().completions.create(model="warm", prompt="hello there", max_tokens=4, temperature=0.3,
                                              top_p=0.9, seed=7)
    assert out.choices[0].text == " w0 w1 w2 w3" and out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (2, 4, 6)
    sent = c.node.instances["warm-i0"].received[-1].sampling
    assert (sent.max_tokens, sent.temperature, sent.top_p, sent.seed) == (4, 0.3, 0.9, 7)


async def test_completion_stream_with_usage(make_cluster):
    c = await make_cluster()
    stream = await c.openai().completions.create(model="warm", prompt="x", max_tokens=3, stream=True,
                                                 stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == " w0 w1 w2"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3


async def test_chat_stop_sequence_plain_and_streaming(make_cluster):
    c = await make_cluster()
    client = c.openai()
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "say words"}]
    out = await client.chat.completions.create(model="warm", messages=messages, stop=[" w2"], max_tokens=10)
    assert out.choices[0].message.content == " w0 w1" and out.choices[0].finish_reason == "stop"
    assert out.choices[0].message.role == "assistant"
    assert c.node.instances["warm-i0"].received[-1].messages == messages
    stream = await client.chat.completions.create(model="warm", messages=messages, max_tokens=2, stream=True)
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == " w0 w1"
    assert chunks[-1].choices[0].finish_reason == "length"


async def test_timing_headers_on_plain_and_streaming_answers(make_cluster):
    c = await make_cluster()
    async with c.http() as http:
        plain = await http.post("/v1/completions", json={"model": "warm", "prompt": "a", "max_tokens": 1})
        async with http.stream("POST", "/v1/completions",
                               json={"model": "warm", "prompt": "a", "max_tokens": 2, "stream": True}) as streamed:
            lines = [line async for line in streamed.aiter_lines() if line]
    for response in (plain, streamed):
        assert float(response.headers["x-warmserve-ttft-ms"]) > 0
        assert float(response.headers["x-warmserve-queue-ms"]) >= 0
        assert response.headers["x-request-id"].startswith("cmpl-")
    assert lines[-1] == "data: [DONE]" and streamed.headers["content-type"].startswith("text/event-stream")


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("body,status,param", [
    (b"{not json", 400, None),
    (b'["a list"]', 400, None),
    ({"prompt": "x"}, 400, "model"),
    ({"model": "warm"}, 400, "prompt"),
    ({"model": "warm", "prompt": "x", "temperature": 5}, 400, "temperature"),
    ({"model": "warm", "prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"model": "warm", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "warm", "prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ({"model": "warm", "prompt": "x", "max_tokens": 65}, 400, "max_tokens"),  # beyond the context (64)
    ({"model": "warm", "prompt": "x", "stop": ["a", ""]}, 400, "stop"),
    ({"model": "warm", "prompt": "x", "n": 0}, 400, "n"),
    ({"model": "warm", "prompt": "x", "stream": "yes"}, 400, "stream"),
    ({"model": "warm", "prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"model": "nope", "prompt": "x"}, 404, "model"),
    ({"model": "warm", "prompt": "word " * 65}, 400, None),  # the engine refuses a prompt beyond the context
])
async def test_completion_errors_in_openai_format(make_cluster, body, status, param):
    c = await make_cluster()
    async with c.http() as http:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = await http.post("/v1/completions", content=content, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]


@pytest.mark.parametrize("messages,param", [
    (None, "messages"), ([], "messages"), (["hi"], "messages[0]"),
    ([{"role": "robot", "content": "x"}], "messages[0].role"),
    ([{"role": "user", "content": 3}], "messages[0].content"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "messages[0].content"),
])
async def test_chat_errors_name_the_message_field(make_cluster, messages, param):
    c = await make_cluster()
    async with c.http() as http:
        response = await http.post("/v1/chat/completions", json={"model": "warm", "messages": messages})
    assert response.status_code == 400 and response.json()["error"]["param"] == param


async def test_oversized_body_unknown_route_and_api_keys(make_cluster):
    c = await make_cluster(max_body_bytes=1000, api_keys="k1,k2")
    async with c.http() as http:
        big = await http.post("/v1/completions", json={"model": "warm", "prompt": "x" * 2000},
                              headers={"authorization": "Bearer k1"})
        assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
        missing = await http.get("/v1/nothing-here")
        assert missing.status_code == 404 and "error" in missing.json()
    with pytest.raises(openai.AuthenticationError):
        await c.openai(api_key="wrong").completions.create(model="warm", prompt="x", max_tokens=1)
    out = await c.openai(api_key="k2").completions.create(model="warm", prompt="x", max_tokens=1)
    assert out.choices[0].text == " w0"


# ---------------------------------------------------------------- holding and routing


async def test_cold_burst_asks_placer_once_and_releases_in_order_within_b(make_cluster):
    c = await make_cluster(max_inflight_per_instance=4, token_s=0.001)
    async with c.http() as http:
        tasks = [asyncio.create_task(http.post("/v1/completions", json={"model": "cold", "prompt": f"p{i}",
                                                                          "max_tokens": 3}))
                 for i in range(30)]
        await eventually(lambda: c.scheduler.queued("cold") == 30 and c.placer.needs)
        assert len(c.placer.needs) == 1 and c.placer.needs[0].model == "cold"
        instance = await c.placer.start_instance("cold")
        responses = await asyncio.gather(*tasks)
    assert [r.status_code for r in responses] == [200] * 30
    assert len(c.placer.needs) == 1
    ids = [r.request_id for r in instance.received]
    assert ids == sorted(ids) and len(ids) == 30  # released in arrival order
    assert instance.peak_active <= 4
    assert all(float(r.headers["x-warmserve-instance-start-ms"]) > 0 for r in responses)


async def test_other_models_are_served_while_one_is_cold(make_cluster):
    c = await make_cluster()
    async with c.http() as http:
        held = asyncio.create_task(http.post("/v1/completions", json={"model": "cold", "prompt": "x"}))
        await eventually(lambda: c.scheduler.queued("cold") == 1)
        warm = await c.openai().completions.create(model="warm", prompt="x", max_tokens=2)
        assert warm.choices[0].text == " w0 w1" and not held.done()
        await c.placer.start_instance("cold")
        assert (await held).status_code == 200


async def test_full_queue_is_429_and_passed_deadline_is_503(make_cluster):
    c = await make_cluster(queue_limit=2, queue_deadline_s=1.5)
    async with c.http() as http:
        body = {"model": "cold", "prompt": "x"}
        held = [asyncio.create_task(http.post("/v1/completions", json=body)) for _ in range(2)]
        await eventually(lambda: c.scheduler.queued("cold") == 2)
        full = await http.post("/v1/completions", json=body)
        assert full.status_code == 429 and full.headers["retry-after"] == "1"
        late = await asyncio.gather(*held)
    assert [r.status_code for r in late] == [503, 503]
    assert all(int(r.headers["retry-after"]) > 0 and r.json()["error"]["code"] == "model_busy" for r in late)
    assert c.scheduler.outstanding("cold") == 0


async def test_client_leaving_the_queue_frees_its_place(make_cluster):
    c = await make_cluster()
    async with c.http() as http:
        held = asyncio.create_task(http.post("/v1/completions", json={"model": "cold", "prompt": "x"}))
        await eventually(lambda: c.scheduler.queued("cold") == 1)
        held.cancel()
    await eventually(lambda: c.scheduler.queued("cold") == 0 and c.scheduler.outstanding("cold") == 0)
    instance = await c.placer.start_instance("cold")
    assert instance.received == []


async def test_client_leaving_a_stream_cancels_the_engine_request(make_cluster):
    c = await make_cluster(token_s=0.02)
    async with c.http() as http:
        async with http.stream("POST", "/v1/completions",
                               json={"model": "warm", "prompt": "x", "max_tokens": 60, "stream": True}) as response:
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    break
    instance = c.node.instances["warm-i0"]
    await eventually(lambda: instance.cancelled == [instance.received[0].request_id])
    await eventually(lambda: c.scheduler.instance_load("warm-i0") == 0)


async def test_lost_instance_fails_a_stream_that_has_output_with_a_clear_error(make_cluster):
    c = await make_cluster(token_s=0.05)
    async with c.http() as http:
        async with http.stream("POST", "/v1/completions", json={"model": "warm", "prompt": "x", "max_tokens": 60,
                                                               "stream": True}) as response:
            lines = (line async for line in response.aiter_lines() if line.startswith("data:"))
            first = await anext(lines)
            await c.node.remove_instance("warm-i0")
            rest = [line async for line in lines]
    assert json.loads(first.removeprefix("data: "))["choices"][0]["text"] == " w0"
    assert "gone" in json.loads(rest[-2].removeprefix("data: "))["error"]["message"] and rest[-1] == "data: [DONE]"


async def test_lost_instance_sends_a_request_without_output_elsewhere(make_cluster):
    c = await make_cluster(token_s=0.5, placer_start_s=None)
    async with c.http() as http:
        request = asyncio.create_task(http.post("/v1/completions", json={"model": "warm", "prompt": "x",
                                                                         "max_tokens": 2}))
        await eventually(lambda: c.scheduler.instance_load("warm-i0") == 1)
        old = c.node.instances["warm-i0"]
        await c.node.remove_instance("warm-i0")  # it goes on generating: its chunks must be ignored
        await eventually(lambda: c.scheduler.queued("warm") == 1)
        new = await c.node.add_instance("warm", "warm-i1")
        response = await asyncio.wait_for(request, 5)
    assert response.status_code == 200 and response.json()["choices"][0]["text"] == " w0 w1"
    assert [r.request_id for r in new.received] == [r.request_id for r in old.received] == [response.json()["id"]]


async def test_a_send_its_instance_never_acknowledged_is_sent_again(make_cluster):
    c = await make_cluster(dispatch_ack_timeout_s=0.3)
    instance = c.node.instances["warm-i0"]
    instance.lose_next = 1
    out = await c.openai().completions.create(model="warm", prompt="x", max_tokens=2)
    assert out.choices[0].text == " w0 w1"
    assert [r.attempt for r in instance.received] == [1] and instance.received[0].request_id == out.id


async def test_after_a_nats_reconnect_requests_without_output_go_again_and_silent_streams_end(make_cluster,
                                                                                            monkeypatch):
    monkeypatch.setattr(gateway_runtime, "RECONNECT_GRACE_S", 0.5)
    c = await make_cluster(token_s=0.05)
    instance = c.node.instances["warm-i0"]
    async with c.http() as http:
        async with http.stream("POST", "/v1/completions", json={"model": "warm", "prompt": "x", "max_tokens": 60,
                                                               "stream": True}) as response:
            lines = (line async for line in response.aiter_lines() if line.startswith("data:"))
            await anext(lines)  # answering
            instance.muted.add(instance.received[0].request_id)  # its chunks are lost from now on
            instance.lose_next = 1  # and so is the next request
            waiting = asyncio.create_task(http.post("/v1/completions", json={"model": "warm", "prompt": "y",
                                                                             "max_tokens": 1}))
            await eventually(lambda: c.scheduler.instance_load("warm-i0") == 2)
            c.gateway.runtime._after_reconnect()
            rest = [line async for line in lines]
        resent = await asyncio.wait_for(waiting, 2)  # at once, not after dispatch_ack_timeout_s
    assert "after a NATS reconnect" in rest[-2] and rest[-1] == "data: [DONE]"
    assert resent.status_code == 200 and [r.attempt for r in instance.received[1:]] == [1]


async def test_a_stopping_gateway_still_serves_what_it_holds_as_slots_free_up(make_cluster):
    c = await make_cluster(token_s=0.05, max_inflight_per_instance=1, drain_timeout_s=5.0)
    async with c.http() as http:
        first = asyncio.create_task(http.post("/v1/completions", json={"model": "warm", "prompt": "x",
                                                                       "max_tokens": 4}))
        await eventually(lambda: c.scheduler.instance_load("warm-i0") == 1)
        held = asyncio.create_task(http.post("/v1/completions", json={"model": "warm", "prompt": "y",
                                                                      "max_tokens": 2}))
        await eventually(lambda: c.scheduler.queued("warm") == 1)
        await c.gateway.stop()
        assert c.gateway.runtime.closing
    assert [(await first).status_code, (await held).status_code] == [200, 200]


async def test_requests_still_open_when_the_drain_runs_out_get_clean_errors(make_cluster):
    c = await make_cluster(token_s=0.05, max_inflight_per_instance=1, drain_timeout_s=2.0)
    async with c.http() as http:
        async with http.stream("POST", "/v1/completions", json={"model": "warm", "prompt": "x", "max_tokens": 60,
                                                               "stream": True}) as response:
            lines = (line async for line in response.aiter_lines() if line.startswith("data:"))
            await anext(lines)
            held = asyncio.create_task(http.post("/v1/completions", json={"model": "warm", "prompt": "y"}))
            await eventually(lambda: c.scheduler.queued("warm") == 1)
            stopping = asyncio.create_task(c.gateway.stop())
            rest = [line async for line in lines]
        refused = await held
        await stopping
    assert "shutting down" in json.loads(rest[-2].removeprefix("data: "))["error"]["message"]
    assert rest[-1] == "data: [DONE]"
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert "shutting down" in refused.json()["error"]["message"]


# ---------------------------------------------------------------- models, metrics, load samples


async def test_models_list_shows_warm_state(make_cluster):
    c = await make_cluster()
    models = {m.id: m for m in (await c.openai().models.list()).data}
    assert set(models) == {"warm", "cold", "other"}
    assert models["warm"].warm["state"] == "serving" and models["warm"].warm["instances_ready"] == 1
    assert models["cold"].warm["state"] == "cold" and models["cold"].max_model_len == 64


async def test_metrics_have_per_model_ttft_parts(make_cluster):
    c = await make_cluster()
    await c.openai().completions.create(model="warm", prompt="x", max_tokens=1)
    async with c.http() as http:
        await http.post("/v1/completions", json={"model": "nope", "prompt": "x"})
        text = (await http.get("/metrics")).text
    for name in ("ttft", "queue_wait", "instance_start_wait", "engine_ttft", "overhead"):
        assert f'warmserve_gateway_{name}_seconds_count{{model="warm"}} 1.0' in text
    assert 'warmserve_gateway_requests_total{endpoint="completions",model="warm",status="200"} 1.0' in text
    assert 'warmserve_gateway_requests_total{endpoint="completions",model="_unknown",status="404"} 1.0' in text


async def test_load_samples_count_outstanding_requests(make_cluster):
    c = await make_cluster()
    samples: list[LoadSample] = []

    async def collect() -> None:
        async for sample in c.bus.stream(c.bus.subjects.load_samples(), LoadSample):
            samples.append(sample)

    collector = asyncio.create_task(collect())
    async with c.http() as http:
        held = [asyncio.create_task(http.post("/v1/completions", json={"model": "cold", "prompt": "x"}))
                for _ in range(3)]
        await eventually(lambda: any(s.model == "cold" and s.peak_outstanding == 3 for s in samples))
        await c.placer.start_instance("cold")
        await asyncio.gather(*held)
    collector.cancel()
    cold = [s for s in samples if s.model == "cold"]
    assert sum(s.arrivals for s in cold) == 3 and all(0 <= s.avg_outstanding <= 3 for s in cold)
    assert all(s.interval_s > 0 for s in cold)


async def test_health_endpoints(make_cluster):
    c = await make_cluster()
    async with c.http() as http:
        assert (await http.get("/livez")).text == "ok"
        assert (await http.get("/readyz")).status_code == 200
        assert (await http.get("/health")).status_code == 200  # vLLM's name, for its clients


async def test_shutdown_finishes_streams_in_flight_and_refuses_held_requests(make_cluster):
    c = await make_cluster(token_s=0.02)
    async with c.http() as http:
        held = asyncio.create_task(http.post("/v1/completions", json={"model": "cold", "prompt": "x"}))
        async with http.stream("POST", "/v1/completions",
                               json={"model": "warm", "prompt": "x", "max_tokens": 20, "stream": True}) as response:
            lines = []
            async for line in response.aiter_lines():
                if line.startswith("data:") and not lines:
                    await eventually(lambda: c.scheduler.queued("cold") == 1)
                    stopping = asyncio.create_task(c.gateway.stop())
                lines.append(line)
        await stopping
        assert (await held).status_code == 503
    texts = [json.loads(line[5:])["choices"][0]["text"] for line in lines if line.startswith("data: {")]
    assert "".join(texts) == "".join(f" w{i}" for i in range(20)) and lines[-2:] == ["data: [DONE]", ""]


async def test_silent_instance_times_out_with_an_error(make_cluster):
    c = await make_cluster(infer_idle_timeout_s=0.3)
    ghost = NodeView(node="ghost", at_s=time.time(), instances=[
        InstanceView(instance_id="ghost-i0", model="other", devices=[0], state=InstanceState.ready)])
    await c.state.put_node_view(ghost, 60)
    await c.bus.publish(c.bus.subjects.agent_heartbeat(), ghost)
    await eventually(lambda: c.scheduler.ready_instances("other") == ["ghost-i0"])
    async with c.http() as http:
        response = await asyncio.wait_for(http.post("/v1/completions", json={"model": "other", "prompt": "x"}), 3)
    assert response.status_code == 504 and "ghost-i0" in response.json()["error"]["message"]
    assert c.scheduler.instance_load("ghost-i0") == 0
