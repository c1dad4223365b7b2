"""Every NATS subject, built in one place: `{namespace}.{domain}.{evt|cmd|req}.{name}[.{target}]`.

The namespace comes from settings so tests and tenants never collide. Nothing else in the
project writes a subject string.
"""

from __future__ import annotations

from dataclasses import dataclass

EVENT_DOMAINS = ("registry", "forecast", "placer", "agent", "gateway")


def _token(value: str) -> str:
    """A subject token: NATS forbids '.', '*', '>' and whitespace inside one."""
    cleaned = "".join("_" if ch in ".*> \t" else ch for ch in value)
    if not cleaned:
        raise ValueError("empty subject token")
    return cleaned


@dataclass(frozen=True)
class Subjects:
    namespace: str

    def _s(self, *parts: str) -> str:
        return ".".join((self.namespace, *parts))

    # events (past tense), all captured by the event stream
    def event(self, domain: str, name: str) -> str:
        if domain not in EVENT_DOMAINS:
            raise ValueError(f"unknown event domain {domain!r}")
        return self._s(domain, "evt", _token(name))

    def all_events(self) -> str:
        return self._s("*", "evt", ">")

    def stream_name(self) -> str:
        return f"{_token(self.namespace).replace('-', '_')}_events"

    # load samples (gateway -> forecaster), high-rate: plain subject, not part of the stream
    def load_samples(self) -> str:
        return self._s("load", "sample")

    # forecaster
    def forecast_query(self) -> str:
        return self._s("forecast", "req", "current")

    def forecast_import(self) -> str:
        return self._s("forecast", "req", "import")

    # placer
    def instance_need(self) -> str:
        return self._s("placer", "req", "instance")

    # agents
    def agent_command(self, node: str) -> str:
        return self._s("agent", "cmd", "execute", _token(node))

    def device_call(self, node: str, device: int) -> str:
        """Private subject between an agent and its device worker."""
        return self._s("agent", "cmd", "device", _token(node), str(device))

    def agent_heartbeat(self) -> str:
        return self._s("agent", "hb", "view")

    # inference
    def infer(self, instance_id: str) -> str:
        return self._s("infer", "req", "generate", _token(instance_id))

    def infer_cancel(self, instance_id: str) -> str:
        return self._s("infer", "cmd", "cancel", _token(instance_id))

    def infer_reply(self, gateway_id: str, request_id: str) -> str:
        return self._s("infer", "reply", _token(gateway_id), _token(request_id))

    def infer_replies(self, gateway_id: str) -> str:
        """Wildcard over every reply stream of one gateway process (demultiplexed by request id)."""
        return self._s("infer", "reply", _token(gateway_id), "*")

    # wildcards for the NATS server's per-identity permissions (shared.credentials); Subjects("*")
    # spans every namespace
    def domain(self, domain: str) -> str:
        return self._s(domain, ">")

    def domain_events(self, domain: str) -> str:
        return self._s(domain, "evt", ">")

    def domain_requests(self, domain: str) -> str:
        return self._s(domain, "req", ">")

    def agent_commands(self) -> str:
        return self._s("agent", "cmd", "execute", "*")

    def infer_requests(self) -> str:
        return self._s("infer", "req", ">")

    def infer_cancels(self) -> str:
        return self._s("infer", "cmd", ">")

    def all_infer_replies(self) -> str:
        return self._s("infer", "reply", ">")


def inbox_prefix(identity: str) -> str:
    """Reply inboxes of one identity: it reads its own replies and no one else's."""
    return f"_INBOX.{_token(identity)}"


# nats-server's own JetStream API: what creating the event stream needs, and what reading it needs
JS_STREAM_SETUP = ("$JS.API.STREAM.CREATE.*", "$JS.API.STREAM.UPDATE.*", "$JS.API.STREAM.INFO.*")
JS_STREAM_READ = ("$JS.API.STREAM.INFO.*", "$JS.API.STREAM.NAMES", "$JS.API.CONSUMER.CREATE.>",
                  "$JS.API.CONSUMER.INFO.>", "$JS.API.CONSUMER.DELETE.>", "$JS.FC.>")
