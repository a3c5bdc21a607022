"""The feature cache: a small in-process TTL cache in front of the feature store (CACHE_SIZE,
CACHE_TTL_S), so a hot user's features are not read from Redis on every request."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

from app.errors import FeatureStoreUnavailable
from app.metrics import Metrics
from app.store.base import FeatureStore, StoreStatus, UserRecord


class TTLCache:
    """Map whose entries expire `ttl_s` after insertion, at most `size` of them. Event-loop
    only (no locking).

    Every entry lives the same `ttl_s`, so insertion order is expiry order: `put` drops the
    expired entries from the front, since a record past its TTL is never served again (left to
    the size bound, a worker kept 10,000 records of 200-item histories, ~90 MB more than the
    ~3,800 a 2 s TTL at ~1,900 recalls/s keeps alive: docs/performance.md), and when full the
    oldest, nearest to expiring.
    """

    def __init__(self, size: int, ttl_s: float) -> None:
        self.size = size
        self.ttl_s = ttl_s
        self._data: OrderedDict[str, tuple[float, UserRecord]] = OrderedDict()

    def get(self, key: str, now: float) -> UserRecord | None:
        entry = self._data.get(key)
        if entry is None:
            return None
        if entry[0] <= now:
            del self._data[key]
            return None
        return entry[1]

    def put(self, key: str, value: UserRecord, now: float) -> None:
        data = self._data
        data.pop(key, None)  # to the back: its expiry is now the latest
        data[key] = (now + self.ttl_s, value)
        while data and (len(data) > self.size or next(iter(data.values()))[0] <= now):
            data.popitem(last=False)

    def pop(self, key: str) -> None:
        self._data.pop(key, None)

    def __len__(self) -> int:
        return len(self._data)


class CachedFeatureStore(FeatureStore):
    """Reads through a TTL cache; this process's own writes invalidate the user's entry.

    Other processes' writes are seen after at most `ttl_s`. A read that overlaps one of our
    writes is not cached (the write counter moved while it was in flight), so a slow read can
    never put back what a write just replaced. Failed reads are never cached; when the store
    fails, the users found in the cache are still returned (the others are left out, as
    users the store does not hold), and only a read with no hit at all raises.
    """

    def __init__(self, inner: FeatureStore, size: int, ttl_s: float, metrics: Metrics) -> None:
        self.inner = inner
        self.history_cap = inner.history_cap
        self.cache = TTLCache(size, ttl_s)
        self.metrics = metrics
        self._writes = 0

    async def fetch_many(self, user_ids: Sequence[str]) -> dict[str, UserRecord]:
        now = time.monotonic()
        out: dict[str, UserRecord] = {}
        misses: list[str] = []
        for user_id in dict.fromkeys(user_ids):
            record = self.cache.get(user_id, now)
            if record is None:
                misses.append(user_id)
            else:
                out[user_id] = record
        self.metrics.cache_hits.inc(len(out))
        if misses:
            self.metrics.cache_misses.inc(len(misses))
            writes = self._writes
            try:
                fetched = await self.inner.fetch_many(misses)
            except FeatureStoreUnavailable:
                if not out:
                    raise
                # The hits are still good: only the misses degrade, as in any outage (one
                # request's miss must not change the answers of those batched with it).
                return out
            if writes == self._writes:
                now = time.monotonic()
                for user_id, record in fetched.items():
                    self.cache.put(user_id, record, now)
            out.update(fetched)
        return out

    def _invalidate(self, user_id: str) -> None:
        self._writes += 1
        self.cache.pop(user_id)

    async def append_events(self, user_id: str, item_ids: Sequence[str]) -> int:
        try:
            return await self.inner.append_events(user_id, item_ids)
        finally:  # also on failure: the write may have landed before the timeout
            self._invalidate(user_id)

    async def put_features(self, user_id: str, features: Mapping[str, Any]) -> None:
        try:
            await self.inner.put_features(user_id, features)
        finally:
            self._invalidate(user_id)

    async def health(self) -> StoreStatus:
        return await self.inner.health()

    async def aclose(self) -> None:
        await self.inner.aclose()
