"""The embedded store, in process: what serves when REDIS_URL is empty."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from app.store.base import FeatureStore, StoreStatus, UserRecord


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
