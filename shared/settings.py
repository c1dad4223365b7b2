"""All settings of all services, read once at start-up from flags and environment.

Each field is `--flag-name` on the command line and `WARMSERVE_FLAG_NAME` in the environment
(flags win). `load_settings` validates everything and reports every error at once. Nothing else
in the project reads the environment for configuration.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Mapping, Sequence

from shared.credentials import IDENTITIES

ENV_PREFIX = "WARMSERVE_"
# Settings' fields are declared in sections, in this order; each section after "shared" starts at this field
SECTION_STARTS = {"gateway": "gateway_host", "forecaster": "window_s", "placer": "placer_tick_s", "gpuagent": "node"}
SECTIONS = ("shared", *SECTION_STARTS)
METAVARS = {"int": "N", "float": "NUM", "bool": "BOOL", "str": "TEXT"}
# what a client of a running stack (status, watch, models) needs to reach it
CONNECTION = ("namespace", "nats_url", "redis_url", "data_dir", "identity", "nats_user", "nats_password",
              "nats_creds", "nats_tls_ca")


def _setting(default: Any, help: str, check: Callable[[Any], str | None] | None = None) -> Any:
    return field(default=default, metadata={"help": help, "check": check})


def _positive(value: Any) -> str | None:
    return None if value > 0 else "must be > 0"


def _non_negative(value: Any) -> str | None:
    return None if value >= 0 else "must be >= 0"


def _port(value: int) -> str | None:
    return None if 0 <= value <= 65535 else "must be a port number (0-65535)"


def _url(*schemes: str) -> Callable[[str], str | None]:
    def check(value: str) -> str | None:
        if value == "" or any(value.startswith(s + "://") for s in schemes):
            return None
        return f"must start with {' or '.join(s + '://' for s in schemes)}"

    return check


def _file(value: str) -> str | None:
    return None if not value or os.path.isfile(value) else "no such file"


def _one_of(*choices: str) -> Callable[[str], str | None]:
    return lambda value: None if value in choices else f"must be one of {', '.join(choices)}"


@dataclass(frozen=True)
class Settings:
    # shared
    namespace: str = _setting("warmserve", "prefix of every NATS subject and Redis key",
                              lambda v: None if v and all(c.isalnum() or c in "-_" for c in v)
                              else "letters, digits, '-' and '_' only")
    nats_url: str = _setting("nats://127.0.0.1:4222", "NATS server URL", _url("nats", "tls"))
    redis_url: str = _setting("redis://127.0.0.1:6379/0", "Redis URL", _url("redis", "rediss", "unix"))
    log_level: str = _setting("info", "log level", _one_of("debug", "info", "warning", "error"))
    log_json: bool = _setting(False, "log as JSON lines instead of key=value")
    health_host: str = _setting("127.0.0.1", "address of the /livez and /readyz endpoints")
    health_port: int = _setting(0, "port of /livez and /readyz (0: any free port)", _port)
    drain_timeout_s: float = _setting(10.0, "how long shutdown waits for in-flight work", _positive)
    request_timeout_s: float = _setting(5.0, "timeout of NATS request/reply calls", _positive)
    data_dir: str = _setting("var", "where embedded NATS/Redis keep data and services write files")
    models_dir: str = _setting("models", "where demo models are built")
    identity: str = _setting("", "whose credentials (in data_dir, written by `warmserve up`) this process uses on the "
                                 "embedded NATS/Redis (empty: admin; watch and status: monitor)",
                             _one_of("", *IDENTITIES))
    embedded_auth: bool = _setting(True, "`warmserve up`: embedded NATS/Redis require credentials and enforce "
                                         "each identity's permissions")
    nats_user: str = _setting("", "NATS user on a server you run (empty: the identity's on embedded NATS)")
    nats_password: str = _setting("", "password of nats_user")
    nats_creds: str = _setting("", "NATS credentials file (user JWT and nkey seed) for a server you run", _file)
    nats_tls_ca: str = _setting("", "CA certificate that signed the NATS server's (turns TLS on)", _file)
    metrics_auth: bool = _setting(False, "/metrics (the gateway's and every service's health port) also "
                                         "requires one of api_keys")

    # gateway
    gateway_host: str = _setting("127.0.0.1", "gateway listen address")
    gateway_port: int = _setting(8000, "gateway listen port", _port)
    gateway_socket_fd: int = _setting(-1, "listening socket inherited from `warmserve up`, which keeps it across "
                                          "gateway restarts (-1: bind gateway_host:gateway_port)",
                                      lambda v: None if v >= -1 else "must be -1 or a file descriptor")
    max_inflight_per_instance: int = _setting(32, "B: requests in flight per instance", _positive)
    queue_limit: int = _setting(1024, "requests a model may hold waiting for an instance", _positive)
    queue_deadline_s: float = _setting(120.0, "how long a request may wait for an instance", _positive)
    max_body_bytes: int = _setting(1_000_000, "largest accepted request body", _positive)
    api_keys: str = _setting("", "comma-separated accepted API keys (empty: no auth)")
    admin_api_keys: str = _setting("", "comma-separated keys of the /admin routes, separate from api_keys "
                                       "(empty: /admin refused)")
    sample_interval_s: float = _setting(1.0, "load sampling interval", _positive)
    dispatch_ack_timeout_s: float = _setting(3.0, "gateway: a request its instance has not acknowledged this long "
                                                  "after it was sent is sent again (lost in a NATS outage)", _positive)
    infer_idle_timeout_s: float = _setting(30.0, "gateway: longest wait for an engine's next chunk "
                                                 "before the request fails", _positive)

    # forecaster
    window_s: float = _setting(300.0, "forecast window W", _positive)
    season_s: float = _setting(86400.0, "forecast season (a day; shorter when a replay compresses time)", _positive)
    forecast_method: str = _setting("ours", "predictor the service publishes",
                                    _one_of("ours", "csp", "seasonal_naive"))
    csp_days: int = _setting(3, "CSP: D previous days in the seasonal term", _positive)
    csp_errors: int = _setting(10, "CSP: N recent errors in the correction", _positive)

    # placer
    placer_tick_s: float = _setting(5.0, "planning tick", _positive)
    load_bandwidth_bytes_s: float = _setting(32e9, "cold-load bandwidth used in scores", _positive)
    prewarm: bool = _setting(True, "plan prewarmed copies from forecasts")
    placement: str = _setting("paper", "copy placement: paper (skip a copy that does not fit) or evict_aware (evict "
                                       "lower-score copies; it thrashed over capacity at 256 GPUs)",
                              _one_of("evict_aware", "paper", "round_robin"))
    kv_prewarm: bool = _setting(True, "let prewarmed copies use idle KV space")
    allocation: str = _setting("hit_first", "request-time allocation: hit_first (displace idle instances for a ready "
                                            "copy before any cold start) or paper", _one_of("hit_first", "paper"))
    promotable_copies: bool = _setting(True, "copies under another model's instance rank last; an allocation "
                                             "re-plans copies at once")
    promotable_max_tp: int = _setting(1, "with promotable_copies, models on at most this many GPUs replace their "
                                         "copies under other instances and keep new ones off GPUs with instances",
                                      _non_negative)
    unserved_first: bool = _setting(True, "while the cluster cannot hold the instances its loads want, a model with no "
                                          "instance may displace idle instances younger than the scale window")
    standby_copies: bool = _setting(True, "spare memory holds standby copies of idle models that may get a request "
                                          "(ranked by the forecast's chance of one)")
    scale_window_s: float = _setting(5.0, "autoscaler load averaging window", _positive)
    scale_down_keep_s: float = _setting(0.0, "scale-downs spare instances younger than this (0: the paper's rule)",
                                        _non_negative)
    placer_lease_ttl_s: float = _setting(3.0, "placer leadership lease: a standby placer takes over this long after "
                                              "the leader stops renewing", _positive)
    placer_lease_renew_s: float = _setting(1.0, "how often the leading placer renews its lease (and a standby tries "
                                                "to take it); well under placer_lease_ttl_s", _positive)

    # gpuagent
    node: str = _setting("node0", "this agent's node name",
                         lambda v: None if v and "." not in v and " " not in v else "no dots or spaces")
    engine: str = _setting("vllm", "inference engine: vllm (real) or fake (timing model, for tests and the simulator parity run)",
                           _one_of("vllm", "fake"))
    fake_token_s: float = _setting(0.002, "fake engine: seconds per generated token", _non_negative)
    fake_load_bytes_s: float = _setting(2e9, "fake engine: prewarm/cold-load bandwidth", _positive)
    device_kind: str = _setting("cpu", "cpu (logical devices) or cuda", _one_of("cpu", "cuda"))
    devices: int = _setting(2, "number of logical CPU devices (cuda: all visible GPUs)", _positive)
    engine_threads: int = _setting(0, "CPU devices: intra-op threads of each device's engines' prefill "
                                      "steps; decode steps use one (0: the cores this process may use, "
                                      "shared by the devices, at least 1)",
                                   _non_negative)
    device_memory_bytes: int = _setting(4 << 30, "memory budget per logical CPU device", _positive)
    kv_cache_bytes: int = _setting(128 << 20, "KV cache per instance (at least one full context is always reserved)", _positive)
    max_parallel_prewarms: int = _setting(2, "prewarms running at once per node", _positive)
    warm_engines: bool = _setting(True, "initialise one idle engine per registered architecture on every device "
                                        "where it fits, at start and when one is registered (device "
                                        "prewarming; dropped on demand)")
    heartbeat_s: float = _setting(1.0, "agent heartbeat interval", _positive)
    heartbeat_ttl_s: float = _setting(5.0, "agent considered dead after this", _positive)
    demote_timeout_s: float = _setting(30.0, "how long demote waits for in-flight requests", _positive)
    fake_worker_processes: bool = _setting(False, "fake engine: run device workers as child processes, as vLLM's "
                                                  "always are (tests of worker supervision)")
    worker_restart_s: float = _setting(0.5, "delay before a dead device worker is started again (doubles while "
                                            "workers keep dying soon after their start)", _non_negative)
    worker_restart_max_s: float = _setting(30.0, "longest delay before a dead device worker is started again",
                                           _positive)
    worker_orphan_timeout_s: float = _setting(30.0, "a device worker process exits when no agent has called it for "
                                                   "this long (its agent died and none came back to adopt it; the "
                                                   "agent calls each worker every heartbeat)", _positive)
    worker_bus_lost_exit_s: float = _setting(300.0, "a device worker process exits when NATS has been unreachable "
                                                    "for this long (its stack is gone: nothing reaches its "
                                                    "instance meanwhile anyway)", _positive)

    @property
    def accepted_api_keys(self) -> frozenset[str]:
        return _keys(self.api_keys)

    @property
    def accepted_admin_keys(self) -> frozenset[str]:
        return _keys(self.admin_api_keys)

    def with_overrides(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **changes)

    def as_env(self) -> dict[str, str]:
        """Every setting as its WARMSERVE_* variable: how a parent hands its settings to a child process."""
        return {env_name(f.name): str(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _keys(listed: str) -> frozenset[str]:
    return frozenset(k.strip() for k in listed.split(",") if k.strip())


class SettingsError(ValueError):
    def __init__(self, errors: list[str]):
        super().__init__("invalid settings:\n  " + "\n  ".join(errors))
        self.errors = errors


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _convert(raw: str, kind: type) -> Any:
    if kind is bool:
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError("expected true/false")
    return kind(raw)


def section_of(name: str) -> str:
    """The section a setting is declared in (Settings' fields come in SECTIONS order)."""
    names = [f.name for f in dataclasses.fields(Settings)]
    starts = [names.index(first) for first in SECTION_STARTS.values()]
    return SECTIONS[sum(names.index(name) >= start for start in starts)]


def add_arguments(parser: argparse.ArgumentParser, shown: Collection[str] = SECTIONS) -> None:
    """Add one optional flag per setting (default None: fall back to env, then default). --help lists
    those `shown` (names of sections or of settings), under a heading per section; the rest are
    accepted but not listed, so each command's help shows what applies to it."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    hidden = False
    parser.usage = parser.usage or "%(prog)s [options]"  # not every flag spelled out
    for f in dataclasses.fields(Settings):
        section = section_of(f.name)
        listed = section in shown or f.name in shown
        hidden |= not listed
        if listed and section not in groups:
            groups[section] = parser.add_argument_group(f"{section} settings")
        groups.get(section, parser).add_argument(
            "--" + f.name.replace("_", "-"), dest=f.name, default=None, metavar=METAVARS[str(f.type)],
            help=f"{f.metadata['help']} [{env_name(f.name)}, default {f.default!r}]" if listed else argparse.SUPPRESS)
    if hidden:
        parser.epilog = ("Every other setting (`warmserve up --help` lists them all) is accepted too, as a flag "
                         "or a WARMSERVE_* variable.")


def load_settings(flags: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Merge defaults < environment < flags, convert and validate; raise SettingsError listing all errors.
    Flags set to None (argparse's default) and keys that are not settings are ignored."""
    env = os.environ if env is None else env
    flags = flags or {}
    values: dict[str, Any] = {}
    errors: list[str] = []
    kinds = {"int": int, "float": float, "bool": bool, "str": str}
    for f in dataclasses.fields(Settings):
        kind = kinds[f.type] if isinstance(f.type, str) else f.type
        raw, source = flags.get(f.name), f"--{f.name.replace('_', '-')}"
        if raw is None:
            raw, source = env.get(env_name(f.name)), env_name(f.name)
        if raw is None:
            value = f.default
        else:
            try:
                value = _convert(raw, kind) if isinstance(raw, str) else kind(raw)
            except ValueError as exc:
                errors.append(f"{source}={raw!r}: {exc}")
                continue
        check = f.metadata["check"]
        problem = check(value) if check else None
        if problem:
            errors.append(f"{source}={value!r}: {problem}")
        values[f.name] = value
    if errors:
        raise SettingsError(errors)
    return Settings(**values)


def settings_from_argv(argv: Sequence[str] | None, description: str, shown: Collection[str] = SECTIONS,
                       prog: str | None = None) -> Settings:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_arguments(parser, shown)
    args = parser.parse_args(argv)
    try:
        return load_settings(vars(args))
    except SettingsError as exc:
        parser.exit(2, f"{parser.prog}: {exc}\n")  # every error at once, no traceback
