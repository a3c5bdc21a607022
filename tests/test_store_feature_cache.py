"""The feature cache in front of the store never keeps a read that a write overtook."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from app.metrics import Metrics
from app.store import CachedFeatureStore, MemoryFeatureStore, UserRecord


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
