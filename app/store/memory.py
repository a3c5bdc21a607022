"""The embedded store, in process: what serves when REDIS_URL is empty."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from app.store.base import FeatureStore, StoreStatus, UserRecord

T = TypeVar("T")

# Users whose features (and, apart, whose histories) the embedded store keeps: the ones
# written last. Unbounded, any client could grow a worker without end (2,000 new users of 200
# long ids each: +124 MB); more users want Redis.
MAX_USERS = 10_000


class MemoryFeatureStore(FeatureStore):
    """The embedded store: a dict per key kind, same semantics as the Redis layout (cap,
    newest first, a TTL per key: a write renews its own key's, as Redis's EXPIRE does). Per
    process, the last MAX_USERS users written: for development and single boxes."""

    def __init__(self, history_cap: int, ttl_s: int = 0) -> None:
        self.history_cap = history_cap
        self.ttl_s = ttl_s
        self.max_users = MAX_USERS
        # user id -> (value, monotonic deadline; inf without a TTL)
        self._features: dict[str, tuple[dict[str, Any], float]] = {}
        self._history: dict[str, tuple[list[str], float]] = {}

    def _deadline(self) -> float:
        return time.monotonic() + self.ttl_s if self.ttl_s else math.inf

    @staticmethod
    def _live(table: dict[str, tuple[T, float]], user_id: str) -> T | None:
        found = table.get(user_id)
        if found is None:
            return None
        if found[1] <= time.monotonic():
            del table[user_id]
            return None
        return found[0]

    async def fetch_many(self, user_ids: Sequence[str]) -> dict[str, UserRecord]:
        out: dict[str, UserRecord] = {}
        for user_id in user_ids:
            features = self._live(self._features, user_id)
            history = self._live(self._history, user_id) or []
            found = features is not None or bool(history)
            out[user_id] = UserRecord(dict(features or {}), tuple(history), found)
        return out

    def _write(self, table: dict[str, tuple[T, float]], user_id: str, value: T) -> None:
        """Store `value` as the newest entry; the entry written longest ago goes past
        `max_users` (dicts keep insertion order)."""
        table.pop(user_id, None)
        table[user_id] = (value, self._deadline())
        if len(table) > self.max_users:
            del table[next(iter(table))]

    async def append_events(self, user_id: str, item_ids: Sequence[str]) -> int:
        stored = self._live(self._history, user_id) or []
        history = [*reversed(item_ids), *stored][: self.history_cap]
        self._write(self._history, user_id, history)
        return len(history)

    async def put_features(self, user_id: str, features: Mapping[str, Any]) -> None:
        self._write(self._features, user_id, dict(features))

    async def health(self) -> StoreStatus:
        return "disabled"
