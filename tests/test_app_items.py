"""Items added, changed and deleted at serving time (app/catalogue), through HTTP in process
(the app's real lifespan), with bundles trained by the real trainer (tests/helpers_items.py):
retrieval of added items, deletions, seen items, filters, exactness, replicas sharing a real
Redis through reloads, and the per-process log without Redis. Refusals:
tests/test_app_items_errors.py; two real uvicorn workers: tests/test_app_items_workers.py."""

from __future__ import annotations

from pathlib import Path

import anyio
import numpy as np
import pytest
from helpers_app import make_settings, serve
from helpers_items import (
    ADMIN,
    ItemBundles,
    categories,
    delete,
    kind_of,
    model_dir_of,
    put,
    ready_version,
    recall,
    state,
    trained_item_bundles,
)

from app.main import create_app


@pytest.fixture(scope="module")
def item_bundles(tmp_path_factory: pytest.TempPathFactory) -> ItemBundles:
    return trained_item_bundles(tmp_path_factory)


@pytest.fixture
def item_model_dir(tmp_path: Path, item_bundles: ItemBundles) -> Path:
    return model_dir_of(tmp_path / "artifacts", item_bundles)


pytestmark = pytest.mark.anyio


async def test_an_added_item_is_recalled_by_the_users_of_its_kind(
    item_model_dir: Path, item_bundles: ItemBundles
) -> None:
    ranks = {}
    async with serve(make_settings(item_model_dir)) as client:
        for category in categories(item_bundles.dataset):
            kind = kind_of(item_bundles.dataset, category)
            like, unlike = f"like-{category}", f"unlike-{category}"
            body = await put(client, like, kind.like)
            assert body["status"] == "added" and body["attributes"] == kind.like
            await put(client, unlike, kind.unlike)
            found = await recall(client, kind.history, k=250)
            assert like in found and unlike in found  # k covers catalogue and overlay
            ranks[category] = (found.index(like), found.index(unlike))
            for item in (like, unlike):
                await delete(client, item)
    # Every kind ranks its own new item above one of another kind; most in their top 10.
    assert all(mine < other for mine, other in ranks.values()), ranks
    assert sum(mine < 10 for mine, _ in ranks.values()) >= 7, ranks


async def test_a_deleted_item_is_never_returned_until_it_is_put_again(
    item_model_dir: Path, item_bundles: ItemBundles
) -> None:
    kind = kind_of(item_bundles.dataset, "c0")
    async with serve(make_settings(item_model_dir)) as client:
        await put(client, "new-1", kind.like)
        top = await recall(client, kind.history, k=5)
        catalogue_item = next(i for i in top if i != "new-1")
        assert "new-1" in await recall(client, kind.history)
        deleted = await delete(client, catalogue_item)
        assert (deleted["status"], deleted["attributes"]) == ("deleted", None)
        assert (await delete(client, "new-1"))["status"] == "deleted"
        seen = len(kind.history)
        for history, exclude_seen, expected in (
            (kind.history, True, 200 - seen - 1),
            (kind.history, False, 200 - 1),
            ([], True, 200 - 1),
        ):
            found = await recall(client, history, k=250, exclude_seen=exclude_seen)
            assert catalogue_item not in found and "new-1" not in found
            assert len(found) == expected
        batch = await client.post(
            "/v1/recall/batch",
            json={"requests": [{"user_id": "u", "k": 250, "history": kind.history}]},
        )
        assert catalogue_item not in [i["item_id"] for i in batch.json()["results"][0]["items"]]
        state = await client.get(f"/v1/items/{catalogue_item}")
        assert state.json()["status"] == "deleted"
        # Put again: the catalogue item serves from its bundle, the new one from the overlay.
        assert (await put(client, catalogue_item, {}))["status"] == "catalogue"
        assert (await put(client, "new-1", kind.like))["status"] == "added"
        found = await recall(client, kind.history, k=250)
        assert catalogue_item in found and "new-1" in found


async def test_an_added_item_the_user_has_seen_is_left_out_unless_asked(
    item_model_dir: Path, item_bundles: ItemBundles
) -> None:
    kind = kind_of(item_bundles.dataset, "c0")
    async with serve(make_settings(item_model_dir)) as client:
        await put(client, "new-1", kind.like)
        assert "new-1" in await recall(client, kind.history, k=250)
        seen = ["new-1", *kind.history]
        assert "new-1" not in await recall(client, seen, k=250)
        assert "new-1" in await recall(client, seen, k=250, exclude_seen=False)
        # From the stored history too (an event names the added item).
        events = {"item_ids": [*kind.history, "new-1"]}
        assert (await client.post("/v1/users/u-seen/events", json=events)).status_code == 200
        stored = await client.post("/v1/recall", json={"user_id": "u-seen", "k": 250})
        assert "new-1" not in [item["item_id"] for item in stored.json()["items"]]


async def test_ids_holding_a_slash_are_reachable_by_their_routes(
    item_model_dir: Path, item_bundles: ItemBundles
) -> None:
    """A catalogue's ids may hold "/" (`sku/123`), which recall bodies accept; the item and
    user routes must reach them too, sent as %2F (a plain path parameter answered 404)."""
    kind = kind_of(item_bundles.dataset, "c0")
    async with serve(make_settings(item_model_dir)) as client:
        assert (await put(client, "sku/1", kind.like))["item_id"] == "sku/1"
        assert await state(client, "sku/1") == ("added", item_bundles.v1.name)
        assert "sku/1" in await recall(client, kind.history, k=250)
        events = {"item_ids": [*kind.history, "sku/1"]}
        response = await client.post("/v1/users/team%2Fu1/events", json=events)
        assert response.status_code == 200 and response.json()["user_id"] == "team/u1"
        features = await client.put("/v1/users/team%2Fu1/features", json={"features": {}})
        assert features.status_code == 200 and features.json()["user_id"] == "team/u1"
        stored = await client.post("/v1/recall", json={"user_id": "team/u1", "k": 250})
        assert "sku/1" not in [item["item_id"] for item in stored.json()["items"]]  # seen
        assert (await delete(client, "sku/1"))["status"] == "deleted"
        assert "sku/1" not in await recall(client, kind.history, k=250)


async def test_changes_reach_every_replica_follow_reloads_and_a_bundle_holding_the_item_wins(
    item_model_dir: Path, item_bundles: ItemBundles, redis_url: str, redis_prefix: str
) -> None:
    v1, v2 = item_bundles.v1.name, item_bundles.v2.name
    settings = make_settings(
        item_model_dir, redis_url=redis_url, redis_prefix=redis_prefix, reload_poll_s=0.05
    )
    kind = kind_of(item_bundles.dataset, "c0")
    async with serve(settings) as first:
        # i210 is in v2's catalogue only: an added item on v1.
        assert (await put(first, "i210", kind.like))["status"] == "added"
        await put(first, "new-1", kind.like)
        top = await recall(first, kind.history, k=5)
        victim = next(item for item in top if item not in ("i210", "new-1"))
        await delete(first, victim)
        async with serve(settings) as second:  # started later: replays the log
            assert await state(second, "i210") == ("added", v1)
            assert await state(second, victim) == ("deleted", v1)
            await put(second, "new-2", kind.unlike)  # the first follows within its poll
            with anyio.fail_after(10):
                while (await first.get("/v1/items/new-2")).status_code != 200:
                    await anyio.sleep(0.02)
            reload = await second.post("/admin/reload", json={"version": v2}, headers=ADMIN)
            assert reload.status_code == 200
            await ready_version(first, v2)
            for client in (first, second):
                assert await state(client, "i210") == ("catalogue", v2)  # the bundle wins
                assert await state(client, "new-1") == ("added", v2)
                assert await state(client, victim) == ("deleted", v2)
                found = await recall(client, kind.history, k=300)
                assert found.count("i210") == 1 and "new-1" in found and "new-2" in found
                assert victim not in found and len(found) == len(set(found))
            await second.post("/admin/reload", json={"version": v1}, headers=ADMIN)
            await ready_version(first, v1)
            assert await state(first, "i210") == ("added", v1)
        metrics = (await first.get("/metrics")).text
        assert "tower_recall_overlay_items 3.0" in metrics  # i210, new-1, new-2 on v1
        assert "tower_recall_masked_items 1.0" in metrics
        assert 'tower_recall_item_changes_total{op="delete"} 1.0' in metrics


async def test_without_the_watcher_a_worker_reads_the_changes_at_each_load(
    item_model_dir: Path, item_bundles: ItemBundles, redis_url: str, redis_prefix: str
) -> None:
    """RELOAD_POLL_S=0 turns the watcher off: a worker then read the log only when it wrote,
    and every bundle it loaded got its own stale copy, so an item deleted through another
    worker was served on, through any number of reloads."""
    v1, v2 = item_bundles.v1.name, item_bundles.v2.name
    settings = make_settings(
        item_model_dir, redis_url=redis_url, redis_prefix=redis_prefix, reload_poll_s=0
    )
    kind = kind_of(item_bundles.dataset, "c0")
    async with serve(settings) as first, serve(settings) as second:
        victim = (await recall(second, kind.history, k=5))[0]
        await delete(first, victim)
        await put(first, "new-1", kind.like)
        assert await state(second, victim) == ("catalogue", v1)  # no timer: not yet
        assert (await second.post("/admin/reload", json={"version": v2}, headers=ADMIN)).is_success
        assert await state(second, victim) == ("deleted", v2)
        assert await state(second, "new-1") == ("added", v2)
        found = await recall(second, kind.history, k=300)
        assert victim not in found and "new-1" in found


async def test_without_redis_the_changes_are_the_process_own_and_outlive_reloads(
    item_model_dir: Path, item_bundles: ItemBundles
) -> None:
    kind = kind_of(item_bundles.dataset, "c0")
    settings = make_settings(item_model_dir)
    async with serve(settings) as first, serve(settings) as second:
        await put(first, "new-1", kind.like)
        assert (await second.get("/v1/items/new-1")).status_code == 404
        assert "new-1" not in await recall(second, kind.history, k=250)
        body = {"version": item_bundles.v2.name}
        assert (await first.post("/admin/reload", json=body, headers=ADMIN)).status_code == 200
        assert await state(first, "new-1") == ("added", item_bundles.v2.name)
        assert "new-1" in await recall(first, kind.history, k=300)


async def test_request_filters_judge_added_items_by_their_attributes(
    item_model_dir: Path, item_bundles: ItemBundles
) -> None:
    kind = kind_of(item_bundles.dataset, "c0")
    async with serve(make_settings(item_model_dir)) as client:
        await put(client, "like", kind.like)
        await put(client, "unlike", kind.unlike)
        for where, wanted in (
            ({"include": {"category": ["c0"]}}, {"like"}),
            ({"exclude": {"category": ["c0"]}}, {"unlike"}),
            ({"allow_ids": ["unlike", "i3"]}, {"unlike"}),
            ({"deny_ids": ["like"]}, {"unlike"}),
        ):
            found = set(await recall(client, kind.history, k=250, filter=where))
            assert found & {"like", "unlike"} == wanted, where
        only = await recall(client, [], k=5, filter={"allow_ids": ["like", "gone"]})
        assert only == ["like"]
        await delete(client, "like")
        assert await recall(client, [], k=5, filter={"allow_ids": ["like", "gone"]}) == []


async def test_a_filter_value_only_added_items_have_is_known_while_they_are(
    item_model_dir: Path, item_bundles: ItemBundles
) -> None:
    kind = kind_of(item_bundles.dataset, "c0")
    where = {"include": {"category": ["c-new"], "tags": ["t-new"]}}
    body = {"user_id": "u-items", "k": 5, "history": kind.history, "filter": where}
    async with serve(make_settings(item_model_dir)) as client:
        refused = await client.post("/v1/recall", json=body)
        assert refused.status_code == 422
        assert refused.json()["detail"][0]["type"] == "filter_unknown_value"
        await put(client, "fresh", {**kind.like, "category": "c-new", "tags": ["t-new"]})
        assert await recall(client, kind.history, k=5, filter=where) == ["fresh"]
        # Gone with the item (the worker's compiled filter said 200 still, where a worker
        # compiling it afresh said 422).
        await delete(client, "fresh")
        gone = await client.post("/v1/recall", json=body)
        assert (
            gone.status_code == 422 and gone.json()["detail"][0]["type"] == "filter_unknown_value"
        )


@pytest.mark.parametrize("masked", [False, True], ids=["excluded", "masked"])
async def test_recall_with_changes_is_the_exact_top_k_of_the_changed_catalogue(
    item_model_dir: Path, item_bundles: ItemBundles, masked: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Against a brute-force search of the bundle's vectors and the added items' vectors
    together, deleted and seen items left out: the deleted rows excluded per query, or (past
    MASK_MIN_ROWS, here lowered to 1) the overlay's mask; filtered too."""
    if masked:
        monkeypatch.setattr("app.search.overlay.MASK_MIN_ROWS", 1)
    app = create_app(make_settings(item_model_dir))
    async with serve(app) as client:
        for category in categories(item_bundles.dataset)[:6]:
            await put(client, f"like-{category}", kind_of(item_bundles.dataset, category).like)
        kind = kind_of(item_bundles.dataset, "c0")
        top = [i for i in await recall(client, kind.history, k=20) if not i.startswith("like")]
        for item in top[:8:2]:
            await delete(client, item)
        model = app.state.services.repository.require()
        overlay = model.overlay
        assert (len(overlay), len(overlay.masked)) == (6, 4)
        assert (overlay.allowed is not None) == masked
        user = model.encode([{}], [kind.history])[0]
        ids = [*model.item_ids, *overlay.ids]
        scores = np.concatenate([model.index.matrix.numpy() @ user, overlay.vectors @ user])
        hidden = set(kind.history) | {model.item_ids[row] for row in overlay.masked}
        ranked = [i for i in np.argsort(-scores, kind="stable") if ids[i] not in hidden]
        order = ranked[:60]
        body = {"user_id": "u-exact", "k": 60, "history": kind.history}
        items = (await client.post("/v1/recall", json=body)).json()["items"]
        assert [i["item_id"] for i in items] == [ids[i] for i in order]
        np.testing.assert_allclose([i["score"] for i in items], scores[order], atol=1e-5)
        # Filtered: the items of every other category (the deleted ones among them).
        table = item_bundles.dataset.items
        c0 = {str(i) for i in table.index[table["category"] == "c0"]} | {"like-c0"}
        assert {model.item_ids[row] for row in overlay.masked} - c0
        where = {"exclude": {"category": ["c0"]}}
        found = await recall(client, kind.history, k=60, filter=where)
        assert found == [ids[i] for i in ranked if ids[i] not in c0][:60]
