"""The online store's key layout (shared with the service) and `publish-features`."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

from redis import Redis
from tqdm import tqdm

from models.dataset import Dataset

DEFAULT_PREFIX = "tr"


def user_key(prefix: str, user_id: str) -> str:
    """Raw user features, a JSON object string."""
    return f"{prefix}:user:{user_id}"


def history_key(prefix: str, user_id: str) -> str:
    """Recent item ids, a Redis list, newest first, capped."""
    return f"{prefix}:hist:{user_id}"


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
    """(user id, raw features without missing values, latest items newest first) per user."""
    recent = (
        dataset.interactions.sort_values("timestamp", kind="stable")
        .groupby("user_id", sort=False)["item_id"]
        .agg(lambda s: list(s.iloc[::-1][:history_length]))
    )
    for user_id, row in dataset.users.iterrows():
        features = {str(k): _clean(v) for k, v in row.items()}
        items = recent.get(user_id, [])
        yield str(user_id), {k: v for k, v in features.items() if v is not None}, items


def publish(
    client: Redis,
    dataset: Dataset,
    *,
    prefix: str = DEFAULT_PREFIX,
    history_length: int = 100,
    ttl_seconds: int | None = None,
    chunk: int = 1000,
) -> int:
    """Write every user's features and recent history; returns the number of users written.

    Each user's keys are replaced (not merged) in one MULTI transaction per chunk.
    """
    written = 0
    pipe = client.pipeline(transaction=True)
    records = user_records(dataset, history_length)
    for user_id, features, items in tqdm(records, total=len(dataset.users), disable=None):
        ukey, hkey = user_key(prefix, user_id), history_key(prefix, user_id)
        pipe.set(ukey, json.dumps(features, allow_nan=False), ex=ttl_seconds)
        pipe.delete(hkey)
        if items:
            pipe.rpush(hkey, *items)
            if ttl_seconds:
                pipe.expire(hkey, ttl_seconds)
        written += 1
        if written % chunk == 0:
            pipe.execute()
    pipe.execute()
    return written
