"""`warmserve up`: the whole stack on this machine.

Starts (unless their URLs are configured) an embedded nats-server with JetStream and a
redis-server, each keeping data under `data_dir`; builds and registers the demo models if
needed; starts the four services as separate processes; waits until every /readyz answers;
prints the gateway URL and an example request. Then it supervises: whatever dies (a service or
an embedded server) is started again as before, after a backoff (warmserve.supervision), until
one crashes too often. It is a child subreaper (Linux): device workers whose agent died (and that a
restarted agent adopts) become its children, and it reaps them when they exit, so no zombie is
left. On Ctrl-C it stops everything in reverse order.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from shared import credentials
from shared.listen import listening_socket
from shared.settings import CONNECTION, Settings, SettingsError, add_arguments, env_name, load_settings
from warmserve import infra
from warmserve.cli import invocation
from warmserve.supervision import GiveUp, Supervisor

SERVICE_ORDER = ("gpuagent", "forecaster", "placer", "gateway")
READY_TIMEOUT_S = 600.0
SUPERVISE_POLL_S = 0.25
PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    """Linux: orphaned descendants (device workers of a dead agent) become our children, not init's.
    Elsewhere nothing changes: orphans go to init, which reaps them."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def reap_orphans(own: set[int]) -> list[int]:
    """Collect every exited child that is not one of `own` (those are Popen's to poll): the orphans
    we inherited as subreaper. Peeks first, so an own child's exit status is never taken."""
    reaped = []
    while True:
        try:
            found = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:  # no children at all
            return reaped
        if found is None or found.si_pid in own:  # none exited, or ours: its Popen collects it
            return reaped
        os.waitpid(found.si_pid, 0)
        reaped.append(found.si_pid)


def _configured(name: str, flags: dict) -> bool:
    return flags.get(name) is not None or env_name(name) in os.environ


def _host_port(url: str) -> tuple[str, int]:
    rest = url.split("://", 1)[1].split("/", 1)[0]
    host, _, port = rest.rpartition(":")
    return host, int(port)


def server_name(setting: str) -> str:
    return setting.removesuffix("_url")


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as resp:
            return resp.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


class Stack:
    def __init__(self, settings: Settings, flags: dict):
        self.settings, self.flags = settings, flags
        self.data = Path(settings.data_dir).resolve()
        self.logs = self.data / "logs"
        self.servers: list[infra.Server] = []
        self.services: dict[str, tuple[subprocess.Popen, int]] = {}
        self.service_envs: dict[str, dict[str, str]] = {}  # what each service was started with
        self.gateway_socket: socket.socket | None = None  # held across gateway restarts

    def say(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def start_infra(self) -> None:
        """Start an embedded server for each local URL nobody listens on (requiring the credentials
        kept in the data directory, unless embedded_auth is off); use configured ones as they are."""
        self.logs.mkdir(parents=True, exist_ok=True)
        auth, embedded = self.settings.embedded_auth, {}
        for name, url, start in (("nats_url", self.settings.nats_url, infra.start_nats),
                                 ("redis_url", self.settings.redis_url, infra.start_redis)):
            host, port = _host_port(url)
            configured = _configured(name, self.flags)
            if host not in ("127.0.0.1", "localhost") or (configured and infra.port_in_use(port)):
                self.say(f"using {credentials.redact(url)}")
                continue
            server = start(self.data, port, self.logs / f"{server_name(name)}.log", auth)  # port conflicts raise here
            self.servers.append(server)
            embedded[server.name] = url
            self.say(f"{server_name(name)}-server on {server.url}, data in {self.data / server.name}"
                     + (", credentials required" if auth else ""))
        credentials.record_servers(self.data, embedded if auth else {})  # what `identity` logs in to

    def build_models(self) -> None:
        from warmserve.models import build_demo, register

        infos = build_demo(Path(self.settings.models_dir).resolve(), log=self.say)
        asyncio.run(register(self.settings, infos))

    def start_services(self) -> None:
        base_env = dict(os.environ, PYTHONUNBUFFERED="1", **self.settings.as_env())
        # the gateway's port is bound here, once: a restarted gateway takes over the same socket, so
        # connections made meanwhile wait in its backlog instead of being refused
        self.gateway_socket = listening_socket(self.settings.gateway_host, self.settings.gateway_port)
        for name in SERVICE_ORDER:
            port = self.settings.gateway_port if name == "gateway" else infra.free_port()
            env = dict(base_env, **{env_name("health_port"): str(port if name != "gateway" else 0),
                                    env_name("identity"): name})  # its own credentials and permissions
            if name == "gateway":
                env[env_name("gateway_socket_fd")] = str(self.gateway_socket.fileno())
            proc = self.launch(name, port, env)
            self.say(f"started {name} (pid {proc.pid}), log {self.logs / (name + '.log')}")

    def launch(self, name: str, port: int, env: dict[str, str]) -> subprocess.Popen:
        """Start service `name` with its health port and environment (remembered for restarts)."""
        with open(self.logs / f"{name}.log", "ab") as log:
            inherited = (self.gateway_socket.fileno(),) if name == "gateway" else ()
            proc = subprocess.Popen([sys.executable, "-m", "warmserve.cli", "service", name], env=env,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                    pass_fds=inherited)
        self.services[name], self.service_envs[name] = (proc, port), env
        return proc

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        pending = dict(self.services)
        while pending:
            for name, (proc, port) in list(pending.items()):
                if proc.poll() is not None:
                    raise infra.InfraError(f"{name} exited with code {proc.returncode}; see {self.logs / (name + '.log')}")
                if _ready(port):
                    self.say(f"{name} ready")
                    del pending[name]
            if time.monotonic() > deadline:
                raise infra.InfraError(f"not ready after {READY_TIMEOUT_S:.0f} s: {', '.join(pending)}")
            time.sleep(0.25)

    def supervise(self, supervisor: Supervisor) -> str:
        """Restart what dies, after its backoff, and report it; return why the stack must stop."""
        unready: set[str] = set()  # restarted services whose /readyz has not answered yet
        while True:
            now = time.monotonic()
            for name, proc in self._processes():
                if not supervisor.waiting(name) and proc.poll() is not None:
                    stop = self._crashed(supervisor, name, f"exited with code {proc.returncode}", now)
                    if stop:
                        return stop
            for name in supervisor.due(now):
                try:
                    pid = self.restart(name)
                except infra.InfraError as exc:
                    stop = self._crashed(supervisor, name, f"did not start: {exc}", time.monotonic())
                    if stop:
                        return stop
                    continue
                self.say(f"restarted {name} (pid {pid})")
                unready.add(name)
            reap_orphans({proc.pid for _, proc in self._processes()})
            for name in sorted(unready):
                if not supervisor.waiting(name) and (name not in self.services or _ready(self.services[name][1])):
                    unready.discard(name)
                    self.say(f"{name} ready again")
            time.sleep(SUPERVISE_POLL_S)

    def _processes(self) -> list[tuple[str, subprocess.Popen]]:
        return [(s.name, s.proc) for s in self.servers] + [(n, proc) for n, (proc, _) in self.services.items()]

    def _crashed(self, supervisor: Supervisor, name: str, what: str, now: float) -> str | None:
        decision = supervisor.crashed(name, now)
        log = self.logs / f"{name}.log"
        if isinstance(decision, GiveUp):
            return (f"{name} crashed {decision.crashes} times in {decision.window_s:.0f} s; see {log}; "
                    f"stopping the stack")
        self.say(f"{name} {what}; restarting in {decision.delay_s:g} s (crash {decision.crashes} in "
                 f"{supervisor.window_s:.0f} s; the stack stops at {supervisor.max_crashes}), log {log}")
        return None

    def restart(self, name: str) -> int:
        """Start `name` again as it was: a service with its port and environment, an embedded
        server with its command line (the same port, data directory and configuration)."""
        if name in self.services:
            return self.launch(name, self.services[name][1], self.service_envs[name]).pid
        server = next(s for s in self.servers if s.name == name)
        if infra.port_in_use(server.port):
            raise infra.InfraError(f"port {server.port} for {name}-server is in use by another process")
        with open(self.logs / f"{name}.log", "ab") as log:
            server.proc = subprocess.Popen(server.proc.args, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True)
        try:
            infra.wait_for_port(server.port, 15, server.proc, f"{name}-server")
        except infra.InfraError:
            server.stop(timeout_s=1)  # one that never listened is not left running beside its retry
            raise
        return server.proc.pid

    def stop(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not abandon the clean-up
            signal.signal(sig, signal.SIG_IGN)
        if self.gateway_socket is not None:  # from now on only the gateway's own copy takes connections
            self.gateway_socket.close()
        for name in reversed(SERVICE_ORDER):
            if name in self.services:
                proc, _ = self.services[name]
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGTERM)
        for name, (proc, _) in self.services.items():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for server in reversed(self.servers):
            server.stop()
        self.say("stopped")

    def banner(self) -> str:
        """What to try next, as commands that work when pasted here (this environment's `warmserve`, with
        the connection flags `up` was given; an API key header when keys are required)."""
        url = f"http://{self.settings.gateway_host}:{self.settings.gateway_port}"
        key = " -H 'Authorization: Bearer YOUR_API_KEY'" if self.settings.accepted_api_keys else ""
        flags = "".join(f" --{name.replace('_', '-')} {shlex.quote(str(self.flags[name]))}"
                        for name in CONNECTION if self.flags.get(name) is not None)
        cli = invocation()
        return (f"\nWarmServe is up: gateway {url} (metrics {url}/metrics)\n\n"
                f"  curl -N {url}/v1/chat/completions -H 'Content-Type: application/json'{key} \\\n"
                f"    -d '{{\"model\": \"demo-small-a\", \"stream\": true, \"max_tokens\": 16, "
                f"\"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}]}}'\n\n"
                f"  {cli} status{flags}\n  {cli} watch{flags}\n  Ctrl-C stops everything\n")


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="warmserve up", description=__doc__)
    parser.add_argument("--no-demo", action="store_true", help="do not build/register the demo models")
    add_arguments(parser)
    args = vars(parser.parse_args(argv))
    no_demo = args.pop("no_demo")
    flags = {k: v for k, v in args.items() if v is not None}
    try:
        settings = load_settings(flags)
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        return 2
    stack = Stack(settings, flags)
    become_subreaper()
    for sig in (signal.SIGINT, signal.SIGTERM):  # even when started with SIGINT ignored (a background job)
        signal.signal(sig, _interrupt)
    try:
        if infra.port_in_use(settings.gateway_port):
            raise infra.InfraError(f"port {settings.gateway_port} for the gateway is already in use: "
                                   f"pass --gateway-port or stop what is using it")
        stack.start_infra()
        if not no_demo:
            stack.build_models()
        stack.start_services()
        stack.wait_ready()
        print(stack.banner(), flush=True)
        stack.say(stack.supervise(Supervisor()))
        return 1
    except infra.InfraError as exc:
        stack.say(f"error: {exc}")
        return 1
    except KeyboardInterrupt:
        stack.say("\nstopping...")
        return 0
    finally:
        stack.stop()
