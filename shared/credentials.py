"""Control-plane identities: who may do what on NATS and Redis, and the credentials of each.

`warmserve up` keeps one password per identity in `{data_dir}/credentials.json` (mode 0600, made
once, reused on restart) with the URLs of the embedded servers they are for; `Bus.connect` and
`State.connect` take their options from here. Tables, that file and client options: no sockets,
no servers (warmserve.infra writes the servers' configurations from these tables).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.subjects import JS_STREAM_READ, JS_STREAM_SETUP, Subjects, inbox_prefix

if TYPE_CHECKING:
    from shared.settings import Settings

SERVICES = ("gateway", "placer", "forecaster", "gpuagent")
IDENTITIES = (*SERVICES, "admin", "monitor")  # admin: CLI and bench tools; monitor: read-only watchers
DEFAULT_IDENTITY = "admin"
FILE_NAME = "credentials.json"


def nats_permissions() -> dict[str, dict[str, Any]]:
    """Per identity, the nats-server `permissions` block. One namespace wildcard serves every
    namespace: a namespace separates tenants' and tests' subjects, it is not a security boundary."""
    s = Subjects("*")
    exclusive = {s.agent_commands(): "placer", s.infer_requests(): "gateway", s.infer_cancels(): "gateway"}
    grants = {  # identity: (publish, subscribe, answers requests)
        "gateway": ([s.infer_requests(), s.infer_cancels(), s.load_samples(), s.instance_need(), s.domain("gateway"),
                     s.domain_events("registry")],  # /admin/models
                    [s.all_infer_replies(), s.agent_heartbeat(), s.domain_events("agent")], False),
        "placer": ([s.agent_commands(), s.domain("placer"), *JS_STREAM_SETUP],
                   [s.load_samples(), s.domain_requests("placer")], True),
        "forecaster": ([s.domain("forecast")], [s.load_samples(), s.domain_requests("forecast")], True),
        "gpuagent": ([s.domain("agent"), s.all_infer_replies(), *JS_STREAM_SETUP],
                     [s.domain("agent"), s.infer_requests(), s.infer_cancels(),
                      s.domain_events("registry")], True),  # engines follow the registry
        "monitor": ([*JS_STREAM_READ], [s.all_events(), s.agent_heartbeat()], False),
    }
    permissions: dict[str, dict[str, Any]] = {"admin": {"publish": {"allow": [">"]}, "subscribe": {"allow": [">"]}}}
    for identity, (publish, subscribe, answers) in grants.items():
        block: dict[str, Any] = {
            # its own inbox too: an answer between two processes of one identity (agent and device
            # worker) that outlives a reconnect is no longer covered by allow_responses
            "publish": {"allow": [*publish, inbox_prefix(identity) + ".>"],
                        "deny": [p for p, owner in exclusive.items() if owner != identity]},
            "subscribe": {"allow": [*subscribe, inbox_prefix(identity) + ".>"]},
        }
        if identity == "monitor":
            block["subscribe"]["deny"] = [s.domain("infer")]
        if answers:
            block["allow_responses"] = True  # may answer the requests it receives, once each
        permissions[identity] = block
    return permissions


def redis_rules() -> dict[str, str]:
    """Per identity, its Redis ACL rules (Redis 6 cannot tell reads from writes per key, so every
    identity sees every key; what differs is the commands)."""
    rules = {identity: "~* +@all -@dangerous" for identity in SERVICES}
    return {**rules, "admin": "~* +@all", "monitor": "~* +@read +@connection -@dangerous"}


def redis_acl(passwords: dict[str, str]) -> str:
    """A Redis ACL file: the passwordless default user off, each identity with its password's hash."""
    lines = ["user default off"]
    for identity, rules in redis_rules().items():
        digest = hashlib.sha256(passwords[identity].encode()).hexdigest()
        lines.append(f"user {identity} on #{digest} {rules}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------ the credentials file


def path(data_dir: str | Path) -> Path:
    return Path(data_dir) / FILE_NAME


def _read(data_dir: str | Path) -> dict[str, Any]:
    try:
        return json.loads(path(data_dir).read_text())
    except FileNotFoundError:
        return {}


def _write(data_dir: str | Path, content: dict[str, Any]) -> None:
    target = path(data_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_suffix(".tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        os.fchmod(out.fileno(), 0o600)  # also when a temp file was left over with other bits
        json.dump(content, out, indent=1)
    os.replace(temp, target)


def ensure(data_dir: str | Path) -> dict[str, str]:
    """Every identity's password: those in the file kept, missing ones made (and stored)."""
    content = _read(data_dir)
    passwords = content.get("passwords", {})
    missing = [identity for identity in IDENTITIES if identity not in passwords]
    if missing:
        passwords.update({identity: secrets.token_hex(24) for identity in missing})
        _write(data_dir, {**content, "passwords": passwords})
    return passwords


def record_servers(data_dir: str | Path, servers: dict[str, str]) -> None:
    """Note which URLs ("nats", "redis") reach the embedded servers the passwords are for."""
    _write(data_dir, {**_read(data_dir), "servers": servers})


def _embedded(settings: "Settings", server: str, url: str) -> tuple[str, str] | None:
    """(identity, password) when `url` is an embedded server listed in data_dir's credentials file."""
    content = _read(settings.data_dir)
    if content.get("servers", {}).get(server) != url:
        return None
    identity = settings.identity or DEFAULT_IDENTITY
    return identity, content["passwords"][identity]


# ------------------------------------------------------------ client options


def with_identity(settings: "Settings", identity: str) -> "Settings":
    """`settings` with `identity` unless one was chosen (how watch and status default to monitor)."""
    return settings if settings.identity else settings.with_overrides(identity=identity)


def nats_options(settings: "Settings") -> dict[str, Any]:
    """Keyword arguments for `nats.connect`: a creds file, a user and password from settings, or
    this process's identity on an embedded server; TLS when a CA is given."""
    options: dict[str, Any] = {}
    if settings.nats_tls_ca:
        options["tls"] = ssl.create_default_context(cafile=settings.nats_tls_ca)
    if settings.nats_creds:
        options["user_credentials"] = settings.nats_creds
    elif settings.nats_user:
        options.update(user=settings.nats_user, password=settings.nats_password,
                       inbox_prefix=inbox_prefix(settings.nats_user))
    elif embedded := _embedded(settings, "nats", settings.nats_url):
        identity, password = embedded
        options.update(user=identity, password=password, inbox_prefix=inbox_prefix(identity))
    return options


def redis_options(settings: "Settings") -> dict[str, Any]:
    """Keyword arguments for `redis.from_url`: this process's identity on an embedded server
    (credentials and TLS for other servers go in the URL: rediss://user:password@host/0?ssl_ca_certs=...)."""
    embedded = _embedded(settings, "redis", settings.redis_url)
    return {"username": embedded[0], "password": embedded[1]} if embedded else {}


def redact(url: str) -> str:
    """The URL with its password (if any) hidden, for messages and logs."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    return f"{scheme}{sep}{userinfo.split(':', 1)[0]}:***@{host}"
