"""GPU agent over real NATS and Redis with the fake timing engine: command semantics,
idempotency, refusals with reasons, observed state in Redis, restart reconciliation."""

from __future__ import annotations

import asyncio

import pytest

from services.gpuagent.service import AgentService
from shared.runner import Running
from shared.schemas import CommandKind, InstanceState
from shared import registry
from tests.agent_helpers import agent_events, command, eventually, fake_model, infer, running_agent

MiB = 1 << 20


@pytest.fixture
async def agent(settings):
    s = settings.with_overrides(engine="fake", devices=2, device_memory_bytes=64 * MiB, fake_token_s=0.001, warm_engines=False,
                                fake_load_bytes_s=1e9, heartbeat_s=0.2, kv_cache_bytes=2 * MiB)
    models = [fake_model(name, size) for name, size in (("m1", 8 * MiB), ("m2", 8 * MiB), ("huge", 100 * MiB))]
    async with running_agent(s, models) as (running, bus, state):
        yield running, bus, state, s


async def test_prewarm_promote_infer_demote_promote_again(agent):
    running, bus, state, s = agent
    assert (await command(bus, s.node, CommandKind.prewarm, "m1")).ok
    promoted = await command(bus, s.node, CommandKind.promote, "m1", instance_id="i1")
    assert promoted.ok, promoted.reason
    chunks = await infer(bus, "i1", max_tokens=3)
    assert "".join(c.text for c in chunks) == " t0 t1 t2" and chunks[-1].finish_reason == "length"
    assert chunks[-1].completion_tokens == 3
    assert (await command(bus, s.node, CommandKind.demote, instance_id="i1")).ok
    view = running.service.view()
    assert [c.model for c in view.copies] == ["m1"] and view.instances == []  # weights stay as a copy
    again = await command(bus, s.node, CommandKind.promote, "m1", instance_id="i2")
    assert again.ok and again.detail["path"] == "warm_engine"


async def test_evicting_a_copy_still_loading_waits_for_the_load_then_evicts(settings):
    s = settings.with_overrides(engine="fake", devices=1, device_memory_bytes=64 * MiB, warm_engines=False,
                                fake_load_bytes_s=16 * MiB, kv_cache_bytes=2 * MiB)  # 8 MiB: half a second
    async with running_agent(s, [fake_model("m1")]) as (running, bus, state):
        prewarm = asyncio.ensure_future(command(bus, s.node, CommandKind.prewarm, "m1"))
        await eventually(lambda: running.service.ledgers[0].copies, 5, "the load started")
        evicted = await command(bus, s.node, CommandKind.evict, "m1")
        assert evicted.ok, evicted.reason
        assert (await prewarm).ok and running.service.ledgers[0].copies == {}


async def test_instance_starts_say_what_they_found(agent):
    running, bus, state, s = agent
    assert (await command(bus, s.node, CommandKind.prewarm, "m1", reason="prewarm_burst")).ok
    assert [c.origin for c in running.service.view().copies] == ["forecast_prewarm"]
    promoted = await command(bus, s.node, CommandKind.promote, "m1", instance_id="i1", reason="prewarm_hit")
    assert promoted.detail["start"] == "forecast_prewarm"
    assert (await command(bus, s.node, CommandKind.demote, instance_id="i1")).ok
    assert [c.origin for c in running.service.view().copies] == ["kept_copy"]
    again = await command(bus, s.node, CommandKind.promote, "m1", instance_id="i2", reason="prewarm_hit")
    assert again.detail["start"] == "kept_copy"
    cold = await command(bus, s.node, CommandKind.cold_start, "m2", devices=(1,), instance_id="c1", reason="cold_start")
    assert cold.detail["start"] == "miss"
    by_hand = await command(bus, s.node, CommandKind.prewarm, "m2", devices=(0,))
    assert by_hand.ok and running.service.ledgers[0].copies["m2"].origin == "commanded"


async def test_repeated_command_id_executes_once(agent):
    running, bus, state, s = agent
    first, second = await asyncio.gather(
        command(bus, s.node, CommandKind.prewarm, "m1", command_id="same"),
        command(bus, s.node, CommandKind.prewarm, "m1", command_id="same"))
    assert first == second and first.ok


@pytest.mark.parametrize("kind,model,devices,reason", [
    (CommandKind.prewarm, "nope", (0,), "unknown model"),
    (CommandKind.prewarm, "huge", (0,), "not enough memory"),
    (CommandKind.prewarm, "m1", (7,), "bad device list"),
    (CommandKind.promote, "m1", (0,), "no prewarmed copy"),
    (CommandKind.cold_start, "m1", (0, 1), "tensor parallel"),
])
async def test_impossible_commands_are_refused_with_a_reason(agent, kind, model, devices, reason):
    running, bus, state, s = agent
    result = await command(bus, s.node, kind, model, devices=devices)
    assert not result.ok and reason in result.reason


async def test_bad_checksum_refused(agent, tmp_path):
    running, bus, state, s = agent
    from safetensors.torch import save_file
    import torch

    save_file({"w": torch.zeros(4)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text("{}")
    await state.register_model(fake_model("tampered").model_copy(update={"path": str(tmp_path)}))
    result = await command(bus, s.node, CommandKind.prewarm, "tampered")
    assert not result.ok and "sha256" in result.reason
    assert running.service.view().copies == []


async def test_cold_start_serves_and_errors_come_back(agent):
    running, bus, state, s = agent
    result = await command(bus, s.node, CommandKind.cold_start, "m2", devices=(1,), instance_id="c1")
    assert result.ok and result.detail["cold_start_ms"] > 0
    too_long = await infer(bus, "c1", prompt="x " * 300)
    assert too_long[-1].error and too_long[-1].error_code == 400
    gone = await infer(bus, "c1", max_tokens=200, cancel_after=2)
    assert gone[-1].finish_reason == "cancelled"


async def test_observed_state_in_redis_and_restart_shows_nothing_stale(agent, settings):
    running, bus, state, s = agent
    await command(bus, s.node, CommandKind.prewarm, "m1")
    await command(bus, s.node, CommandKind.cold_start, "m2", devices=(1,), instance_id="c1")
    view = (await state.node_views())[s.node]
    assert {c.model for c in view.copies} == {"m1", "m2"}
    assert [(i.instance_id, i.state) for i in view.instances] == [("c1", InstanceState.ready)]
    # kill without shutdown: the stale view stays until the heartbeat key expires
    running.stopping.set()
    running.service._ready = False
    await bus.nc.flush()
    restarted = await Running.start(AgentService(s), with_health=False)
    fresh = (await state.node_views())[s.node]
    assert fresh.copies == [] and fresh.instances == [] and fresh.boot_id != view.boot_id
    await restarted.shutdown()
    assert await state.node_views() == {}


async def test_idle_warm_engine_is_counted_and_dropped_when_room_is_needed(agent):
    running, bus, state, s = agent
    await state.register_model(fake_model("other-arch", 55 * MiB, arch="a2"))
    assert (await command(bus, s.node, CommandKind.cold_start, "m1", instance_id="i1")).ok
    assert (await command(bus, s.node, CommandKind.demote, instance_id="i1")).ok
    device = running.service.view().devices[0]
    engine_bytes = 2 * MiB  # its KV cache (one page-rounded context): it computes with the pool copy's tensors
    assert device.idle_engine_bytes == engine_bytes
    assert device.free_bytes == 64 * MiB - 8 * MiB  # the idle engine counts as free for planning
    # 55 MiB copy + 8 MiB copy of m1 + 2 MiB engine > 64 MiB: the idle engine goes, the copy stays
    assert (await command(bus, s.node, CommandKind.prewarm, "other-arch")).ok
    device = running.service.view().devices[0]
    assert device.idle_engine_bytes == 0 and {c.model for c in running.service.view().copies} == {"m1", "other-arch"}
    again = await command(bus, s.node, CommandKind.promote, "m1", instance_id="i2")
    assert again.ok and again.detail["path"] == "new_engine"


async def test_device_prewarming_warms_one_engine_per_architecture_where_it_fits(settings):
    s = settings.with_overrides(engine="fake", devices=2, device_memory_bytes=100 * MiB, kv_cache_bytes=40 * MiB,
                                warm_engines=True)  # an engine holds its KV cache only: 40 MiB each
    models = [fake_model("x1", 8 * MiB, arch="small"), fake_model("x2", 8 * MiB, arch="small"),
              fake_model("big", 40 * MiB, arch="large"), fake_model("giant", 70 * MiB, arch="giant")]
    async with running_agent(s, models) as (running, bus, state):
        await asyncio.wait_for(running.service._warming, 10)
        for ledger in running.service.ledgers:  # a third engine does not fit beside the other two
            assert {a: e.bytes for a, e in ledger.engines.items()} == {"small": 40 * MiB, "large": 40 * MiB}
        promoted = await command(bus, s.node, CommandKind.cold_start, "x2", instance_id="i")
        assert promoted.ok and promoted.detail["path"] == "warm_engine"  # no engine init on the request path
        copy = await command(bus, s.node, CommandKind.prewarm, "giant", devices=(1,))
        assert copy.ok, copy.reason  # idle engines are a cache: dropped to make room for the copy
        assert running.service.ledgers[1].engines == {}


async def test_engines_follow_registrations_and_removals_while_running(settings):
    s = settings.with_overrides(engine="fake", devices=2, device_memory_bytes=100 * MiB, kv_cache_bytes=40 * MiB,
                                fake_token_s=0.001, fake_load_bytes_s=1e9, warm_engines=True)
    async with running_agent(s, [fake_model("x1", 8 * MiB, arch="small")]) as (running, bus, state):
        agent = running.service
        await asyncio.wait_for(agent._warming, 10)
        engines = lambda: [set(ledger.engines) for ledger in agent.ledgers]  # noqa: E731
        assert engines() == [{"small"}, {"small"}]
        assert (await command(bus, s.node, CommandKind.cold_start, "x1", devices=(1,), instance_id="i")).ok
        async with agent_events(bus, "engine_warmed") as warmed:
            await registry.register(state, bus, fake_model("q1", 8 * MiB, arch="qwen"))
            assert {(await asyncio.wait_for(warmed.get(), 10)).devices[0] for _ in range(2)} == {0, 1}
        assert engines() == [{"small", "qwen"}, {"small", "qwen"}]
        # the rules of the start: no room for a third 40 MiB engine (100 MiB, and device 1 holds x1's copy)
        await registry.register(state, bus, fake_model("g1", 8 * MiB, arch="giant"))
        await eventually(lambda: "giant" in agent._archs and agent._warming.done(), 10, "registration seen")
        assert engines() == [{"small", "qwen"}, {"small", "qwen"}]

        async with agent_events(bus, "engine_dropped") as dropped:
            await registry.register(state, bus, fake_model("x2", 8 * MiB, arch="small"))
            await registry.remove(state, bus, "x1", requests=0)  # x2 still needs the small engines
            await registry.remove(state, bus, "q1", requests=0)  # idle everywhere: dropped everywhere
            gone = [await asyncio.wait_for(dropped.get(), 10) for _ in range(2)]
            assert {(e.devices[0], e.reason, e.detail["arch"]) for e in gone} == {(0, "unregistered", "qwen"),
                                                                                   (1, "unregistered", "qwen")}
            assert engines() == [{"small"}, {"small"}]
            await registry.remove(state, bus, "x2", requests=0)  # device 1's engine serves: it stays
            assert (await asyncio.wait_for(dropped.get(), 10)).devices == [0]
            assert engines() == [set(), {"small"}]
            assert (await command(bus, s.node, CommandKind.demote, instance_id="i")).ok
            assert (await asyncio.wait_for(dropped.get(), 10)).devices == [1]  # idle now: dropped
        assert engines() == [set(), set()]
        async with agent_events(bus, "engine_warmed") as warmed:  # an architecture back is new again
            await registry.register(state, bus, fake_model("x1", 8 * MiB, arch="small"))
            assert {(await asyncio.wait_for(warmed.get(), 10)).devices[0] for _ in range(2)} == {0, 1}
        assert engines() == [{"small"}, {"small"}]


async def test_a_promotion_during_a_prewarm_that_first_drops_an_engine_waits_for_the_copy(agent, monkeypatch):
    """The copy is loading from the moment the ledger books it: a promotion arriving while the
    prewarm still frees room (dropping an idle engine, slow on a busy vLLM worker) waits for the
    load instead of starting an engine on weights that are not there (live: instance_failed, and
    the engine dropped with it)."""
    running, bus, state, s = agent
    assert (await command(bus, s.node, CommandKind.cold_start, "m1", instance_id="i1")).ok
    assert (await command(bus, s.node, CommandKind.demote, instance_id="i1")).ok
    assert (await command(bus, s.node, CommandKind.evict, "m1")).ok
    assert (await command(bus, s.node, CommandKind.prewarm, "m2")).ok  # device 0: m2 (8 MiB), an idle engine (2)
    await state.register_model(fake_model("big", 55 * MiB))  # its copy fits once the idle engine is dropped
    service = running.service
    drop = service._drop_engine

    async def slow_drop(ledger, arch, reason):
        await asyncio.sleep(0.5)
        await drop(ledger, arch, reason)

    monkeypatch.setattr(service, "_drop_engine", slow_drop)
    prewarm = asyncio.ensure_future(command(bus, s.node, CommandKind.prewarm, "big"))
    await asyncio.sleep(0.2)  # the prewarm is dropping the engine
    promoted = await command(bus, s.node, CommandKind.promote, "big", instance_id="b1")
    assert promoted.ok, promoted.reason
    assert promoted.detail["start"] == "loading" and (await prewarm).ok


async def test_the_view_last_written_is_the_newest_when_writes_overlap(settings):
    """A heartbeat's view write still under way when a command changes the node must not land last:
    here the first write takes 0.5 s and the cold start's own write would land before it."""
    s = settings.with_overrides(engine="fake", devices=1, device_memory_bytes=64 * MiB, warm_engines=False,
                                kv_cache_bytes=2 * MiB, heartbeat_s=60.0)
    async with running_agent(s, [fake_model("m1")]) as (running, bus, state):
        agent = running.service
        write, writes = agent.state.put_node_view, []

        async def first_write_slow(view, ttl_s):
            writes.append(view)
            if len(writes) == 1:
                await asyncio.sleep(0.5)
            await write(view, ttl_s)

        agent.state.put_node_view = first_write_slow
        heartbeat = asyncio.create_task(agent._publish_view())  # builds its view before the instance exists
        await asyncio.sleep(0.05)
        assert (await command(bus, s.node, CommandKind.cold_start, "m1", instance_id="i1")).ok
        await heartbeat
        assert [i.instance_id for i in (await state.node_views())[s.node].instances] == ["i1"]
