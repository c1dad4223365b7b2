"""`warmserve up` as a user runs it: embedded NATS and Redis on the configured local ports, demo
models registered, four service processes, a streamed request, Ctrl-C leaves no process behind;
a port conflict is a clear message. (Fake engine here; the real-vLLM path is test_e2e.)"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from warmserve import infra

pytestmark = pytest.mark.slow


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        return not Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False


def up_command(tmp_path: Path, models_dir: str, gateway_port: int) -> list[str]:
    return [sys.executable, "-m", "warmserve.cli", "up", "--engine", "fake", "--devices", "2",
            "--nats-url", f"nats://127.0.0.1:{infra.free_port()}", "--redis-url", f"redis://127.0.0.1:{infra.free_port()}/0",
            "--gateway-port", str(gateway_port), "--data-dir", str(tmp_path / "var"), "--models-dir", models_dir,
            "--placer-tick-s", "0.5", "--heartbeat-s", "0.5"]


def test_up_serves_and_ctrl_c_stops_everything(tmp_path, demo_models):
    models_dir = str(Path(next(iter(demo_models.values())).path).parent)
    port = infra.free_port()
    proc = subprocess.Popen(up_command(tmp_path, models_dir, port), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    banner = ""
    deadline = time.monotonic() + 180
    while "WarmServe is up" not in banner:
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "stack not up in time"
        banner += proc.stdout.readline()
    assert f"http://127.0.0.1:{port}" in banner and "curl" in proc.stdout.readline() + proc.stdout.readline() + banner
    with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                      json={"model": "demo-small-a", "prompt": "hi", "max_tokens": 3, "stream": True}) as resp:
        lines = [line for line in resp.iter_lines() if line.startswith("data: ")]
    assert resp.status_code == 200 and lines[-1] == "data: [DONE]" and len(lines) >= 2
    started = descendants(proc.pid)
    assert len(started) >= 6  # nats, redis, four services (and their helpers)
    assert (tmp_path / "var" / "nats").is_dir() and (tmp_path / "var" / "redis").is_dir()
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)  # an impatient second Ctrl-C must not abandon the clean-up
    assert proc.wait(60) == 0
    time.sleep(0.5)
    assert [p for p in started if alive(p)] == []


def test_port_conflict_is_a_clear_message(tmp_path, demo_models):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(up_command(tmp_path, str(tmp_path / "models"), port), capture_output=True,
                                text=True, timeout=60)
    assert result.returncode == 1
    assert f"port {port} for the gateway is already in use" in result.stderr
