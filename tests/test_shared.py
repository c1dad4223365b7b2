"""The shared package: codec round-trips and golden bytes, settings validation, the bus over
a real nats-server (typed request/reply, malformed messages rejected while serving goes on)."""

from __future__ import annotations

import asyncio

import msgpack
import pytest

from shared.bus import Bus, BusError
from shared.codec import DecodeError, decode, encode
from shared.keys import Keys
from shared.schemas import AgentCommand, CommandKind, CommandResult, Event, LoadSample, ModelInfo, NodeView
from shared.settings import SettingsError, load_settings
from shared.state import State
from shared.subjects import Subjects


def test_round_trip_every_field():
    cmd = AgentCommand(command_id="c1", kind=CommandKind.promote, model="m", devices=[0, 1],
                       instance_id="i1", reason="scale_up", kv_bytes=1 << 20)
    assert decode(AgentCommand, encode(cmd)) == cmd


def test_golden_bytes_are_map_encoded_and_stable():
    sample = LoadSample(model="m", at_s=1.5, interval_s=1.0, avg_outstanding=2.0, peak_outstanding=3.0)
    assert encode(sample) == bytes.fromhex(
        "87a56d6f64656ca16da461745f73cb3ff8000000000000aa696e74657276616c5f73cb3ff0000000000000"
        "af6176675f6f75747374616e64696e67cb4000000000000000b0706561"
        "6b5f6f75747374616e64696e67cb4008000000000000a8617272697661"
        "6c7300a6736f75726365a0")


def test_unknown_fields_ignored_and_missing_defaults_filled():
    raw = msgpack.packb({"name": "m", "path": "/p", "size_bytes": 1, "content_hash": "h", "future": 1})
    info = decode(ModelInfo, raw)
    assert info.tp == 1 and info.name == "m"


@pytest.mark.parametrize("payload,needle", [
    (b"\xc1", "not msgpack"),
    (msgpack.packb([1, 2]), "expected a map"),
    (msgpack.packb({"model": "m"}), "at_s"),
    (msgpack.packb({"model": "m", "at_s": 1, "interval_s": -1, "avg_outstanding": 0,
                    "peak_outstanding": 0}), "interval_s"),
])
def test_decode_errors_name_the_problem(payload, needle):
    with pytest.raises(DecodeError, match=needle):
        decode(LoadSample, payload)


def test_settings_list_every_error_at_once():
    with pytest.raises(SettingsError) as info:
        load_settings({"gateway_port": "99999", "devices": "0"}, env={"WARMSERVE_NATS_URL": "http://x"})
    text = str(info.value)
    assert "--gateway-port" in text and "--devices" in text and "WARMSERVE_NATS_URL" in text
    assert len(info.value.errors) == 3


def test_flags_override_environment():
    s = load_settings({"devices": "3"}, env={"WARMSERVE_DEVICES": "5", "WARMSERVE_PREWARM": "false"})
    assert s.devices == 3 and s.prewarm is False


def test_subjects_and_keys_are_namespaced():
    subj, keys = Subjects("ns1"), Keys("ns1")
    assert subj.agent_command("node.a") == "ns1.agent.cmd.execute.node_a"
    assert subj.event("agent", "instance_ready") == "ns1.agent.evt.instance_ready"
    assert keys.models() == "ns1:registry:models"
    with pytest.raises(ValueError):
        subj.event("nope", "x")


async def test_request_reply_and_malformed_message_rejected(settings, capsys):
    server = await Bus.connect(settings, "server")
    client = await Bus.connect(settings, "client")
    subject = server.subjects.agent_command("n0")

    async def handle(cmd: AgentCommand) -> CommandResult:
        return CommandResult(command_id=cmd.command_id, ok=True)

    await server.subscribe(subject, AgentCommand, handle)
    ok = await client.request(subject, AgentCommand(command_id="x", kind=CommandKind.evict), CommandResult)
    assert ok.ok and ok.command_id == "x"
    raw = await client.nc.request(subject, b"garbage", timeout=2)
    assert "rejected: not msgpack" in raw.headers["Warmserve-Error"]
    with pytest.raises(BusError, match="rejected: AgentCommand: command_id"):
        await client.request(subject, LoadSample(model="m", at_s=0, interval_s=1, avg_outstanding=0,
                                                 peak_outstanding=0), CommandResult)
    assert "message_rejected" in capsys.readouterr().err
    await server.drain_subscriptions()
    await server.close()
    await client.close()


async def test_request_without_responders_fails_soon_with_a_bus_error(settings):
    client = await Bus.connect(settings, "client")
    started = asyncio.get_running_loop().time()
    with pytest.raises(BusError, match="no answer on .*NoRespondersError"):
        await client.request(client.subjects.agent_command("nobody"), AgentCommand(command_id="x", kind=CommandKind.evict),
                             CommandResult, timeout_s=5.0)
    assert asyncio.get_running_loop().time() - started < 2.0  # a few short retries, not the whole timeout
    await client.close()


async def test_event_stream_keeps_events(settings):
    bus = await Bus.connect(settings, "t")
    await bus.ensure_event_stream()
    await bus.publish_event("registry", Event(name="model_registered", at_s=1.0, model="m"))
    expected = [bus.subjects.event("registry", "model_registered")]
    async with asyncio.timeout(5.0):  # the stream stores a plain publish a moment after the server took it
        while [s async for s, _ in bus.replay_events()] != expected:
            await asyncio.sleep(0.02)
    await bus.close()


async def test_state_node_views_expire_with_heartbeat(settings):
    state = await State.connect(settings)
    await state.put_node_view(NodeView(node="n0", at_s=1.0, boot_id="b"), ttl_s=0.2)
    assert set(await state.node_views()) == {"n0"}
    await asyncio.sleep(0.3)
    assert await state.node_views() == {}
    assert set(await state.node_views(alive_only=False)) == {"n0"}
    await state.close()


def test_service_start_with_bad_settings_lists_every_error_and_exits_2():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "warmserve.cli", "service", "placer", "--gateway-port", "99999",
                             "--nats-url", "http://x"], capture_output=True, text=True, timeout=60,
                            env={"WARMSERVE_DEVICES": "0", "PATH": ""})
    assert result.returncode == 2
    for needle in ("--gateway-port=99999", "--nats-url='http://x'", "WARMSERVE_DEVICES=0"):
        assert needle in result.stderr
    assert "Traceback" not in result.stderr
