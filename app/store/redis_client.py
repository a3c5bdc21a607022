"""The async Redis client of the service (the store's, and the version pin's), and how its
errors read: unreachable, failing over, or Redis's own refusal with its reason."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from redis import exceptions as redis_errors
from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from app.config import RedisConfig

# A cluster client re-reads the slot map (CLUSTER SLOTS) after a connection error at most this
# often: after a failover, the promoted replica's users are read again this soon after the
# first call that finds their old primary gone (redis-py's default is one second).
TOPOLOGY_REFRESH_S = 0.25
# Errors that say the store (or one node of a cluster) cannot be reached, rather than that
# it refused one command: they start the fail-fast back-off.
UNREACHABLE = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    OSError,  # asyncio's TimeoutError (the call bound) is one
    redis_errors.RedisClusterUnreachableError,
    redis_errors.SlotNotCoveredError,
)
# A cluster failing over answers these at once (no back-off needed), and they heal by
# themselves: like an outage, not like a bad command.
FAILING_OVER = (redis_errors.ClusterDownError, redis_errors.TryAgainError)
# What a control-plane call (the version pin, the item change log) may raise: a cluster
# client's own errors are no RedisError.
CONTROL_ERRORS = (
    redis_errors.RedisError,
    redis_errors.RedisClusterException,
    OSError,
    TimeoutError,
)
# What a cluster node answers a client that does not know it is one.
CLUSTER_ONLY = (redis_errors.AskError, redis_errors.ClusterCrossSlotError)


def redis_client(
    url: str, *, cluster: bool, timeout_s: float, pool_wait_s: float, max_connections: int
) -> Redis | RedisCluster:
    """The async client of `url`, every socket operation bounded by `timeout_s`; with
    `cluster`, redis-py's cluster client, `url` naming any node (`max_connections` per node;
    a node's pool refuses at once when they are all busy), else a pool whose calls wait at
    most `pool_wait_s` for a free connection.

    One immediate retry: the first command on a connection made stale by a restart fails, the
    retry reconnects (a cluster client also re-reads the slot map first, when due)."""
    common: dict[str, Any] = {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "retry": Retry(NoBackoff(), 1),
        "decode_responses": True,
        "encoding_errors": "replace",
    }
    if cluster:
        return RedisCluster.from_url(
            url,
            max_connections=max_connections,
            topology_refresh_min_interval=TOPOLOGY_REFRESH_S,
            **common,
        )
    pool = BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=pool_wait_s, **common
    )
    return Redis.from_pool(pool)  # owns the pool: closing the client closes it


T = TypeVar("T")
# Connections of a control-plane client: a poll and an admin write at a time per worker.
CONTROL_CONNECTIONS = 4


def control_client(config: RedisConfig, max_connections: int = CONTROL_CONNECTIONS) -> Any:
    """A client for control-plane calls (the version pin, the item change log): off the
    request path, with the control timeout and pool wait `RedisConfig` derives."""
    return redis_client(
        config.url,
        cluster=config.cluster,
        timeout_s=config.control_timeout_s,
        pool_wait_s=config.control_pool_wait_s,
        max_connections=max_connections,
    )


async def control_call(
    call: Awaitable[T], timeout_s: float, unavailable: Callable[[str], Exception]
) -> T:
    """A control-plane call bounded by `timeout_s`; any Redis error or the timeout raises
    `unavailable(reason)`, Redis's own reason (e.g. OOM, READONLY) or the error's type.

    asyncio.timeout rather than wait_for: on Python 3.11, wait_for swallows a cancellation
    that lands as the call completes, and a watcher's cancellation must never be lost."""
    try:
        async with asyncio.timeout(timeout_s):
            return await call
    except CONTROL_ERRORS as exc:
        raise unavailable(redis_reason(exc) or type(exc).__name__) from exc


def is_wrong_type(exc: BaseException) -> bool:
    """Redis's own reason, not the command redis-py quotes beside it: an item id may read
    "WRONGTYPE" too."""
    return redis_reason(exc).startswith("WRONGTYPE")


def redis_reason(exc: BaseException) -> str:
    """Redis's own reason (e.g. OOM, READONLY) for the client, without redis-py's framing:
    a pipeline's message names the failed command and its key, and a transaction's shows the
    reason as a tuple's repr."""
    reason = str(exc).rpartition("caused error: ")[2]
    framed = re.fullmatch(r"\(['\"](.*)['\"],\)", reason)
    return framed.group(1) if framed else reason


def pool_exhausted(exc: BaseException) -> bool:
    """redis-py's pool gave up waiting for a free connection (a cluster node's pool refuses at
    once): Redis may be perfectly well, so no back-off (it would cost every call of the next
    RETRY_AFTER its Redis data)."""
    if isinstance(exc, redis_errors.MaxConnectionsError):
        return True
    return isinstance(exc, redis_errors.ConnectionError) and isinstance(exc.__cause__, TimeoutError)
