"""The item change log (app/store/item_changes*.py) on a real Redis, a real Redis Cluster and
in process, and this worker's copy of it (`app.catalogue.ChangeSet`): numbered in order, the
latest change per item, read in pages, and replayed from the start after a loss."""

from __future__ import annotations

import pytest
import redis

from app.catalogue import ChangeSet
from app.config import RedisConfig
from app.errors import ItemChangesUnavailable
from app.store import (
    ItemChangeLog,
    MemoryItemChangeLog,
    RedisItemChangeLog,
    build_item_change_log,
    new_change,
)
from models.redis_keys import item_change_keys

pytestmark = pytest.mark.anyio


def redis_config(url: str, prefix: str, cluster: bool = False) -> RedisConfig:
    return RedisConfig(
        url=url, cluster=cluster, prefix=prefix, timeout_s=1.0, pool_wait_s=0.5, stall_s=2.0,
        retry_after_s=0.1, max_connections=4, control_timeout_s=1.0, control_pool_wait_s=0.5,
    )  # fmt: skip


async def exercise(log: ItemChangeLog) -> None:
    """Writes a put, a delete and a second put of one item; reads them back in pages."""
    empty = await log.read(0, 10)
    assert (empty.epoch, empty.head, empty.changes, empty.last) == (None, 0, [], 0)
    epoch, first = await log.append(new_change("a", {"category": "c1", "tags": ["t1"]}))
    assert first.seq == 1 and first.attributes == {"category": "c1", "tags": ["t1"]}
    assert (await log.append(new_change("b", None)))[1].seq == 2
    again_epoch, again = await log.append(new_change("a", {"price": 3.5}))
    assert again.seq == 3 and again_epoch == epoch
    page = await log.read(0, 1)  # "a" moved past "b": its latest change is number 3
    assert (page.epoch, page.head, [c.item_id for c in page.changes], page.last) == (
        epoch, 3, ["b"], 2,
    )  # fmt: skip
    assert page.changes[0].deleted
    rest = await log.read(page.last, 10)
    assert [(c.item_id, c.seq, c.attributes) for c in rest.changes] == [("a", 3, {"price": 3.5})]
    assert (await log.read(3, 10)).changes == []


async def test_the_in_process_log() -> None:
    log = build_item_change_log(None)
    assert isinstance(log, MemoryItemChangeLog) and not log.shared
    await exercise(log)


async def test_the_redis_log_and_its_keys(redis_url: str, redis_prefix: str) -> None:
    log = build_item_change_log(redis_config(redis_url, redis_prefix))
    assert isinstance(log, RedisItemChangeLog) and log.shared
    try:
        await exercise(log)
    finally:
        await log.aclose()
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        seq, changes, order, epoch = item_change_keys(redis_prefix)
        assert seq == f"{redis_prefix}:catalogue:{{items}}:seq"
        assert client.get(seq) == "3" and client.zscore(order, "a") == 3.0
        assert sorted(client.hkeys(changes)) == ["a", "b"] and len(client.get(epoch) or "") == 32
        client.hset(changes, "b", "not json")  # what a reader cannot trust is skipped
    finally:
        client.close()
    log = build_item_change_log(redis_config(redis_url, redis_prefix))
    try:
        page = await log.read(0, 10)
        assert [c.item_id for c in page.changes] == ["a"] and page.last == 3
    finally:
        await log.aclose()


async def test_the_log_on_a_redis_cluster_keeps_one_slot(
    redis_cluster_url: str, cluster_prefix: str
) -> None:
    client = redis.RedisCluster.from_url(redis_cluster_url)
    try:
        assert len({client.keyslot(key) for key in item_change_keys(cluster_prefix)}) == 1
    finally:
        client.close()
    log = build_item_change_log(redis_config(redis_cluster_url, cluster_prefix, cluster=True))
    try:
        await exercise(log)
    finally:
        await log.aclose()


async def test_an_unreachable_log_says_so() -> None:
    log = build_item_change_log(redis_config("redis://127.0.0.1:1/0", "x"))
    try:
        with pytest.raises(ItemChangesUnavailable, match=r"^the item change log is unavailable: "):
            await log.append(new_change("a", None))
        with pytest.raises(ItemChangesUnavailable):
            await log.read(0, 10)
    finally:
        await log.aclose()


async def test_a_change_set_replays_another_log_from_the_start() -> None:
    log = MemoryItemChangeLog()
    epoch, change = await log.append(new_change("a", {"category": "c1"}))
    page = await log.read(0, 10)
    changes = ChangeSet.empty().merged(page.epoch, page.changes, page.last)
    assert (changes.epoch, changes.seq, changes.revision) == (epoch, 1, 1)
    assert not changes.is_other_log(await log.read(1, 10))
    # The same change delivered twice (a write, then a read) is applied once.
    assert changes.merged(epoch, [change], 1).items["a"] is changes.items["a"]
    lost = MemoryItemChangeLog()  # Redis flushed: an empty log, or another epoch
    assert changes.is_other_log(await lost.read(1, 10))
    await lost.append(new_change("b", None))
    assert changes.is_other_log(await lost.read(1, 10))
    assert changes.tag(change) == f"{epoch}:1"


async def test_a_read_knows_whether_the_log_still_holds_what_the_reader_read(
    redis_url: str, redis_prefix: str
) -> None:
    log = build_item_change_log(redis_config(redis_url, redis_prefix))
    try:
        for item in ("a", "b", "c"):
            await log.append(new_change(item, None))
        page = await log.read(0, 2)
        changes = ChangeSet.empty().merged(page.epoch, page.changes, page.last)
        assert (changes.seq, changes.last_item) == (2, "b")
        await log.append(new_change("b", None))  # b changed again: number 4, 2 left empty
        assert (await log.read(2, 10, "b")).follows
        assert not changes.is_other_log(await log.read(changes.seq, 10, changes.last_item))
        assert not (await log.read(2, 10, "a")).follows  # a holds 1: the log moved under us
        assert not (await log.read(3, 10, "b")).follows  # c holds 3, not b
        assert not (await log.read(2, 10, "zz")).follows  # an item the log never had
    finally:
        await log.aclose()
