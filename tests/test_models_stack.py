"""Bring-your-own checkpoints through the running stack (fake engines, services in-process): a
directory the project did not build is added, served, listed, retrieved (official `openai` client),
shown and removed with `warmserve models`, and through /admin/models behind its own key; a removal
is refused while requests are in flight unless forced, and the placer then drains and evicts it."""

from __future__ import annotations

import asyncio
import json
import shutil

import httpx
import openai
import pytest

from agent_helpers import eventually
from services.forecaster.service import ForecasterService
from services.gateway.app import create_app
from services.gateway.service import GatewayService
from services.gpuagent.service import AgentService
from services.placer.service import PlacerService
from shared.bus import Bus
from shared.registry import requests_of, residency
from shared.runner import Running
from shared.schemas import Event, LoadSample
from shared.state import State
from warmserve import cli

MiB = 1 << 20
ADMIN, USER = "admin-key", "user-key"


@pytest.fixture
async def stack(settings, demo_models):
    s = settings.with_overrides(engine="fake", fake_token_s=0.02, devices=2, device_memory_bytes=512 * MiB,
                                gateway_port=0, heartbeat_s=0.3, placer_tick_s=0.3, sample_interval_s=0.3,
                                warm_engines=False, api_keys=USER, admin_api_keys=ADMIN, demote_timeout_s=2.0)
    state = await State.connect(s)
    await state.register_model(demo_models["demo-small-a"])
    bus = await Bus.connect(s, "test-client")
    services = [await Running.start(cls(s), with_health=False)
                for cls in (AgentService, ForecasterService, PlacerService, GatewayService)]
    try:
        yield s, f"http://127.0.0.1:{services[-1].service.port}", state, bus, services[-1].service
    finally:
        for running in reversed(services):
            await running.shutdown()
        await bus.close()
        await state.close()


@pytest.fixture
def theirs(demo_models, tmp_path):
    """A checkpoint the project did not build: demo-small-a copied elsewhere, renamed, its config changed."""
    path = tmp_path / "elsewhere" / "their-llama"
    shutil.copytree(demo_models["demo-small-a"].path, path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 1024}))
    return path


def connection(s) -> list[str]:
    return ["--namespace", s.namespace, "--nats-url", s.nats_url, "--redis-url", s.redis_url,
            "--data-dir", s.data_dir, "--sample-interval-s", str(s.sample_interval_s)]


async def warmserve(*argv: str) -> int:
    return await asyncio.to_thread(cli.main, list(argv))


async def events(bus: Bus, name: str) -> list[Event]:
    seen: list[Event] = []

    async def heard(event: Event) -> None:
        seen.append(event)

    await bus.subscribe(bus.subjects.event("registry", name), Event, heard)
    return seen


async def quiet(bus: Bus, state: State, name: str) -> None:
    """Until a load sample says the gateway held nothing of `name` for an interval and no instance runs any."""
    samples: list[LoadSample] = []

    async def heard(sample: LoadSample) -> None:
        samples.append(sample)

    listening = await bus.subscribe(bus.subjects.load_samples(), LoadSample, heard)

    async def idle() -> bool:
        views = (await state.node_views()).values()
        return any(x.model == name and x.peak_outstanding == 0 for x in samples) and not requests_of(name, views, 0)

    await eventually(idle, 10, f"{name} idle")
    await bus.unsubscribe(listening)


async def gone(state: State, name: str) -> bool:
    return not residency(name, (await state.node_views()).values())


async def test_cli_adds_serves_shows_and_removes_a_checkpoint_it_did_not_build(stack, theirs, demo_models, capsys):
    s, url, state, bus, _ = stack
    registered, removed = await events(bus, "model_registered"), await events(bus, "model_removed")
    assert await warmserve("models", "add", "their-llama", str(theirs), "--max-model-len", "512",
                           "--tool-parser", "llama3_json", *connection(s)) == 0
    info = await state.model("their-llama")
    assert info.max_model_len == 512 and info.path == str(theirs.resolve()) and info.tool_parser == "llama3_json"
    assert info.arch != demo_models["demo-small-a"].arch  # another config: another engine
    assert info.content_hash == demo_models["demo-small-a"].content_hash
    await eventually(lambda: [e.model for e in registered] == ["their-llama"], 5, "model_registered")

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=USER)
    assert {m.id for m in (await client.models.list()).data} == {"demo-small-a", "their-llama"}
    card = await client.models.retrieve("their-llama")
    assert (card.id, card.object, card.owned_by) == ("their-llama", "model", "warmserve")
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("nobody")
    done = await client.completions.create(model="their-llama", prompt="hello", max_tokens=5)
    assert done.usage.completion_tokens == 5

    capsys.readouterr()
    assert await warmserve("models", "show", "their-llama", "--json", *connection(s)) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["model"]["max_model_len"] == 512
    assert {r["kind"] for r in shown["residency"]} == {"copy", "instance"}  # the copy its instance serves from

    await quiet(bus, state, "their-llama")  # a request in the gateway's last sample interval counts as held
    assert await warmserve("models", "remove", "their-llama", "--wait-s", "30", *connection(s)) == 0
    assert await state.model("their-llama") is None and await gone(state, "their-llama")
    assert [e.model for e in removed] == ["their-llama"]
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("their-llama")
    assert {m.id for m in (await client.models.list()).data} == {"demo-small-a"}
    assert await warmserve("models", "show", "their-llama", *connection(s)) == 1
    assert await warmserve("models", "add", "bad", str(theirs.parent), *connection(s)) == 2
    assert "no config.json" in capsys.readouterr().err


async def test_cli_remove_is_refused_while_requests_run_unless_forced(stack, capsys):
    s, url, state, bus, _ = stack
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=USER, max_retries=0)
    stream = await client.completions.create(model="demo-small-a", prompt="hi", max_tokens=400, stream=True)
    await anext(aiter(stream))  # 400 tokens at 20 ms: running for 8 s
    assert await warmserve("models", "remove", "demo-small-a", *connection(s)) == 1
    assert "refused" in capsys.readouterr().err and await state.model("demo-small-a") is not None
    assert await warmserve("models", "remove", "demo-small-a", "--force", "--wait-s", "30", *connection(s)) == 0
    assert await gone(state, "demo-small-a")
    await stream.close()


async def test_admin_routes_need_their_own_key(stack):
    s, url, state, bus, gateway = stack
    async with httpx.AsyncClient(base_url=url) as http:
        for headers in ({}, {"Authorization": f"Bearer {USER}"}, {"Authorization": "Bearer wrong"}):
            answer = await http.get("/admin/models", headers=headers)
            assert answer.status_code == 401 and answer.json()["error"]["code"] == "invalid_api_key"
        assert (await http.get("/admin/models", headers={"Authorization": f"Bearer {ADMIN}"})).status_code == 200
        assert (await http.get("/v1/models", headers={"Authorization": f"Bearer {ADMIN}"})).status_code == 401
    off = create_app(s.with_overrides(admin_api_keys=""), gateway.runtime, gateway.metrics, lambda: True)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=off), base_url="http://gw") as http:
        for method in ("GET", "POST", "DELETE"):
            path = "/admin/models" + ("/demo-small-a" if method == "DELETE" else "")
            answer = await http.request(method, path, headers={"Authorization": f"Bearer {ADMIN}"})
            assert answer.status_code == 403 and answer.json()["error"]["code"] == "admin_disabled"


async def test_admin_add_show_list_remove(stack, theirs):
    s, url, state, bus, _ = stack
    admin = {"Authorization": f"Bearer {ADMIN}"}
    async with httpx.AsyncClient(base_url=url, headers=admin, timeout=30) as http:
        bad = await http.post("/admin/models", json={"name": "x", "path": str(theirs.parent)})
        assert bad.status_code == 400 and "no config.json" in bad.json()["error"]["message"]
        assert (await http.post("/admin/models", json={"name": "x", "path": "/", "tpp": 2})).status_code == 400
        unknown = await http.post("/admin/models", json={"name": "x", "path": str(theirs), "tool_parser": "nope"})
        assert unknown.status_code == 400 and "--tool-parser nope" in unknown.json()["error"]["message"]
        added = await http.post("/admin/models", json={"name": "their-llama", "path": str(theirs), "dtype": "float32"})
        assert added.status_code == 201 and (added.json()["dtype"], added.json()["tool_parser"]) == ("float32", "hermes")
        again = await http.post("/admin/models", json={"name": "their-llama", "path": str(theirs), "dtype": "float32"})
        assert again.status_code == 200
        taken = await http.post("/admin/models", json={"name": "demo-small-a", "path": str(theirs), "tp": 1,
                                                       "max_model_len": 100})
        assert taken.status_code == 409 and taken.json()["error"]["code"] == "model_exists"
        listed = (await http.get("/admin/models")).json()["data"]
        assert [m["name"] for m in listed] == ["demo-small-a", "their-llama"]

        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=USER, max_retries=0)
        stream = await client.completions.create(model="their-llama", prompt="hi", max_tokens=400, stream=True)
        await anext(aiter(stream))

        async def inflight() -> bool:
            shown = (await http.get("/admin/models/their-llama")).json()
            return [r["inflight"] for r in shown["residency"] if r["kind"] == "instance"] == [1]

        await eventually(inflight, 5, "the next heartbeat shows the request in flight")
        assert (await http.get("/admin/models/nobody")).status_code == 404
        busy = await http.delete("/admin/models/their-llama")
        assert busy.status_code == 409 and busy.json()["error"]["code"] == "model_busy"
        forced = await http.delete("/admin/models/their-llama", params={"force": "true"})
        assert forced.status_code == 200 and forced.json()["deleted"] and forced.json()["requests"] >= 1
        await stream.close()
        assert (await http.delete("/admin/models/their-llama")).status_code == 404
    await eventually(lambda: gone(state, "their-llama"), 30, "the placer drains and evicts the removed model")


def test_requests_held_count_each_gateways_latest_sample_and_instances_inflight():
    from shared.registry import held_by_gateways
    from shared.schemas import InstanceState, InstanceView, NodeView

    def sample(source, at_s, peak, model="m"):
        return LoadSample(model=model, at_s=at_s, interval_s=1, avg_outstanding=0, peak_outstanding=peak, source=source)

    samples = [sample("g1", 1, 5), sample("g1", 2, 0), sample("g2", 2, 3), sample("g2", 1, 9), sample("g3", 2, 7, "x")]
    assert held_by_gateways("m", samples) == 3  # g1 drained since, g2 holds 3; another model's not counted
    view = NodeView(node="n", at_s=0, instances=[
        InstanceView(instance_id="a", model="m", devices=[0], state=InstanceState.ready, inflight=4),
        InstanceView(instance_id="b", model="x", devices=[1], state=InstanceState.ready, inflight=9)])
    assert requests_of("m", [view], 3) == 4 and requests_of("m", [view], 6) == 6 and requests_of("y", [view], 0) == 0
