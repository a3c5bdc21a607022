"""Online user state: raw features and recent history, in Redis or in process.

Key layout is `models.online_store` (shared with `publish-features`): `{prefix}:user:{id}` holds
a JSON object of raw features, `{prefix}:hist:{id}` a list of item ids, newest first, capped.
Reads are batch-shaped (`fetch_many`) and cost one round trip whatever the batch size.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import orjson
from redis import exceptions as redis_errors
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from app.errors import FeatureStoreUnavailable
from app.metrics import Metrics
from models.online_store import history_key, user_key

log = logging.getLogger(__name__)

StoreStatus = Literal["ok", "unavailable", "disabled"]
# A call timeout noticed this many times its bound late means the event loop was blocked.
STALL_FACTOR = 2.0
# Share of the call timeout a call may wait for a free pooled connection: less than all of it,
# so that a full pool (this worker's own burst) tells itself apart from a slow Redis.
POOL_WAIT_SHARE = 0.5
T = TypeVar("T")
# Deletes a key only while it is not a list: a concurrent append may have replaced it already,
# and its events must not be deleted with it.
DROP_UNLESS_LIST = "if redis.call('TYPE', KEYS[1]).ok ~= 'list' then redis.call('DEL', KEYS[1]) end"


@dataclass(frozen=True, slots=True)
class UserRecord:
    """What the store holds for one user; `found` is False when it holds nothing."""

    features: Mapping[str, Any]
    history: tuple[str, ...]
    found: bool


EMPTY = UserRecord({}, (), False)


def parse_features(raw: str | bytes | None) -> dict[str, Any]:
    """A stored JSON object; anything else (absent, corrupt) counts as no features."""
    if raw is None:
        return {}
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


class FeatureStore(ABC):
    """The online store's interface (Redis, or in process when REDIS_URL is empty)."""

    @abstractmethod
    async def fetch_many(self, user_ids: Sequence[str]) -> dict[str, UserRecord]:
        """Records of the distinct `user_ids`. Raises FeatureStoreUnavailable."""

    @abstractmethod
    async def append_events(self, user_id: str, item_ids: Sequence[str]) -> int:
        """Push `item_ids` (oldest first, so the last becomes the newest); returns the
        history length after capping. Raises FeatureStoreUnavailable."""

    @abstractmethod
    async def put_features(self, user_id: str, features: Mapping[str, Any]) -> None:
        """Replace the user's raw features. Raises FeatureStoreUnavailable."""

    @abstractmethod
    async def health(self) -> StoreStatus: ...

    async def aclose(self) -> None:
        return None


class MemoryFeatureStore(FeatureStore):
    """The embedded store: a dict per key kind, same semantics as the Redis layout (cap,
    newest first, TTL). Per process, unbounded in users: for development and single boxes."""

    def __init__(self, history_cap: int, ttl_s: int = 0) -> None:
        self.history_cap = history_cap
        self.ttl_s = ttl_s
        self._features: dict[str, dict[str, Any]] = {}
        self._history: dict[str, list[str]] = {}
        self._expires: dict[str, float] = {}

    def _expire(self, user_id: str) -> None:
        deadline = self._expires.get(user_id)
        if deadline is not None and deadline <= time.monotonic():
            self._features.pop(user_id, None)
            self._history.pop(user_id, None)
            del self._expires[user_id]

    def _touch(self, user_id: str) -> None:
        if self.ttl_s:
            self._expires[user_id] = time.monotonic() + self.ttl_s

    async def fetch_many(self, user_ids: Sequence[str]) -> dict[str, UserRecord]:
        out: dict[str, UserRecord] = {}
        for user_id in user_ids:
            self._expire(user_id)
            features = self._features.get(user_id)
            history = self._history.get(user_id, [])
            found = features is not None or bool(history)
            out[user_id] = UserRecord(dict(features or {}), tuple(history), found)
        return out

    async def append_events(self, user_id: str, item_ids: Sequence[str]) -> int:
        self._expire(user_id)
        history = [*reversed(item_ids), *self._history.get(user_id, [])][: self.history_cap]
        self._history[user_id] = history
        self._touch(user_id)
        return len(history)

    async def put_features(self, user_id: str, features: Mapping[str, Any]) -> None:
        self._expire(user_id)
        self._features[user_id] = dict(features)
        self._touch(user_id)

    async def health(self) -> StoreStatus:
        return "disabled"


class RedisFeatureStore(FeatureStore):
    """Redis with bounded time per call and a short back-off after a failure.

    Every call is bounded by `timeout_s` (socket timeouts plus `asyncio.timeout` around the
    whole call, connection set-up included). After a connection error or timeout, calls fail
    fast for `retry_after_s` instead of each paying the timeout while Redis is down; then the
    next call tries again. redis-py drops a connection whose command failed or was cancelled,
    so a failure never leaves a half-read reply on a pooled connection, and reconnects on use.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str,
        history_cap: int,
        ttl_s: int,
        timeout_s: float,
        retry_after_s: float,
        max_connections: int,
        metrics: Metrics,
    ) -> None:
        self.prefix = prefix
        self.history_cap = history_cap
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self.retry_after_s = retry_after_s
        self.metrics = metrics
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout_s * POOL_WAIT_SHARE,  # waiting for a free connection is bounded too
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            # One immediate retry: the first command on a connection made stale by a Redis
            # restart fails, the retry reconnects; the call timeout bounds the total anyway.
            retry=Retry(NoBackoff(), 1),
            decode_responses=True,
            encoding_errors="replace",
        )
        self.client = Redis(connection_pool=pool)
        self._retry_at = 0.0
        self._down = False

    async def _call(self, operation: str, fn: Callable[[], Awaitable[T]]) -> T:
        if time.monotonic() < self._retry_at:
            raise FeatureStoreUnavailable("Redis is unavailable (retrying shortly)")
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.timeout_s):  # unlike wait_for, no extra task
                result = await fn()
        except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
            self.metrics.redis_errors.labels(operation).inc()
            if _pool_exhausted(exc):  # every connection busy with this worker's own calls
                raise FeatureStoreUnavailable("Redis connections all busy (worker busy)") from exc
            if self._stalled(exc, started):
                log.warning("Redis %s timed out: this worker was busy, not Redis", operation)
                raise FeatureStoreUnavailable("Redis call timed out (worker busy)") from exc
            self._retry_at = time.monotonic() + self.retry_after_s
            if not self._down:  # a timeout's message is empty: name the exception too
                log.warning("Redis unavailable (%s): %r", operation, exc)
            self._down = True
            raise FeatureStoreUnavailable(f"Redis is unavailable: {type(exc).__name__}") from exc
        except redis_errors.RedisError as exc:  # a data error (e.g. WRONGTYPE): Redis is up
            self.metrics.redis_errors.labels(operation).inc()
            raise FeatureStoreUnavailable(f"Redis error: {_reason(exc)}") from exc
        if self._down:
            log.warning("Redis available again")
        self._down = False
        self._retry_at = 0.0
        return result

    def _stalled(self, exc: BaseException, started: float) -> bool:
        """A timeout that fired long past its deadline: this worker's event loop was blocked
        (a reload's `torch.jit.load` holds the GIL for the whole load, ~0.2 s at 1M items),
        so the reply could not be read in time, however fast Redis was. Backing off would
        cost every call of the next RETRY_AFTER its Redis data for nothing; the next call
        finds out whether Redis itself is slow."""
        late = time.monotonic() - started > STALL_FACTOR * self.timeout_s
        return late and isinstance(exc, TimeoutError | redis_errors.TimeoutError)

    async def fetch_many(self, user_ids: Sequence[str]) -> dict[str, UserRecord]:
        async def fetch() -> list[Any]:
            # One round trip per batch: a pipeline (no MULTI) of one MGET for every user's
            # features and one LRANGE per history (a list cannot be MGET'd).
            pipe = self.client.pipeline(transaction=False)
            pipe.mget([user_key(self.prefix, user_id) for user_id in user_ids])
            for user_id in user_ids:
                pipe.lrange(history_key(self.prefix, user_id), 0, self.history_cap - 1)
            replies = await pipe.execute(raise_on_error=False)
            # A history key of the wrong type is one user's bad data, not an outage: read as
            # absent below. Any other error (NOPERM, LOADING, MASTERDOWN...) fails the call,
            # so it is counted and not cached as "this user holds nothing".
            for reply in replies:
                if isinstance(reply, redis_errors.RedisError) and not _wrong_type(reply):
                    raise reply
            return replies

        replies = await self._call("fetch", fetch)
        out: dict[str, UserRecord] = {}
        for user_id, raw, history in zip(user_ids, replies[0], replies[1:], strict=True):
            # MGET answers nil for a key of another type: absent too.
            raw = raw if isinstance(raw, str) else None
            history = tuple(history) if isinstance(history, list) else ()
            found = raw is not None or bool(history)
            out[user_id] = UserRecord(parse_features(raw), history, found)
        return out

    async def append_events(self, user_id: str, item_ids: Sequence[str]) -> int:
        key = history_key(self.prefix, user_id)

        async def push() -> list[Any]:
            pipe = self.client.pipeline(transaction=True)
            pipe.lpush(key, *item_ids)
            pipe.ltrim(key, 0, self.history_cap - 1)
            if self.ttl_s:
                pipe.expire(key, self.ttl_s)
            pipe.llen(key)
            return await pipe.execute()

        async def append() -> list[Any]:
            try:
                return await push()
            except redis_errors.ResponseError as exc:
                if not _wrong_type(exc):
                    raise
            # Reads already ignore a history key of another type; replace it, as SET replaces
            # a features key whatever it held, rather than refuse this user's events for good.
            log.warning("Redis key %s held another type than a list; replaced", key)
            await self.client.eval(DROP_UNLESS_LIST, 1, key)
            return await push()

        replies = await self._call("append_events", append)
        return int(replies[-1])

    async def put_features(self, user_id: str, features: Mapping[str, Any]) -> None:
        key, payload = user_key(self.prefix, user_id), orjson.dumps(dict(features)).decode()
        ttl = self.ttl_s or None
        await self._call("put_features", lambda: self.client.set(key, payload, ex=ttl))

    async def health(self) -> StoreStatus:
        # Probes even while backing off, so readiness reports what Redis is doing now.
        self._retry_at = 0.0
        try:
            await self._call("ping", self.client.ping)
        except FeatureStoreUnavailable:
            return "unavailable"
        return "ok"

    async def aclose(self) -> None:
        await self.client.aclose()
        await self.client.connection_pool.disconnect()


def _wrong_type(exc: BaseException) -> bool:
    """Redis's own reason, not the command redis-py quotes beside it: an item id may read
    "WRONGTYPE" too."""
    return _reason(exc).startswith("WRONGTYPE")


def _reason(exc: BaseException) -> str:
    """Redis's own reason (e.g. OOM, READONLY) for the client, without redis-py's framing:
    a pipeline's message names the failed command and its key, and a transaction's shows the
    reason as a tuple's repr."""
    reason = str(exc).rpartition("caused error: ")[2]
    framed = re.fullmatch(r"\(['\"](.*)['\"],\)", reason)
    return framed.group(1) if framed else reason


def _pool_exhausted(exc: BaseException) -> bool:
    """redis-py's pool gave up waiting for a free connection: Redis may be perfectly well, so
    no back-off (it would cost every call of the next RETRY_AFTER its Redis data)."""
    return isinstance(exc, redis_errors.ConnectionError) and isinstance(exc.__cause__, TimeoutError)
