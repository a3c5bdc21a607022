"""The embedded store, in process: what serves when REDIS_URL is empty."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from app.store.base import FeatureStore, StoreStatus, UserRecord

T = TypeVar("T")


class MemoryFeatureStore(FeatureStore):
    """The embedded store: a dict per key kind, same semantics as the Redis layout (cap,
    newest first, a TTL per key: a write renews its own key's, as Redis's EXPIRE does). Per
    process, unbounded in users: for development and single boxes."""

    def __init__(self, history_cap: int, ttl_s: int = 0) -> None:
        self.history_cap = history_cap
        self.ttl_s = ttl_s
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

    async def append_events(self, user_id: str, item_ids: Sequence[str]) -> int:
        stored = self._live(self._history, user_id) or []
        history = [*reversed(item_ids), *stored][: self.history_cap]
        self._history[user_id] = (history, self._deadline())
        return len(history)

    async def put_features(self, user_id: str, features: Mapping[str, Any]) -> None:
        self._features[user_id] = (dict(features), self._deadline())

    async def health(self) -> StoreStatus:
        return "disabled"
