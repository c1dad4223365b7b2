"""The Redis runtime: the only module that imports redis.

Typed access to cluster state: the model registry, observed node views (agents) with a liveness
key under TTL, the desired plan (placer, written under its lease), leases, and generic typed
hashes for the forecaster's history.
Values are codec-encoded messages; keys come from `shared.keys`.
"""

from __future__ import annotations

from typing import TypeVar

import redis.asyncio as aioredis
import redis.exceptions
from pydantic import BaseModel

from shared.codec import DecodeError, decode, encode
from shared.credentials import redis_options
from shared.keys import Keys
from shared.logs import get_logger
from shared.schemas import ModelInfo, NodeView, Plan
from shared.settings import Settings

T = TypeVar("T", bound=BaseModel)
log = get_logger("state")

StateError = redis.exceptions.RedisError


class State:
    def __init__(self, client: aioredis.Redis, keys: Keys):
        self.client = client
        self.keys = keys

    @classmethod
    async def connect(cls, settings: Settings) -> "State":
        client = aioredis.from_url(settings.redis_url, decode_responses=False, socket_connect_timeout=5,
                                   health_check_interval=30, **redis_options(settings))
        await client.ping()
        return cls(client, Keys(settings.namespace))

    async def close(self) -> None:
        await self.client.aclose()

    # ------------------------------------------------------------ generic typed values

    async def put(self, key: str, message: BaseModel, ttl_s: float | None = None) -> None:
        await self.client.set(key, encode(message), px=int(ttl_s * 1000) if ttl_s else None)

    async def get(self, key: str, kind: type[T]) -> T | None:
        raw = await self.client.get(key)
        return self._decode(key, kind, raw) if raw is not None else None

    async def hput(self, key: str, field: str, message: BaseModel) -> None:
        await self.client.hset(key, field, encode(message))

    async def hput_many(self, key: str, messages: dict[str, BaseModel]) -> None:
        if messages:
            await self.client.hset(key, mapping={f: encode(m) for f, m in messages.items()})

    async def hget(self, key: str, field: str, kind: type[T]) -> T | None:
        raw = await self.client.hget(key, field)
        return self._decode(key, kind, raw) if raw is not None else None

    async def hgetall(self, key: str, kind: type[T]) -> dict[str, T]:
        out: dict[str, T] = {}
        for field, raw in (await self.client.hgetall(key)).items():
            value = self._decode(key, kind, raw)
            if value is not None:
                out[field.decode()] = value
        return out

    async def hdel(self, key: str, *fields: str) -> None:
        if fields:
            await self.client.hdel(key, *fields)

    async def delete(self, *keys: str) -> None:
        if keys:
            await self.client.delete(*keys)

    @staticmethod
    def _decode(key: str, kind: type[T], raw: bytes) -> T | None:
        try:
            return decode(kind, raw)
        except DecodeError as exc:  # a corrupt value is reported, never fatal
            log.warning("state_value_rejected", key=key, reason=str(exc))
            return None

    # ------------------------------------------------------------ registry

    async def register_model(self, info: ModelInfo) -> None:
        await self.hput(self.keys.models(), info.name, info)

    async def unregister_model(self, name: str) -> None:
        await self.hdel(self.keys.models(), name)

    async def models(self) -> dict[str, ModelInfo]:
        return await self.hgetall(self.keys.models(), ModelInfo)

    async def model(self, name: str) -> ModelInfo | None:
        return await self.hget(self.keys.models(), name, ModelInfo)

    # ------------------------------------------------------------ observed node views

    async def put_node_view(self, view: NodeView, ttl_s: float) -> None:
        """Write an agent's view and refresh its liveness key atomically."""
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.set(self.keys.node_view(view.node), encode(view))
            pipe.set(self.keys.node_alive(view.node), view.boot_id.encode(), px=int(ttl_s * 1000))
            await pipe.execute()

    async def node_views(self, alive_only: bool = True) -> dict[str, NodeView]:
        """Views of every node; with alive_only, nodes whose heartbeat expired are left out."""
        views = await self._all_node_views()
        if alive_only:
            alive = await self.alive_nodes(list(views))
            views = {node: view for node, view in views.items() if node in alive}
        return views

    async def _all_node_views(self) -> dict[str, NodeView]:
        keys = [key async for key in self.client.scan_iter(match=self.keys.node_views_pattern(), count=100)]
        raws = await self.client.mget(keys) if keys else []
        views = (self._decode(key.decode(), NodeView, raw) for key, raw in zip(keys, raws) if raw is not None)
        return {view.node: view for view in views if view is not None}

    async def alive_nodes(self, nodes: list[str]) -> set[str]:
        """The nodes among `nodes` whose heartbeat key has not expired (one round trip)."""
        async with self.client.pipeline(transaction=False) as pipe:
            for node in nodes:
                pipe.exists(self.keys.node_alive(node))
            found = await pipe.execute()
        return {node for node, exists in zip(nodes, found) if exists}

    async def drop_node(self, node: str) -> None:
        await self.delete(self.keys.node_view(node), self.keys.node_alive(node))

    # ------------------------------------------------------------ desired plan

    async def plan(self) -> Plan | None:
        return await self.get(self.keys.plan(), Plan)

    async def put_plan_if_leader(self, plan: Plan, token: str) -> bool:
        """Write the plan only while `token` holds the placer lease, atomically (a fenced write:
        a placer that lost its lease unseen never overwrites its successor's plan)."""
        written = await self.client.eval(_SET_IF_HOLDER, 2, self.keys.placer_lease(), self.keys.plan(),
                                         token.encode(), encode(plan))
        return bool(written)

    # ------------------------------------------------------------ leases: one holder at a time

    async def acquire_lease(self, key: str, token: str, ttl_s: float) -> bool:
        """Take the lease for `token` (for `ttl_s` from now) unless another token holds it."""
        return bool(await self.client.eval(_TAKE_UNLESS_HELD, 1, key, token.encode(), _ms(ttl_s)))

    async def renew_lease(self, key: str, token: str, ttl_s: float) -> bool:
        """Extend the lease to `ttl_s` from now if `token` still holds it."""
        return bool(await self.client.eval(_EXTEND_IF_HOLDER, 1, key, token.encode(), _ms(ttl_s)))

    async def release_lease(self, key: str, token: str) -> None:
        """Give the lease up if `token` holds it (another holder's lease is left alone)."""
        await self.client.eval(_DELETE_IF_HOLDER, 1, key, token.encode())


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


# compare-and-act scripts: KEYS[1] is the lease, ARGV[1] the caller's token
_TAKE_UNLESS_HELD = ("local h = redis.call('get', KEYS[1]) if h == false or h == ARGV[1] then "
                     "redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end return 0")
_EXTEND_IF_HOLDER = ("if redis.call('get', KEYS[1]) == ARGV[1] then "
                     "return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0")
_DELETE_IF_HOLDER = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
_SET_IF_HOLDER = ("if redis.call('get', KEYS[1]) == ARGV[1] then "
                  "redis.call('set', KEYS[2], ARGV[2]) return 1 end return 0")
