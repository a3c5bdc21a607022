"""Recall semantics over HTTP: exact results, seen-item exclusion, precedence, cold start,
events and features changing the next recall, batches, approximate indexes."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import pytest
import redis
from conftest import Bundles
from helpers_app import Reference, assert_same_recall, make_settings, serve

from app.store import memory
from models.online_store import publish, user_records

pytestmark = [pytest.mark.anyio]


@pytest.fixture(scope="module")
def reference(bundles: Bundles) -> Reference:
    return Reference(bundles.v1)


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest, redis_url: str, redis_prefix: str) -> dict[str, str]:
    """Settings of either online store: the embedded one or Redis; same semantics."""
    if request.param == "memory":
        return {"redis_url": ""}
    return {"redis_url": redis_url, "redis_prefix": redis_prefix}


async def test_stored_user_equals_brute_force_over_redis(
    model_dir: Path,
    bundles: Bundles,
    reference: Reference,
    redis_url: str,
    redis_prefix: str,
    redis_client: redis.Redis,
) -> None:
    # Features and history written by the trainer side's `publish`: same key layout.
    publish(redis_client, bundles.dataset_v1, prefix=redis_prefix, history_length=100)
    stored = {u: (f, h) for u, f, h in user_records(bundles.dataset_v1, 100)}
    settings = make_settings(model_dir, redis_url=redis_url, redis_prefix=redis_prefix)
    async with serve(settings) as client:
        for user_id in ("u0", "u7", "u123"):
            features, history = stored[user_id]
            assert history, "synthetic users have history"
            response = await client.post("/v1/recall", json={"user_id": user_id, "k": 20})
            assert response.status_code == 200
            body = response.json()
            assert body["feature_source"] == "redis"
            assert body["model_version"] == bundles.v1.name
            assert_same_recall(body["items"], reference.top_k(features, history, 20))
            assert not {i["item_id"] for i in body["items"]} & set(history)


async def test_request_fields_equal_brute_force(model_dir: Path, reference: Reference) -> None:
    features = {"age_group": "25-34", "country": "DE", "activity": 40.5}
    history = ["i3", "i17", "i150"]
    async with serve(make_settings(model_dir)) as client:
        body = {"user_id": "x", "k": 30, "features": features, "history": history}
        response = (await client.post("/v1/recall", json=body)).json()
        assert response["feature_source"] == "request"
        assert_same_recall(response["items"], reference.top_k(features, history, 30))
        scores = [i["score"] for i in response["items"]]
        assert scores == sorted(scores, reverse=True)

        kept = (await client.post("/v1/recall", json={**body, "exclude_seen": False})).json()
        assert_same_recall(kept["items"], reference.top_k(features, history, 30, False))


async def test_seen_items_excluded_and_still_exactly_k(
    model_dir: Path, reference: Reference
) -> None:
    # 100 of the 200 items are seen, among them the user's best: the search must over-fetch.
    ranked = [item for item, _ in reference.top_k({}, [], 200, exclude_seen=False)]
    history = ranked[:100:2] + ranked[150:]
    async with serve(make_settings(model_dir)) as client:
        body = {"user_id": "heavy", "k": 50, "history": history}
        items = (await client.post("/v1/recall", json=body)).json()["items"]
        assert len(items) == 50
        assert not {i["item_id"] for i in items} & set(history)
        assert_same_recall(items, reference.top_k({}, history, 50))
        # Only 100 unseen items exist: asking for more returns all of them, no error.
        items = (await client.post("/v1/recall", json={**body, "k": 120})).json()["items"]
        assert sorted(i["item_id"] for i in items) == sorted(set(reference.item_ids) - set(history))


async def test_unknown_history_items_are_ignored(model_dir: Path) -> None:
    async with serve(make_settings(model_dir)) as client:
        base = {"user_id": "u1", "k": 10}
        known = (await client.post("/v1/recall", json={**base, "history": ["i1", "i2"]})).json()
        mixed = {**base, "history": ["nope", "i1", "also-unknown", "i2"]}
        with_unknown = (await client.post("/v1/recall", json=mixed)).json()
        assert with_unknown["items"] == known["items"]


async def test_cold_start_and_feature_source_precedence(
    model_dir: Path, reference: Reference, store: dict[str, str]
) -> None:
    settings = make_settings(model_dir, **store)
    async with serve(settings) as client:
        cold = (await client.post("/v1/recall", json={"user_id": "new-user", "k": 10})).json()
        assert cold["feature_source"] == "default"
        assert_same_recall(cold["items"], reference.top_k({}, [], 10))

        stored = {"age_group": "55+", "country": "JP", "activity": 10}
        put = await client.put("/v1/users/p1/features", json={"features": stored})
        assert put.json() == {"user_id": "p1", "features": ["activity", "age_group", "country"]}
        await client.post("/v1/users/p1/events", json={"item_ids": ["i9", "i8"]})
        stored_history = ["i8", "i9"]  # newest first

        from_redis = (await client.post("/v1/recall", json={"user_id": "p1", "k": 10})).json()
        assert from_redis["feature_source"] == "redis"
        assert_same_recall(from_redis["items"], reference.top_k(stored, stored_history, 10))

        # Request features override stored ones by name; the stored history still applies.
        override = {"user_id": "p1", "k": 10, "features": {"country": "US"}}
        merged = (await client.post("/v1/recall", json=override)).json()
        assert merged["feature_source"] == "request"
        expected = reference.top_k({**stored, "country": "US"}, stored_history, 10)
        assert_same_recall(merged["items"], expected)

        # A request history (even empty) replaces the stored one.
        own = await client.post("/v1/recall", json={"user_id": "p1", "k": 10, "history": []})
        assert own.json()["feature_source"] == "request"
        assert_same_recall(own.json()["items"], reference.top_k(stored, [], 10))


async def test_events_change_the_next_recall(
    model_dir: Path, reference: Reference, store: dict[str, str]
) -> None:
    settings = make_settings(model_dir, **store)
    async with serve(settings) as client:
        before = (await client.post("/v1/recall", json={"user_id": "e1", "k": 10})).json()
        clicked = [i["item_id"] for i in before["items"][:3]]  # oldest first
        events = await client.post("/v1/users/e1/events", json={"item_ids": clicked})
        assert events.json() == {"user_id": "e1", "history_length": 3}
        after = (await client.post("/v1/recall", json={"user_id": "e1", "k": 10})).json()
        assert after["feature_source"] == "redis"
        assert not {i["item_id"] for i in after["items"]} & set(clicked)
        assert_same_recall(after["items"], reference.top_k({}, clicked[::-1], 10))


async def test_history_is_capped_newest_first(
    model_dir: Path, reference: Reference, store: dict[str, str]
) -> None:
    settings = make_settings(model_dir, **store, history_cap=5, feature_ttl_s=60)
    async with serve(settings) as client:
        for chunk in (["i1", "i2", "i3"], ["i4", "i5", "i6", "i7"]):
            response = await client.post("/v1/users/c1/events", json={"item_ids": chunk})
        assert response.json() == {"user_id": "c1", "history_length": 5}
        recall = (await client.post("/v1/recall", json={"user_id": "c1", "k": 10})).json()
        # The same seven sent in a request: the tower reads what the cap would have kept (it
        # read all seven), and all seven are excluded, as the client named them.
        sent = ["i7", "i6", "i5", "i4", "i3", "i2", "i1"]
        body = {"user_id": "c2", "history": sent, "k": 10}
        request = (await client.post("/v1/recall", json=body)).json()
    # Exactly what the kept history (newest first) gives; i1, i2 fell off and may come back.
    kept = ["i7", "i6", "i5", "i4", "i3"]
    assert_same_recall(recall["items"], reference.top_k({}, kept, 10))
    expected = [(item, score) for item, score in reference.top_k({}, kept, 12) if item not in sent]
    assert_same_recall(request["items"], expected[:10])


async def test_every_stored_item_is_excluded_though_the_tower_reads_the_newest(
    model_dir: Path, reference: Reference, store: dict[str, str]
) -> None:
    """HISTORY_CAP keeps 200 items, the test bundles' tower reads 100: the recall is the
    tower's on the newest 100, and none of the 150 stored items comes back, though the 50
    older ones rank high among the rest (they are excluded by id, not read)."""
    settings = make_settings(model_dir, **store, history_cap=200, feature_ttl_s=60)
    oldest_first = reference.item_ids[:150]
    newest_first = oldest_first[::-1]
    async with serve(settings) as client:
        events = await client.post("/v1/users/h1/events", json={"item_ids": oldest_first})
        assert events.json() == {"user_id": "h1", "history_length": 150}  # all of it kept
        recalls = {
            k: (await client.post("/v1/recall", json={"user_id": "h1", "k": k})).json()
            for k in (5, 50, 100)  # 50: every unseen item of the 200; 100: more than there are
        }
    read_only = [item for item, _ in reference.top_k({}, newest_first[:100], 50)]
    assert set(oldest_first[:50]) & set(read_only[:25])  # what excluding the read alone gives
    for k, recall in recalls.items():
        assert_same_recall(recall["items"], reference.top_k({}, newest_first, k))
    assert len(recalls[100]["items"]) == 50


async def test_stored_state_expires_after_its_ttl(model_dir: Path, store: dict[str, str]) -> None:
    # Two seconds: the writes and the first recall fit inside them on a busy host; the wait
    # for expiry counts from when the last write had set its TTL at the latest.
    ttl = 2
    settings = make_settings(model_dir, **store, feature_ttl_s=ttl, cache_ttl_s=0)
    async with serve(settings) as client:
        put = await client.put("/v1/users/t1/features", json={"features": {"country": "JP"}})
        assert put.status_code == 200
        await client.post("/v1/users/t1/events", json={"item_ids": ["i1", "i2"]})
        written_by = time.monotonic()
        before = await client.post("/v1/recall", json={"user_id": "t1", "k": 5})
        assert before.json()["feature_source"] == "redis"
        await anyio.sleep(written_by + ttl + 0.1 - time.monotonic())
        after = await client.post("/v1/recall", json={"user_id": "t1", "k": 5})
        assert after.json()["feature_source"] == "default"  # features and history both gone
        events = await client.post("/v1/users/t1/events", json={"item_ids": ["i3"]})
        assert events.json() == {"user_id": "t1", "history_length": 1}


async def test_each_stored_key_expires_on_its_own_ttl(
    model_dir: Path, store: dict[str, str]
) -> None:
    """A write renews its own key's TTL only, as Redis's EXPIRE does: features written before
    the latest events expire on time, and the user is then served the stored history with
    default features (the embedded store kept one deadline per user, renewed by any write)."""
    ttl = 3
    settings = make_settings(model_dir, **store, feature_ttl_s=ttl, cache_ttl_s=0)
    history = ["i4", "i9", "i17"]  # newest first, as stored

    async def items(body: dict[str, object]) -> list[tuple[str, float]]:
        response = await client.post("/v1/recall", json={"k": 10, **body})
        return [(item["item_id"], round(item["score"], 4)) for item in response.json()["items"]]

    async with serve(settings) as client:
        put = await client.put("/v1/users/t2/features", json={"features": {"country": "JP"}})
        assert put.status_code == 200
        features_by = time.monotonic()
        await anyio.sleep(1.5)
        await client.post("/v1/users/t2/events", json={"item_ids": history[::-1]})
        defaults = await items({"user_id": "nobody", "history": history})
        assert await items({"user_id": "t2"}) != defaults  # the stored features count
        await anyio.sleep(features_by + ttl + 0.1 - time.monotonic())
        after = await client.post("/v1/recall", json={"user_id": "t2", "k": 10})
        assert after.json()["feature_source"] == "redis"  # the history lives on
        assert await items({"user_id": "t2"}) == defaults


async def test_the_embedded_store_keeps_the_users_written_last(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without Redis, any client could grow a worker without end, a new user at a time (2,000
    users of 200 long ids: +124 MB); it keeps the MAX_USERS written last, features and
    histories each."""
    monkeypatch.setattr(memory, "MAX_USERS", 3)

    async def source(user_id: str) -> str:
        response = await client.post("/v1/recall", json={"user_id": user_id, "k": 3})
        return str(response.json()["feature_source"])

    async with serve(make_settings(model_dir)) as client:
        for user_id in ("u1", "u2", "u3", "u4", "u2", "u5"):  # u2 written again: newest
            body = {"features": {"country": "JP"}}
            put = await client.put(f"/v1/users/{user_id}/features", json=body)
            assert put.status_code == 200
        assert [await source(u) for u in ("u1", "u2", "u3", "u4", "u5")] == [
            "default", "redis", "default", "redis", "redis"
        ]  # fmt: skip
        for n in range(4):
            await client.post(f"/v1/users/h{n}/events", json={"item_ids": ["i1"]})
        assert [await source(f"h{n}") for n in range(4)] == ["default", "redis", "redis", "redis"]


async def test_batch_equals_single_requests_in_order(model_dir: Path) -> None:
    requests = [
        {"user_id": "a", "k": 5},
        {"user_id": "b", "k": 3, "features": {"country": "FR"}, "history": ["i1"]},
        {"user_id": "a", "k": 7, "exclude_seen": False, "history": ["i4"]},
    ]
    async with serve(make_settings(model_dir)) as client:
        batch = await client.post("/v1/recall/batch", json={"requests": requests})
        assert batch.status_code == 200
        singles = [(await client.post("/v1/recall", json=r)).json() for r in requests]
    results = batch.json()["results"]
    assert [r["user_id"] for r in results] == ["a", "b", "a"]
    for got, single in zip(results, singles, strict=True):
        assert got["feature_source"] == single["feature_source"]
        assert [i["item_id"] for i in got["items"]] == [i["item_id"] for i in single["items"]]
        for x, y in zip(got["items"], single["items"], strict=True):
            assert x["score"] == pytest.approx(y["score"], abs=1e-5)


async def test_hnsw_index_serves_k_items(model_dir: Path) -> None:
    settings = make_settings(model_dir, index_type="hnsw", hnsw_m=8, hnsw_ef_search=16)
    history = [f"i{n}" for n in range(0, 60)]
    async with serve(settings) as client:
        ready = (await client.get("/health/ready")).json()
        assert ready["index_type"] == "hnsw"
        body = {"user_id": "h", "k": 100, "history": history}
        items = (await client.post("/v1/recall", json=body)).json()["items"]
    assert len(items) == 100
    assert not {i["item_id"] for i in items} & set(history)
    scores = [i["score"] for i in items]
    assert scores == sorted(scores, reverse=True)


async def test_ivf_falls_back_to_exact_when_probes_run_short(
    model_dir: Path, reference: Reference
) -> None:
    # One probed list of ~40 items cannot fill k=150: the exact fallback must.
    settings = make_settings(model_dir, index_type="ivf", ivf_nlist=5, ivf_nprobe=1)
    async with serve(settings) as client:
        items = (await client.post("/v1/recall", json={"user_id": "v", "k": 150})).json()["items"]
    assert_same_recall(items, reference.top_k({}, [], 150))
