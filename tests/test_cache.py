"""`VectorCache`: keyed by exactly what was encoded, one entry per user, bounded; the feature
cache never keeps a read that a write overtook."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np
import pytest

from app.cache import CachedFeatureStore, VectorCache
from app.feature_store import MemoryFeatureStore, UserRecord
from app.metrics import Metrics


def test_key_covers_version_features_and_history() -> None:
    key = VectorCache.key
    base = key("v1", {"country": "DE", "activity": 3}, ["i1", "i2"])
    assert base == key("v1", {"activity": 3, "country": "DE"}, ("i1", "i2"))  # canonical
    others = [
        key("v2", {"country": "DE", "activity": 3}, ["i1", "i2"]),
        key("v1", {"country": "FR", "activity": 3}, ["i1", "i2"]),
        key("v1", {"country": "DE", "activity": 3.0}, ["i1", "i2"]),
        key("v1", {"country": "DE", "activity": 3, "age_group": None}, ["i1", "i2"]),
        key("v1", {"country": "DE", "activity": 3}, ["i2", "i1"]),
        key("v1", {"country": "DE", "activity": 3}, ["i1"]),
    ]
    assert base not in others and len(set(others)) == len(others)


def test_one_entry_per_user_least_recently_used_evicted() -> None:
    cache = VectorCache(2, Metrics())
    k1, k2 = VectorCache.key("v", {}, ["a"]), VectorCache.key("v", {}, ["b"])
    assert k1 is not None and k2 is not None
    cache.put("u1", k1, np.ones(3, dtype=np.float32))
    cache.put("u2", k1, np.zeros(3, dtype=np.float32))
    assert cache.get("u1", k2) is None  # other inputs: never the stored vector
    assert cache.get("u1", k1) is not None  # u1 is now the most recent
    cache.put("u3", k1, np.zeros(3, dtype=np.float32))
    assert len(cache) == 2 and cache.get("u2", k1) is None
    cache.put("u1", k2, np.full(3, 2, dtype=np.float32))  # replaces u1's entry
    assert len(cache) == 2 and cache.get("u1", k1) is None
    np.testing.assert_array_equal(cache.get("u1", k2), [2, 2, 2])


def test_size_zero_caches_nothing() -> None:
    cache = VectorCache(0, Metrics())
    key = VectorCache.key("v", {}, [])
    assert key is not None
    cache.put("u", key, np.ones(2, dtype=np.float32))
    assert len(cache) == 0 and cache.get("u", key) is None


class HeldStore(MemoryFeatureStore):
    """The embedded store, whose reads can be held after they have read (a slow reply)."""

    def __init__(self) -> None:
        super().__init__(history_cap=10)
        self.hold: asyncio.Event | None = None

    async def fetch_many(self, user_ids: Sequence[str]) -> dict[str, UserRecord]:
        records = await super().fetch_many(user_ids)
        if self.hold is not None:
            await self.hold.wait()
        return records


@pytest.mark.anyio
async def test_a_read_overlapping_a_write_is_not_cached() -> None:
    inner = HeldStore()
    store = CachedFeatureStore(inner, size=10, ttl_s=60.0, metrics=Metrics())
    await store.append_events("u1", ["i1"])
    inner.hold = asyncio.Event()
    slow = asyncio.create_task(store.fetch_many(["u1"]))  # reads ["i1"], then waits
    await asyncio.sleep(0)
    await store.append_events("u1", ["i2"])  # lands while the read is in flight
    inner.hold.set()
    assert (await slow)["u1"].history == ("i1",)  # what it read, before the write
    inner.hold = None
    # Had the stale read been cached, this would still be ("i1",) for the TTL's 60 s.
    assert (await store.fetch_many(["u1"]))["u1"].history == ("i2", "i1")
