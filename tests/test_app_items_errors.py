"""Item writes refused, through HTTP in process (the app's real lifespan): bad input of every
kind, a bundle without item tower, the admin API off, Redis down. Each refusal is a 4xx (or a
503 for Redis) with its reason, and changes nothing."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
import redis
from helpers_app import RedisServer, admin_headers, make_settings, serve
from helpers_items import (
    ADMIN,
    ItemBundles,
    add_format_1,
    delete,
    kind_of,
    model_dir_of,
    put,
    recall,
    state,
    trained_item_bundles,
)

from app.config import RedisConfig
from app.store import build_item_change_log, new_change
from models.redis_keys import item_change_keys

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def item_bundles(tmp_path_factory: pytest.TempPathFactory) -> ItemBundles:
    return trained_item_bundles(tmp_path_factory)


@pytest.fixture
def item_model_dir(tmp_path: Path, item_bundles: ItemBundles) -> Path:
    return model_dir_of(tmp_path / "artifacts", item_bundles)


async def test_bad_item_writes_get_4xx_with_the_reason_and_change_nothing(
    item_model_dir: Path, item_bundles: ItemBundles
) -> None:
    old = add_format_1(item_model_dir, item_bundles)
    good = {"attributes": {"category": "c0"}}
    async with serve(make_settings(item_model_dir)) as client:
        unknown = await client.put(
            "/v1/items/x", json={"attributes": {"colour": "red"}}, headers=ADMIN
        )
        assert (unknown.status_code, unknown.json()) == (422, {"detail": [{
            "type": "unknown_attribute", "loc": ["body", "attributes", "colour"],
            "msg": "Unknown item attribute 'colour'; this model's item tower reads: "
            "category, tags, price",
            "input": "colour",
        }]})  # fmt: skip
        typed = await client.put(
            "/v1/items/x", json={"attributes": {"price": "cheap"}}, headers=ADMIN
        )
        assert typed.status_code == 422
        assert [(e["type"], e["loc"]) for e in typed.json()["detail"]] == [
            ("attribute_type", ["body", "attributes", "price"])
        ]
        for body, kind in (
            ({**good, "extra": 1}, "extra_forbidden"),
            ({}, "missing"),
            ({"attributes": {"tags": [1, 2]}}, "string_type"),
        ):
            response = await client.put("/v1/items/x", json=body, headers=ADMIN)
            assert response.status_code == 422
            assert kind in {e["type"] for e in response.json()["detail"]}
        for path in ("/v1/items/" + "x" * 257, "/v1/items/a%01b"):
            assert (await client.put(path, json=good, headers=ADMIN)).status_code == 422
            assert (await client.delete(path, headers=ADMIN)).status_code == 422
        assert (await client.put("/v1/items/x", json=good)).status_code == 401
        wrong = admin_headers("wrong")
        assert (await client.delete("/v1/items/x", headers=wrong)).status_code == 401
        missing = await client.get("/v1/items/x")
        assert (missing.status_code, missing.json()) == (
            404, {"detail": "no item 'x' in the catalogue or its changes"}
        )  # fmt: skip
        assert (await put(client, "kept", {"category": "c0"}))["status"] == "added"
        # A bundle without item tower cannot add items; deletions still work.
        reload = await client.post("/admin/reload", json={"version": old}, headers=ADMIN)
        assert reload.status_code == 200, reload.text
        refused = await client.put("/v1/items/x", json=good, headers=ADMIN)
        assert refused.status_code == 409
        assert refused.json()["detail"].startswith(f"bundle {old} has no item tower")
        assert (await client.get("/v1/items/x")).status_code == 404
        assert await state(client, "kept") == ("not_served", old)
        assert (await delete(client, "i3"))["status"] == "deleted"
        found = await recall(client, [], k=250)
        assert "i3" not in found and "kept" not in found and len(found) == 199
    async with serve(make_settings(item_model_dir, admin_token="")) as client:
        assert (await client.put("/v1/items/x", json=good, headers=ADMIN)).status_code == 403


async def test_with_redis_down_a_write_is_refused_and_the_changes_serve_on(
    item_model_dir: Path, item_bundles: ItemBundles
) -> None:
    kind = kind_of(item_bundles.dataset, "c0")
    server = RedisServer().start()
    try:
        async with serve(make_settings(item_model_dir, redis_url=server.url)) as client:
            await put(client, "new-1", kind.like)
            server.kill()
            response = await client.put(
                "/v1/items/new-2", json={"attributes": kind.like}, headers=ADMIN
            )
            assert response.status_code == 503
            assert response.json()["detail"].startswith("the item change log is unavailable: ")
            assert (await client.delete("/v1/items/new-1", headers=ADMIN)).status_code == 503
            assert (await client.get("/v1/items/new-2")).status_code == 404
            assert "new-1" in await recall(client, kind.history, k=250)
    finally:
        server.stop()


async def test_a_change_read_back_after_its_write_failed_is_counted_once(
    item_model_dir: Path, item_bundles: ItemBundles
) -> None:
    """The write succeeds and its read-back fails: the worker serves its own change, and the
    next poll reads that change again: it is not a new one (it was counted and logged
    twice)."""
    kind = kind_of(item_bundles.dataset, "c0")
    server = RedisServer().start()
    admin = redis.Redis.from_url(server.url)
    try:
        settings = make_settings(item_model_dir, redis_url=server.url, reload_poll_s=0.05)
        async with serve(settings) as client:
            admin.execute_command("ACL", "SETUSER", "default", "-zrangebyscore")  # reads fail
            assert (await put(client, "new-1", kind.like))["status"] == "added"
            await anyio.sleep(0.2)  # polls that fail
            admin.execute_command("ACL", "SETUSER", "default", "+zrangebyscore")
            await put(client, "new-2", kind.like)  # read back with new-1: both in the log
            await anyio.sleep(0.2)
            metrics = (await client.get("/metrics")).text
        assert 'tower_recall_item_changes_total{op="put"} 2.0' in metrics
    finally:
        admin.close()
        server.stop()


async def test_after_a_failover_lost_the_latest_changes_a_worker_serves_what_the_log_holds(
    item_model_dir: Path, item_bundles: ItemBundles
) -> None:
    """A replica promoted before it had the last two changes numbers the next ones 4, 5...
    again, under the same epoch: a worker that had read up to 5 skipped the new 4 and 5 for
    good and served the lost items, while a worker started afterwards did the opposite."""
    kind = kind_of(item_bundles.dataset, "c0")
    server = RedisServer().start()
    admin = redis.Redis.from_url(server.url)
    settings = make_settings(item_model_dir, redis_url=server.url, reload_poll_s=0.05)
    writer = build_item_change_log(RedisConfig.from_settings(settings))
    try:
        async with serve(settings) as client:
            for n in range(1, 6):
                await put(client, f"new-{n}", kind.like)
            seq, changes, order, _ = item_change_keys(settings.redis_prefix)
            admin.set(seq, 3)  # the replica had changes 1 to 3 only
            admin.hdel(changes, "new-4", "new-5")
            admin.zrem(order, "new-4", "new-5")
            for n in (6, 7, 8):  # other workers write on: numbered 4, 5, 6
                await writer.append(new_change(f"new-{n}", kind.like))
            for _ in range(100):  # polls every 0.05 s
                if (await client.get("/v1/items/new-8")).status_code == 200:
                    break
                await anyio.sleep(0.05)
            for n in (1, 2, 3, 6, 7, 8):
                assert (await state(client, f"new-{n}"))[0] == "added", n
            for n in (4, 5):
                assert (await client.get(f"/v1/items/new-{n}")).status_code == 404, n
    finally:
        await writer.aclose()
        admin.close()
        server.stop()
