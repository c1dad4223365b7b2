"""Supervision by `warmserve up`: the restart rules without processes (backoff doubling to a cap,
giving up after repeated crashes inside the window, the window sliding), then the real stack
(fake engine): a service, nats-server and redis-server are kill -9'd and each comes back ready;
the compose file restarts every long-running container and runs a standby placer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from shared.settings import load_settings
from tests.test_up import alive, descendants
from warmserve import infra
from warmserve.supervision import GiveUp, Restart, Supervisor
from warmserve.up import Stack

# ------------------------------------------------------------------ the rules


def test_backoff_doubles_to_its_cap_and_restarts_come_due_once():
    sup = Supervisor(max_crashes=10)
    delays = [sup.crashed("gpuagent", 100.0 + k).delay_s for k in range(7)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert sup.waiting("gpuagent") and sup.due(115.9) == [] and sup.due(116.0) == ["gpuagent"]
    assert not sup.waiting("gpuagent") and sup.due(200.0) == []


def test_gives_up_after_repeated_crashes_inside_the_window():
    sup = Supervisor()
    decisions = [sup.crashed("gpuagent", t) for t in (0.0, 5.0, 10.0, 20.0, 30.0)]
    assert [type(d) for d in decisions] == [Restart] * 4 + [GiveUp]
    assert decisions[-1] == GiveUp(crashes=5, window_s=60.0)
    assert isinstance(sup.crashed("gateway", 30.0), Restart)  # each process counts its own crashes


def test_crashes_older_than_the_window_are_forgotten():
    sup = Supervisor()
    for t in (0.0, 10.0, 20.0, 30.0):
        sup.crashed("placer", t)
    assert sup.crashed("placer", 75.0) == Restart(delay_s=2.0, crashes=3)  # 0 and 10 left the window


def test_compose_restarts_every_long_running_container_and_runs_two_placers():
    compose = yaml.safe_load((Path(__file__).resolve().parent.parent / "docker-compose.yml").read_text())
    for name, svc in compose["services"].items():
        one_shot = svc.get("command") == ["models", "build-demo"]
        assert svc.get("restart") == ("no" if one_shot else "unless-stopped"), name
    assert compose["services"]["placer"]["deploy"]["replicas"] == 2


# ------------------------------------------------------------------ the real stack


def test_the_stack_gives_up_on_a_process_that_keeps_crashing(tmp_path):
    stack = Stack(load_settings({"data_dir": str(tmp_path)}, env={}), {})
    stack.logs.mkdir(parents=True)
    said: list[str] = []
    stack.say = said.append

    def launch(name: str, port: int, env: dict) -> subprocess.Popen:  # a service that dies at once
        proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
        stack.services[name], stack.service_envs[name] = (proc, port), env
        return proc

    stack.launch = launch
    launch("gpuagent", 0, {})
    reason = stack.supervise(Supervisor(first_backoff_s=0.01))
    log = tmp_path / "logs" / "gpuagent.log"
    assert reason == f"gpuagent crashed 5 times in 60 s; see {log}; stopping the stack"
    assert said[0] == (f"gpuagent exited with code 3; restarting in 0.01 s (crash 1 in 60 s; the stack stops at 5), "
                       f"log {log}")
    assert [line.split(" (pid")[0] for line in said if line.startswith("restarted")] == ["restarted gpuagent"] * 4


class Lines:
    """The lines a process writes to one of its pipes, collected by a thread."""

    def __init__(self, pipe):
        self.lines: list[str] = []
        self.changed = threading.Condition()
        threading.Thread(target=self._read, args=(pipe,), daemon=True).start()

    def _read(self, pipe) -> None:
        for line in pipe:
            with self.changed:
                self.lines.append(line.rstrip("\n"))
                self.changed.notify_all()

    def wait_for(self, text: str, timeout_s: float = 120.0, after: int = 0) -> int:
        """Index of the first line from `after` on containing `text`."""
        deadline = time.monotonic() + timeout_s
        with self.changed:
            while True:
                for index in range(after, len(self.lines)):
                    if text in self.lines[index]:
                        return index
                left = deadline - time.monotonic()
                assert left > 0, f"no line with {text!r} in:\n" + "\n".join(self.lines)
                self.changed.wait(left)


def pid_of(up_pid: int, marker: str) -> int:
    for pid in descendants(up_pid):
        try:
            if marker in Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode():
                return pid
        except OSError:
            continue
    raise AssertionError(f"no process {marker!r} under {up_pid}")


@pytest.mark.slow
def test_up_restarts_a_killed_service_and_the_embedded_servers(tmp_path):
    port = infra.free_port()
    command = [sys.executable, "-m", "warmserve.cli", "up", "--no-demo", "--engine", "fake", "--devices", "1",
               "--nats-url", f"nats://127.0.0.1:{infra.free_port()}",
               "--redis-url", f"redis://127.0.0.1:{infra.free_port()}/0", "--gateway-port", str(port),
               "--data-dir", str(tmp_path / "var"), "--placer-tick-s", "0.5", "--heartbeat-s", "0.5"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    out, err = Lines(proc.stdout), Lines(proc.stderr)
    try:
        out.wait_for("WarmServe is up", timeout_s=180)
        seen = len(err.lines)
        for name, marker in (("placer", "service placer"), ("nats", "nats-server"), ("redis", "redis-server")):
            victim = pid_of(proc.pid, marker)
            os.kill(victim, signal.SIGKILL)
            started = time.monotonic()
            seen = err.wait_for(f"{name} exited with code -9; restarting in 0.5 s", after=seen)
            seen = err.wait_for(f"restarted {name}", after=seen)
            seen = err.wait_for(f"{name} ready again", after=seen)
            assert time.monotonic() - started < 30
            assert pid_of(proc.pid, marker) != victim
        assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200
        assert proc.poll() is None  # the stack kept running throughout
        started = descendants(proc.pid)
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(60)
    assert code == 0
    time.sleep(0.5)
    assert [p for p in started if alive(p)] == []
