"""Redis as an online store that is not a single point of failure: killed, frozen, restarted;
the in-process cache in front of it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import httpx
import pytest
import redis
import redis.asyncio
from conftest import Bundles
from helpers_app import (
    RedisServer,
    Reference,
    assert_same_recall,
    client_of,
    free_port,
    lifespan,
    make_settings,
    serve,
)

from app.main import create_app
from app.store.redis_client import redis_reason
from models.redis_keys import history_key, user_key

pytestmark = [pytest.mark.anyio]

FEATURES = {"features": {"country": "JP", "age_group": "55+", "activity": 12}}


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own, to kill and restart."""
    server = RedisServer().start()
    yield server
    server.stop()


async def timed_recall(client: httpx.AsyncClient, user_id: str) -> tuple[httpx.Response, float]:
    start = time.perf_counter()
    response = await client.post("/v1/recall", json={"user_id": user_id, "k": 10})
    return response, time.perf_counter() - start


async def test_redis_killed_then_restarted(model_dir: Path, own_redis: RedisServer) -> None:
    # No cache, so every recall asks Redis.
    settings = make_settings(model_dir, redis_url=own_redis.url, cache_ttl_s=0)
    async with serve(settings) as client:
        assert (await client.put("/v1/users/k1/features", json=FEATURES)).status_code == 200
        response, _ = await timed_recall(client, "k1")
        assert response.json()["feature_source"] == "redis"
        assert (await client.get("/health/ready")).json()["redis"] == "ok"

        own_redis.kill()
        with anyio.fail_after(5):  # none may hang: the first finds the connection dead
            for _ in range(3):
                response, _ = await timed_recall(client, "k1")
                assert response.status_code == 200
                assert response.json()["feature_source"] == "default"
                assert len(response.json()["items"]) == 10
        with_request = await client.post(
            "/v1/recall", json={"user_id": "k1", "k": 5, "features": {"country": "US"}}
        )
        assert with_request.json()["feature_source"] == "request"

        ready = await client.get("/health/ready")
        assert ready.status_code == 200  # recall still works: the service stays ready
        assert ready.json()["redis"] == "unavailable"
        events = await client.post("/v1/users/k1/events", json={"item_ids": ["i1"]})
        assert events.status_code == 503
        assert events.json()["detail"].startswith("Redis is unavailable")
        put = await client.put("/v1/users/k1/features", json=FEATURES)
        assert put.status_code == 503

        metrics = (await client.get("/metrics")).text
        assert 'tower_recall_redis_errors_total{operation="fetch"}' in metrics

        own_redis.start()  # same port, empty (nothing persisted)
        deadline = time.monotonic() + 5
        while (await client.get("/health/ready")).json()["redis"] != "ok":
            assert time.monotonic() < deadline, "service did not reconnect"
            await anyio.sleep(0.05)
        assert (await client.put("/v1/users/k1/features", json=FEATURES)).status_code == 200
        response, _ = await timed_recall(client, "k1")
        assert response.json()["feature_source"] == "redis"


async def test_cached_users_keep_their_features_when_others_miss_during_an_outage(
    model_dir: Path, own_redis: RedisServer
) -> None:
    settings = make_settings(model_dir, redis_url=own_redis.url, cache_ttl_s=60)
    async with serve(settings) as client:
        assert (await client.put("/v1/users/c1/features", json=FEATURES)).status_code == 200
        before, _ = await timed_recall(client, "c1")  # now in the cache
        assert before.json()["feature_source"] == "redis"
        own_redis.kill()
        # Batched with a user the cache lacks, whose fetch fails: c1 still has its features.
        body = {"requests": [{"user_id": "c1", "k": 10}, {"user_id": "c2", "k": 10}]}
        response = await client.post("/v1/recall/batch", json=body)
        assert response.status_code == 200
        cached, missed = response.json()["results"]
        assert cached["feature_source"] == "redis"
        # The same items (scores may differ in the last bits: a batch of two takes another
        # matrix-product path than a single query).
        ids = [[item["item_id"] for item in r["items"]] for r in (cached, before.json())]
        assert ids[0] == ids[1]
        assert missed["feature_source"] == "default"


async def test_a_full_connection_pool_is_not_a_redis_outage(
    model_dir: Path, redis_url: str, redis_prefix: str, redis_client: redis.Redis
) -> None:
    redis_client.set(user_key(redis_prefix, "p1"), json.dumps(FEATURES["features"]))
    settings = make_settings(
        model_dir,
        redis_url=redis_url,
        redis_prefix=redis_prefix,
        cache_ttl_s=0,
        redis_max_connections=1,
        redis_retry_after_ms=60_000,  # an outage would make every later call fail fast
    )
    app = create_app(settings)
    async with lifespan(app), client_of(app) as client:
        pool = app.state.services.store.client.connection_pool
        held = await pool.get_connection()  # this worker's own calls hold every connection
        try:
            busy, _ = await timed_recall(client, "p1")
            assert busy.status_code == 200
            assert busy.json()["feature_source"] == "default"
        finally:
            await pool.release(held)
        # No back-off followed: the next recall reads Redis again.
        again, _ = await timed_recall(client, "p1")
        assert again.json()["feature_source"] == "redis"


async def test_a_frozen_redis_costs_a_recall_its_timeout_not_a_hang(
    model_dir: Path, own_redis: RedisServer
) -> None:
    settings = make_settings(
        model_dir, redis_url=own_redis.url, cache_ttl_s=0, redis_timeout_ms=100
    )
    async with serve(settings) as client:
        assert (await client.put("/v1/users/f1/features", json=FEATURES)).status_code == 200
        own_redis.pause()  # accepts connections, answers nothing: a hung server
        try:
            with anyio.fail_after(5):  # a frozen server never answers: only the timeout ends it
                response, elapsed = await timed_recall(client, "f1")
            assert response.status_code == 200
            assert response.json()["feature_source"] == "default"
            assert elapsed >= 0.1  # it waited for the timeout
            ready = await client.get("/health/ready")
            assert ready.json()["redis"] == "unavailable"
            put = await client.put("/v1/users/f1/features", json=FEATURES)
            assert put.status_code == 503
        finally:
            own_redis.resume()
        await anyio.sleep(0.15)  # past the back-off
        response, _ = await timed_recall(client, "f1")
        assert response.json()["feature_source"] == "redis"


async def test_unreachable_redis_at_start_up(model_dir: Path) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # a free port nobody listens on
    async with serve(make_settings(model_dir, redis_url=url)) as client:
        ready = await client.get("/health/ready")
        assert ready.status_code == 200
        assert ready.json()["redis"] == "unavailable"
        response = await client.post("/v1/recall", json={"user_id": "u1"})
        assert response.status_code == 200 and response.json()["feature_source"] == "default"


async def test_cache_serves_repeats_and_own_writes_invalidate_it(
    model_dir: Path, redis_url: str, redis_prefix: str, redis_client: redis.Redis
) -> None:
    # A TTL a busy host cannot outrun between two recalls; the wait for expiry is measured
    # from when the first recall had cached its entry at the latest.
    ttl = 2.0
    settings = make_settings(
        model_dir, redis_url=redis_url, redis_prefix=redis_prefix, cache_ttl_s=ttl
    )
    async with serve(settings) as client:
        first, _ = await timed_recall(client, "c1")
        cached_by = time.monotonic()
        assert first.json()["feature_source"] == "default"
        # Another process writes behind the cache: seen only once the entry expires.
        redis_client.rpush(history_key(redis_prefix, "c1"), "i5")
        cached, _ = await timed_recall(client, "c1")
        assert cached.json()["feature_source"] == "default"
        await anyio.sleep(cached_by + ttl + 0.05 - time.monotonic())
        fresh, _ = await timed_recall(client, "c1")
        assert fresh.json()["feature_source"] == "redis"
        assert "i5" not in {i["item_id"] for i in fresh.json()["items"]}
        # This process's own write is seen at once.
        top = fresh.json()["items"][0]["item_id"]
        await client.post("/v1/users/c1/events", json={"item_ids": [top]})
        after, _ = await timed_recall(client, "c1")
        assert top not in {i["item_id"] for i in after.json()["items"]}
        metrics = (await client.get("/metrics")).text
    assert "tower_recall_cache_hits_total 1.0" in metrics
    assert "tower_recall_cache_misses_total 3.0" in metrics


async def test_writes_use_the_shared_key_layout(
    model_dir: Path, redis_url: str, redis_prefix: str, redis_client: redis.Redis
) -> None:
    settings = make_settings(
        model_dir, redis_url=redis_url, redis_prefix=redis_prefix, feature_ttl_s=30
    )
    async with serve(settings) as client:
        await client.put("/v1/users/w1/features", json=FEATURES)
        await client.post("/v1/users/w1/events", json={"item_ids": ["i1", "i2"]})
    stored = redis_client.get(user_key(redis_prefix, "w1"))
    assert isinstance(stored, str) and json.loads(stored) == FEATURES["features"]
    assert redis_client.lrange(history_key(redis_prefix, "w1"), 0, -1) == ["i2", "i1"]
    assert 0 < redis_client.ttl(user_key(redis_prefix, "w1")) <= 30
    assert 0 < redis_client.ttl(history_key(redis_prefix, "w1")) <= 30


async def test_events_written_without_a_ttl_keep_the_history_for_good(
    model_dir: Path, redis_url: str, redis_prefix: str, redis_client: redis.Redis
) -> None:
    # publish-features --ttl gave the history a TTL; under FEATURE_TTL_S 0 the events the
    # service then wrote expired with it (and the features key, SET again, did not).
    key = history_key(redis_prefix, "p1")
    redis_client.rpush(key, "i1")
    redis_client.expire(key, 60)
    settings = make_settings(model_dir, redis_url=redis_url, redis_prefix=redis_prefix)
    async with serve(settings) as client:
        events = await client.post("/v1/users/p1/events", json={"item_ids": ["i2"]})
        assert events.json() == {"user_id": "p1", "history_length": 2}
    assert redis_client.lrange(key, 0, -1) == ["i2", "i1"]
    assert redis_client.ttl(key) == -1  # no TTL


async def test_corrupt_stored_values_degrade_per_user(
    model_dir: Path,
    bundles: Bundles,
    redis_url: str,
    redis_prefix: str,
    redis_client: redis.Redis,
) -> None:
    redis_client.set(user_key(redis_prefix, "bad"), "{not json")
    redis_client.set(history_key(redis_prefix, "bad"), "a string, not a list")
    good_features, good_history = FEATURES["features"], ["i3", "i7"]
    redis_client.set(user_key(redis_prefix, "good"), json.dumps(good_features))
    redis_client.rpush(history_key(redis_prefix, "good"), *good_history)
    settings = make_settings(model_dir, redis_url=redis_url, redis_prefix=redis_prefix)
    reference = Reference(bundles.v1)
    async with serve(settings) as client:
        # Batched together: the bad user's values fall back to defaults, the good user's
        # are read as stored.
        body = {"requests": [{"user_id": "bad", "k": 10}, {"user_id": "good", "k": 10}]}
        response = await client.post("/v1/recall/batch", json=body)
        assert response.status_code == 200
        bad, good = response.json()["results"]
        assert bad["feature_source"] == good["feature_source"] == "redis"
        assert_same_recall(bad["items"], reference.top_k({}, [], 10))
        assert_same_recall(good["items"], reference.top_k(good_features, good_history, 10))
        ready = await client.get("/health/ready")
        assert ready.json()["redis"] == "ok"
        metrics = (await client.get("/metrics")).text
        assert "tower_recall_unreadable_features_total 1.0" in metrics
        # The bad user's events replace the history key of the wrong type, as a features write
        # replaces whatever its key held: events are never refused for good.
        events = await client.post("/v1/users/bad/events", json={"item_ids": ["i5"]})
        assert events.status_code == 200, events.text
        assert redis_client.lrange(history_key(redis_prefix, "bad"), 0, -1) == ["i5"]


async def test_features_stored_with_non_strict_json_lose_only_those_values(
    model_dir: Path, bundles: Bundles, redis_url: str, redis_prefix: str, redis_client: redis.Redis
) -> None:
    """Python's `json.dumps` writes a missing float as `NaN` and other writers emit `Infinity`
    or a number beyond a double: not strict JSON, but each such value reads as missing, as a
    stored `"NaN"` string does, not the whole record with it."""
    features = FEATURES["features"]
    stored = {
        "nan": {**features, "activity": float("nan"), "extra": float("nan")},
        "inf": {**features, "activity": float("inf")},
        "big": {**features, "extra": 10**400},  # a field the bundle does not read
    }
    for user, record in stored.items():
        redis_client.set(user_key(redis_prefix, user), json.dumps(record))  # allow_nan: default
    settings = make_settings(model_dir, redis_url=redis_url, redis_prefix=redis_prefix)
    reference = Reference(bundles.v1)
    expected = {
        "nan": reference.top_k({**features, "activity": None}, [], 10),
        "inf": reference.top_k({**features, "activity": None}, [], 10),
        "big": reference.top_k(features, [], 10),
    }
    assert expected["nan"] != expected["big"]  # the bundle reads `activity`
    async with serve(settings) as client:
        for user in stored:
            response = await client.post("/v1/recall", json={"user_id": user, "k": 10})
            assert response.status_code == 200, response.text
            assert response.json()["feature_source"] == "redis"
            assert_same_recall(response.json()["items"], expected[user])
        metrics = (await client.get("/metrics")).text
    assert "tower_recall_unreadable_features_total 0.0" in metrics


async def test_calls_skipped_while_backing_off_are_counted_apart_from_errors(
    model_dir: Path, own_redis: RedisServer
) -> None:
    """During an outage one call per REDIS_RETRY_AFTER_MS fails and the others are not made:
    the errors alone showed one failure a back-off however many recalls went without Redis."""
    settings = make_settings(
        model_dir, redis_url=own_redis.url, cache_ttl_s=0, redis_retry_after_ms=600_000
    )
    async with serve(settings) as client:
        own_redis.kill()
        for _ in range(4):
            response, _ = await timed_recall(client, "k1")
            assert response.json()["feature_source"] == "default"
        events = await client.post("/v1/users/k1/events", json={"item_ids": ["i1"]})
        assert events.status_code == 503
        metrics = (await client.get("/metrics")).text
    assert 'tower_recall_redis_errors_total{operation="fetch"} 1.0' in metrics
    assert 'tower_recall_redis_skipped_total{operation="fetch"} 3.0' in metrics
    assert 'tower_recall_redis_skipped_total{operation="append_events"} 1.0' in metrics


async def test_a_redis_error_reply_on_read_is_an_error_not_an_empty_user(
    model_dir: Path, own_redis: RedisServer
) -> None:
    """Redis up but refusing the reads (here an ACL without LRANGE; in production LOADING,
    MASTERDOWN, a replica's stale-data refusal): the recall degrades to defaults as in an
    outage, the error is counted, and nothing is cached as "this user holds nothing"."""
    admin = redis.Redis.from_url(own_redis.url)
    admin.execute_command("ACL", "SETUSER", "svc", "on", ">pw", "~*", "+@all", "-lrange")
    admin.set(user_key("tr", "a1"), json.dumps(FEATURES["features"]))
    url = f"redis://svc:pw@127.0.0.1:{own_redis.port}/0"
    async with serve(make_settings(model_dir, redis_url=url)) as client:  # the cache is on
        refused, _ = await timed_recall(client, "a1")
        assert refused.status_code == 200
        assert refused.json()["feature_source"] == "default"
        metrics = (await client.get("/metrics")).text
        assert 'tower_recall_redis_errors_total{operation="fetch"} 1.0' in metrics
        admin.execute_command("ACL", "SETUSER", "svc", "+lrange")
        allowed, _ = await timed_recall(client, "a1")
        assert allowed.json()["feature_source"] == "redis"


class StallingProxy:
    """A TCP proxy in the test's own event loop that, once armed, holds the loop (a blocking
    sleep) when Redis's answer arrives: what a reload's `torch.jit.load` does to a worker, since
    it holds the GIL for the whole load. The call's timer then fires long after its deadline."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.stall_s = 0.0  # armed while > 0: the next answer stalls the loop once

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                if self.stall_s:
                    time.sleep(self.stall_s)  # blocking on purpose: the whole loop stops
                    self.stall_s = 0.0
                writer.write(data)
                await writer.drain()
        writer.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        await asyncio.gather(self._forward(reader, up_writer), self._pump(up_reader, writer))

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    @asynccontextmanager
    async def serve(self) -> AsyncIterator[str]:
        server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            yield f"redis://127.0.0.1:{port}/0"
            server.close()


async def test_a_worker_stalled_by_its_own_work_does_not_back_off_from_redis(
    model_dir: Path, own_redis: RedisServer
) -> None:
    proxy = StallingProxy(own_redis.port)
    async with proxy.serve() as url:
        # A back-off long enough that, if it were taken, the next recall could not reach Redis.
        settings = make_settings(
            model_dir, redis_url=url, cache_ttl_s=0, redis_timeout_ms=50,
            redis_retry_after_ms=60_000,
        )  # fmt: skip
        async with serve(settings) as client:
            assert (await client.put("/v1/users/s1/features", json=FEATURES)).status_code == 200
            proxy.stall_s = 0.3
            stalled, _ = await timed_recall(client, "s1")
            assert stalled.status_code == 200
            assert stalled.json()["feature_source"] == "default"  # its Redis call timed out
            assert proxy.stall_s == 0.0
            # Redis itself answered in time: the next call goes to it, no 60 s back-off.
            after, _ = await timed_recall(client, "s1")
            assert after.json()["feature_source"] == "redis"
            assert (await client.get("/health/ready")).json()["redis"] == "ok"
            metrics = (await client.get("/metrics")).text
        assert 'tower_recall_redis_errors_total{operation="fetch"} 1.0' in metrics


async def test_a_refused_write_gives_redis_reason_without_internal_keys(
    model_dir: Path, own_redis: RedisServer
) -> None:
    admin = redis.Redis.from_url(own_redis.url)
    settings = make_settings(model_dir, redis_url=own_redis.url)
    async with serve(settings) as client:
        assert (await client.post("/v1/users/u1/events", json={"item_ids": ["i0"]})).is_success
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", 1)
        try:
            # An item id that reads like Redis's wrong-type reason: the refusal is not one.
            events = await client.post("/v1/users/u1/events", json={"item_ids": ["WRONGTYPE"]})
        finally:
            admin.config_set("maxmemory", 0)
        assert events.status_code == 503
        assert admin.lrange(history_key("tr", "u1"), 0, -1) == [b"i0"]  # nothing deleted
        detail = events.json()["detail"]
        assert "command not allowed when used memory" in detail
        assert "tr:" not in detail and "LPUSH" not in detail.upper()
        assert detail.startswith("Redis error: command not allowed"), detail
        assert (await client.post("/v1/users/u1/events", json={"item_ids": ["i1"]})).is_success


WRONG_KIND = "WRONGTYPE Operation against a key holding the wrong kind of value"


async def test_a_transaction_error_reads_as_redis_own_reason(
    redis_url: str, redis_prefix: str
) -> None:
    """Whatever framing the installed redis-py puts around an error inside MULTI/EXEC (the
    command and its key, a tuple's repr, or none), a client is told Redis's reason alone."""
    key = history_key(redis_prefix, "framed")
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        await client.set(key, "a string")
        pipe = client.pipeline(transaction=True)
        pipe.lpush(key, "i1")
        with pytest.raises(redis.ResponseError) as raised:
            await pipe.execute()
        await client.delete(key)
    finally:
        await client.aclose()
    assert redis_reason(raised.value) == WRONG_KIND


@pytest.mark.parametrize(
    "message",
    [
        WRONG_KIND,  # a plain command's error
        # redis-py >= 6: the pipeline's command, then the reason
        f"Command # 1 (LPUSH tr:{{u1}}:hist i1) of pipeline caused error: {WRONG_KIND}",
        # redis-py 5's asyncio transaction: the reason as a tuple's repr
        f"Command # 1 (LPUSH tr:hist:u1 i1) of pipeline caused error: ('{WRONG_KIND}',)",
        f'Command # 2 (LPUSH k it\'s) of pipeline caused error: ("{WRONG_KIND}",)',
        # an item id that reads like the framing itself
        f"Command # 1 (LPUSH k caused error: OOM) of pipeline caused error: {WRONG_KIND}",
    ],
)
def test_redis_reason_is_read_from_every_framing_redis_py_has_used(message: str) -> None:
    assert redis_reason(redis.ResponseError(message)) == WRONG_KIND


def test_a_redis_server_starts_on_a_fresh_port_when_its_chosen_one_is_taken() -> None:
    """A port free when chosen can be taken before redis-server binds it: the launcher starts
    it again on a fresh port (its first start only: a restart keeps its port)."""
    server = RedisServer()
    taken = server.port
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        server.start()
        try:
            assert server.port != taken
            moved = server.port
            server.kill()
            server.start()  # again, on the port it has
            assert server.port == moved
            client = redis.Redis.from_url(server.url)
            assert client.ping()
            client.close()
        finally:
            server.stop()
