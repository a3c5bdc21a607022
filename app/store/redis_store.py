"""The Redis store (standalone or Redis Cluster): bounded time per call, a short back-off
after a failure, and every read batch-shaped.

Key layout is `models.redis_keys` (shared with `publish-features`): `{prefix}:user:{<id>}`
holds a JSON object of raw features, `{prefix}:hist:{<id>}` a list of item ids, newest first,
capped; the user id is a hash tag, so both keys share one Redis Cluster slot. Reads
(`fetch_many`) cost one round trip per batch (on a cluster, one per node the batch's users
live on, all sent at once).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import orjson
from redis import exceptions as redis_errors
from redis.asyncio import RedisCluster
from redis.asyncio.cluster import ClusterNode

from app.config import RedisConfig
from app.errors import FeatureStoreUnavailable
from app.metrics import Metrics
from app.store.base import FeatureStore, StoreStatus, UserRecord, parse_features
from app.store.redis_client import (
    CLUSTER_ONLY,
    FAILING_OVER,
    UNREACHABLE,
    is_wrong_type,
    pool_exhausted,
    redis_client,
    redis_reason,
)
from models.redis_keys import check_prefix, history_key, user_key

log = logging.getLogger(__name__)

# The back-off key of a standalone Redis, and of a cluster whose topology is not known yet.
WHOLE_STORE = "redis"
T = TypeVar("T")
# A user's events, at once: one script, which a cluster routes by its key and follows through
# a slot's migration (ASK), where a MULTI pipeline failed. A key of another type is replaced,
# as SET replaces a features key whatever it held (reads already ignore it). The key is then
# one the service wrote: FEATURE_TTL_S sets its TTL, or with 0 removes one publish-features
# --ttl gave it, as a features PUT's SET does. Replies {length, replaced}. Pushed 1,000 at a
# time: Lua unpacks ~8,000 values at most.
APPEND_EVENTS = """
local replaced = 0
local kind = redis.call('TYPE', KEYS[1]).ok
if kind ~= 'list' and kind ~= 'none' then
  redis.call('DEL', KEYS[1])
  replaced = 1
end
for i = 3, #ARGV, 1000 do
  redis.call('LPUSH', KEYS[1], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
redis.call('LTRIM', KEYS[1], 0, tonumber(ARGV[1]) - 1)
if tonumber(ARGV[2]) > 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[2])
else
  redis.call('PERSIST', KEYS[1])
end
return {redis.call('LLEN', KEYS[1]), replaced}
"""


class RedisFeatureStore(FeatureStore):
    """Redis (or a Redis Cluster) with bounded time per call and a short back-off after a
    failure.

    Every call is bounded by `config.timeout_s` (socket timeouts plus `asyncio.timeout` around
    the whole call, connection set-up included). After a connection error or timeout, calls
    fail fast for `config.retry_after_s` instead of each paying the timeout while Redis is
    down; then the next call tries again. On a cluster the back-off is per node: while one
    primary is down, the users whose slots it holds degrade and the others are still read,
    and once a replica takes its slots over (the client re-reads the slot map), those users
    are read from the new primary without waiting out the old one's back-off. redis-py drops
    a connection whose command failed or was cancelled, so a failure never leaves a half-read
    reply on a pooled connection, and reconnects on use.
    """

    def __init__(
        self, config: RedisConfig, *, history_cap: int, ttl_s: int, metrics: Metrics
    ) -> None:
        self.prefix = check_prefix(config.prefix)
        self.history_cap = history_cap
        self.ttl_s = ttl_s
        self.timeout_s = config.timeout_s
        self.stall_s = config.stall_s
        self.retry_after_s = config.retry_after_s
        self.metrics = metrics
        self.client = redis_client(
            config.url,
            cluster=config.cluster,
            timeout_s=config.timeout_s,
            pool_wait_s=config.pool_wait_s,
            max_connections=config.max_connections,
        )
        self._retry_at: dict[str, float] = {}  # node name -> end of its back-off
        self._down: set[str] = set()

    async def _call(self, node: str, operation: str, fn: Callable[[], Awaitable[T]]) -> T:
        if time.monotonic() < self._retry_at.get(node, 0.0):
            self.metrics.redis_skipped.labels(operation).inc()
            raise FeatureStoreUnavailable("Redis is unavailable (retrying shortly)")
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.timeout_s):  # unlike wait_for, no extra task
                result = await fn()
        except UNREACHABLE as exc:
            self.metrics.redis_errors.labels(operation).inc()
            if pool_exhausted(exc):  # every connection busy with this worker's own calls
                raise FeatureStoreUnavailable("Redis connections all busy (worker busy)") from exc
            if self._stalled(exc, started):
                log.warning("Redis %s timed out: this worker was busy, not Redis", operation)
                raise FeatureStoreUnavailable(
                    "Redis call timed out (TimeoutError; this worker was busy)"
                ) from exc
            self._retry_at[node] = time.monotonic() + self.retry_after_s
            if node not in self._down:  # a timeout's message is empty: name the exception too
                log.warning("Redis unavailable (%s, %s): %r", operation, node, exc)
            self._down.add(node)
            raise FeatureStoreUnavailable(f"Redis is unavailable: {type(exc).__name__}") from exc
        except FAILING_OVER as exc:
            self.metrics.redis_errors.labels(operation).inc()
            raise FeatureStoreUnavailable(f"Redis is unavailable: {redis_reason(exc)}") from exc
        except (redis_errors.RedisError, redis_errors.RedisClusterException) as exc:
            # A data error (e.g. WRONGTYPE), or a refusal (OOM, READONLY): Redis is up.
            self.metrics.redis_errors.labels(operation).inc()
            reason = redis_reason(exc)
            if isinstance(exc, CLUSTER_ONLY) and not isinstance(self.client, RedisCluster):
                reason = "REDIS_URL names a Redis Cluster node: set REDIS_CLUSTER=true"
            raise FeatureStoreUnavailable(f"Redis error: {reason}") from exc
        if node in self._down:
            log.warning("Redis available again (%s)", node)
            self._down.discard(node)
        self._retry_at.pop(node, None)
        return result

    def _stalled(self, exc: BaseException, started: float) -> bool:
        """A timeout that fired long past its deadline: this worker's event loop was blocked
        (a reload's tower load holds the GIL for the whole load, ~0.2 s at 1M items),
        so the reply could not be read in time, however fast Redis was. Backing off would
        cost every call of the next RETRY_AFTER its Redis data for nothing; the next call
        finds out whether Redis itself is slow."""
        late = time.monotonic() - started > self.stall_s
        return late and isinstance(exc, TimeoutError | redis_errors.TimeoutError)

    async def _route(self, operation: str, keys: Sequence[str]) -> dict[str, list[int]]:
        """The positions of `keys` by the node that serves their slots now (a standalone Redis
        is one node). A cluster's slot map is read on first use, and again when a call asked
        for it (a connection error, a MOVED); the client does either only when due."""
        client = self.client
        if not isinstance(client, RedisCluster):
            return {WHOLE_STORE: list(range(len(keys)))}

        async def route() -> dict[str, list[int]]:
            await client.initialize()  # returns at once while the slot map is current
            slots = client.nodes_manager
            nodes: dict[str, list[int]] = {}
            for i, key in enumerate(keys):
                nodes.setdefault(slots.get_node_from_slot(client.keyslot(key)).name, []).append(i)
            return nodes

        return await self._call(WHOLE_STORE, operation, route)

    async def _node_of(self, operation: str, key: str) -> str:
        return next(iter(await self._route(operation, [key])))

    async def fetch_many(self, user_ids: Sequence[str]) -> dict[str, UserRecord]:
        """On a cluster, each node's users are read in one pipeline, all nodes at once; the
        users of a node that fails are left out (they degrade, as in an outage), and only
        when every node failed does the call raise."""
        keys = [(user_key(self.prefix, u), history_key(self.prefix, u)) for u in user_ids]
        nodes = await self._route("fetch", [features for features, _ in keys])
        calls = [
            self._call(node, "fetch", self._fetch_pairs([keys[i] for i in positions]))
            for node, positions in nodes.items()
        ]
        if len(calls) == 1:
            replies: list[Any] = [await calls[0]]
        else:
            replies = await asyncio.gather(*calls, return_exceptions=True)
        out: dict[str, UserRecord] = {}
        failure: FeatureStoreUnavailable | None = None
        for positions, reply in zip(nodes.values(), replies, strict=True):
            if isinstance(reply, FeatureStoreUnavailable):
                failure = failure or reply
                continue
            if isinstance(reply, BaseException):
                raise reply
            for i, (raw, history) in zip(positions, reply, strict=True):
                # A key of another type reads as absent.
                raw = raw if isinstance(raw, str) else None
                history = tuple(history) if isinstance(history, list) else ()
                found = raw is not None or bool(history)
                features = {} if raw is None else parse_features(raw)
                if features is None:
                    self.metrics.unreadable_features.inc()
                out[user_ids[i]] = UserRecord(features or {}, history, found)
        if failure is not None and not out:
            raise failure
        return out

    def _fetch_pairs(self, pairs: Sequence[tuple[str, str]]) -> Callable[[], Awaitable[Any]]:
        async def fetch() -> list[tuple[Any, Any]]:
            # One round trip: a pipeline (no MULTI) of the features and an LRANGE per user (a
            # list cannot be MGET'd). The features in one MGET on a standalone Redis (a GET
            # per user costs its client ~40 % more CPU at 16 users); on a cluster one GET per
            # user, since no command reads keys of several slots.
            pipe = self.client.pipeline(transaction=False)
            per_user = isinstance(self.client, RedisCluster)
            if per_user:
                for features, _ in pairs:
                    pipe.get(features)
            else:
                pipe.mget([features for features, _ in pairs])
            for _, history in pairs:
                pipe.lrange(history, 0, self.history_cap - 1)
            replies = await pipe.execute(raise_on_error=False)
            # A key of the wrong type is one user's bad data, not an outage: read as absent
            # (MGET answers nil for it, GET an error). Any other error (NOPERM, LOADING,
            # CLUSTERDOWN...) fails the call, so it is counted and not cached as "this user
            # holds nothing".
            for reply in replies:
                if isinstance(reply, redis_errors.RedisError) and not is_wrong_type(reply):
                    raise reply
            n = len(pairs)
            raws = replies[:n] if per_user else replies[0]
            return list(zip(raws, replies[len(replies) - n :], strict=True))

        return fetch

    async def append_events(self, user_id: str, item_ids: Sequence[str]) -> int:
        key = history_key(self.prefix, user_id)

        async def append() -> list[Any]:
            reply: list[Any] = await self.client.eval(
                APPEND_EVENTS, 1, key, self.history_cap, self.ttl_s, *item_ids
            )
            return reply

        node = await self._node_of("append_events", key)
        length, replaced = await self._call(node, "append_events", append)
        if replaced:
            log.warning("Redis key %s held another type than a list; replaced", key)
        return int(length)

    async def put_features(self, user_id: str, features: Mapping[str, Any]) -> None:
        key, payload = user_key(self.prefix, user_id), orjson.dumps(dict(features)).decode()
        ttl = self.ttl_s or None
        node = await self._node_of("put_features", key)
        await self._call(node, "put_features", lambda: self.client.set(key, payload, ex=ttl))

    async def health(self) -> StoreStatus:
        """A live probe, even while backing off, so readiness reports what Redis does now: a
        PING, or on a cluster every primary's CLUSTER INFO (all reachable, state ok)."""
        client = self.client
        self._retry_at.pop(WHOLE_STORE, None)
        try:
            if not isinstance(client, RedisCluster):
                await self._call(WHOLE_STORE, "ping", client.ping)
                return "ok"
            await self._route("ping", [])
            primaries = client.get_primaries()
            for node in primaries:
                self._retry_at.pop(node.name, None)
            probes = [
                self._call(node.name, "ping", _cluster_state(client, node)) for node in primaries
            ]
            states = await asyncio.gather(*probes, return_exceptions=True)
        except FeatureStoreUnavailable:
            return "unavailable"
        for state in states:
            if isinstance(state, BaseException) and not isinstance(state, FeatureStoreUnavailable):
                raise state
        return "ok" if all(state == "ok" for state in states) else "unavailable"

    async def aclose(self) -> None:
        await self.client.aclose()


def _cluster_state(client: RedisCluster, node: ClusterNode) -> Callable[[], Awaitable[str]]:
    async def probe() -> str:
        info = await client.execute_command("CLUSTER INFO", target_nodes=node)
        return str(info.get("cluster_state"))

    return probe
