"""The feature cache in front of the store never keeps a read that a write overtook."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from app.metrics import Metrics
from app.store import CachedFeatureStore, MemoryFeatureStore, UserRecord
from app.store.feature_cache import TTLCache


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


def test_the_cache_holds_only_live_records_and_drops_the_oldest_when_full() -> None:
    record = UserRecord(features={}, history=("i1",), found=True)
    cache = TTLCache(size=3, ttl_s=2.0)
    cache.put("a", record, now=0.0)
    cache.put("b", record, now=1.0)
    cache.put("a", record, now=1.5)  # put again: lives until 3.5, now the newest
    assert cache.get("a", now=2.5) is record
    # Records past their TTL are let go as soon as anything is put, not when the size bound
    # is reached: they can never be served again and would only hold memory.
    cache.put("c", record, now=3.2)
    assert len(cache) == 2  # b (expired at 3.0) is gone
    assert cache.get("b", now=3.2) is None
    cache.put("d", record, now=3.3)
    cache.put("e", record, now=3.4)  # full: the oldest insertion (a, expiring first) goes
    assert len(cache) == 3
    assert cache.get("a", now=3.4) is None
    assert [cache.get(k, now=3.4) for k in "cde"] == [record] * 3
    assert cache.get("c", now=5.2) is None  # expired on read
