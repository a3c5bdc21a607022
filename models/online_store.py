"""`publish-features`: users' features and histories into the online store, in the key layout
of `models.redis_keys` (shared with the service)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pandas as pd
from redis import Redis, RedisError
from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException
from tqdm import tqdm

from models.dataset import DataError, Dataset
from models.redis_keys import (
    DEFAULT_HISTORY_CAP,
    DEFAULT_PREFIX,
    check_prefix,
    history_key,
    user_key,
)

# Replaces one user's keys at once (a script runs atomically, and both keys share a slot).
# KEYS: features, history; ARGV: features JSON, TTL seconds (0: none), item ids newest first.
# RPUSH in slices: Lua's unpack() has a stack limit of a few thousand values.
REPLACE_USER = """
local ttl = tonumber(ARGV[2])
if ttl > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ttl)
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('DEL', KEYS[2])
for i = 3, #ARGV, 1000 do
  redis.call('RPUSH', KEYS[2], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
if ttl > 0 and #ARGV > 2 then
  redis.call('EXPIRE', KEYS[2], ttl)
end
return 1
"""


def connect(url: str, *, cluster: bool = False, timeout_s: float = 5.0) -> Redis | RedisCluster:
    """A blocking client for `url`, checked with a PING; with `cluster`, `url` names any node
    of a Redis Cluster (redis-py's cluster client finds the others). Raises DataError."""
    try:
        if cluster:
            client: Redis | RedisCluster = RedisCluster.from_url(
                url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
            )
        else:
            client = Redis.from_url(url, socket_connect_timeout=timeout_s)
        client.ping()
    except (RedisError, RedisClusterException) as exc:
        kind = "Redis Cluster" if cluster else "Redis"
        raise DataError(f"cannot reach {kind} at {redacted(url)}: {exc}") from exc
    return client


def redacted(url: str) -> str:
    """`url` with its password, if it holds one, written `***`: fit for a message or a log."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user, host = parts.netloc.rsplit("@", 1)
    return urlunsplit(parts._replace(netloc=f"{user.split(':', 1)[0]}:***@{host}"))


def _clean(value: Any) -> Any:
    """A JSON-ready value; missing (None) for NaN and infinities, which the encoder treats as
    missing and strict JSON (the service's parser) cannot carry."""
    value = value.item() if hasattr(value, "item") else value
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return None
    return value


def user_records(
    dataset: Dataset, history_length: int
) -> Iterator[tuple[str, dict[str, Any], list[str]]]:
    """(user id, raw features without missing values, latest items newest first) per user:
    those who interacted, then the users table's others (no history)."""
    recent = (
        dataset.interactions.sort_values("timestamp", kind="stable")
        .groupby("user_id", sort=False)["item_id"]
        .agg(lambda s: list(s.iloc[::-1][:history_length]))
    )
    for user_id, row in published_users(dataset).iterrows():
        features = {str(k): _clean(v) for k, v in row.items()}
        items = recent.get(user_id, [])
        yield str(user_id), {k: v for k, v in features.items() if v is not None}, items


def published_users(dataset: Dataset) -> pd.DataFrame:
    """The users table's every user: those who interacted, then the others."""
    if dataset.cold_users is None:
        return dataset.users
    return pd.concat([dataset.users, dataset.cold_users])


def publish(
    client: Redis | RedisCluster,
    dataset: Dataset,
    *,
    prefix: str = DEFAULT_PREFIX,
    history_length: int = DEFAULT_HISTORY_CAP,
    ttl_seconds: int | None = None,
    chunk: int = 1000,
) -> int:
    """Write every user's features and recent history; returns the number of users written.

    Each user's keys are replaced (not merged) at once, by one script (REPLACE_USER); the
    scripts are pipelined `chunk` users at a time: one round trip per chunk, and on a cluster
    one per chunk and node (a transaction cannot span the slots of many users).
    """
    check_prefix(prefix)
    ttl = str(ttl_seconds or 0)
    batch: list[Sequence[str]] = []
    written = 0
    records = user_records(dataset, history_length)
    total = len(published_users(dataset))
    for user_id, features, items in tqdm(records, total=total, disable=None):
        keys = (user_key(prefix, user_id), history_key(prefix, user_id))
        batch.append((*keys, json.dumps(features, allow_nan=False), ttl, *map(str, items)))
        written += 1
        if len(batch) == chunk:
            _replace(client, batch)
            batch = []
    _replace(client, batch)
    return written


def _replace(client: Redis | RedisCluster, batch: list[Sequence[str]]) -> None:
    if not batch:
        return
    pipe = client.pipeline(transaction=False)
    for args in batch:  # EVAL by name: redis-py's cluster pipeline has no eval() method
        pipe.execute_command("EVAL", REPLACE_USER, 2, *args)
    pipe.execute()
