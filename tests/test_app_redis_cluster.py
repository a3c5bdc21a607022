"""A Redis Cluster as the online store (REDIS_CLUSTER=true): a real cluster of redis-server
processes on loopback (3 primaries + 3 replicas), the app through its real lifespan, and
publish-features through the real CLI. A user's keys share one slot; a batch reaches each
node in one round trip; writes, events and the model pin work on it. A primary killed under
load, and the whole cluster down and back: the fault suite's scenario, on a cluster of its own
(`private_cluster`), with real `python -m app` processes over real HTTP."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import SOURCE_V1, Bundles
from helpers_app import admin_headers, client_of, lifespan, make_settings, serve
from helpers_cluster import (  # noqa: F401 (fixtures)
    LocalCluster,
    private_cluster,
    slow_failover_cluster,
)
from helpers_process import FAULT_P99_BUDGET_MS
from redis.asyncio.cluster import ClusterNode

from app.main import create_app
from app.settings import Settings
from harness.faults import cluster_faults
from harness.faults.report import table
from harness.stack import Stack, model_dir_with
from models.online_store import connect, publish
from models.redis_keys import history_key, user_key

pytestmark = [pytest.mark.anyio]

USERS = [f"u{n}" for n in range(48)]
FEATURES = {"features": {"country": "JP", "age_group": "55+", "activity": 12}}


def on_cluster(model_dir: Path, url: str, prefix: str, **overrides: Any) -> Settings:
    values = {"redis_cluster": True, "max_batch": 64, "cache_ttl_s": 0} | overrides
    return make_settings(model_dir, redis_url=url, redis_prefix=prefix, **values)


def recall_batch(users: list[str]) -> dict[str, Any]:
    return {"requests": [{"user_id": user, "k": 10} for user in users]}


def test_a_users_two_keys_share_one_slot_whatever_the_id(redis_cluster_url: str) -> None:
    node = redis.Redis.from_url(redis_cluster_url, decode_responses=True)
    # Braces in an id would end or empty the hash tag unless encoded: "}x" would leave "{}"
    # (the whole key hashed, so the two keys in two slots), "a}b" would cut it short.
    ids = ["u42", "a}b", "}x", "}", "{", "{}", "a{b}c", "%7D", "%", "tr:hist:u1", "é 1"]
    try:
        for user_id in ids:
            slots = {
                node.execute_command("CLUSTER KEYSLOT", key)
                for key in (user_key("tr", user_id), history_key("tr", user_id))
            }
            assert len(slots) == 1, user_id
        spread = {node.execute_command("CLUSTER KEYSLOT", user_key("tr", u)) for u in USERS}
    finally:
        node.close()
    assert len(spread) > len(USERS) // 2  # users spread over the slots, not one tag for all
    assert len({user_key("tr", user_id) for user_id in ids}) == len(ids)  # one key per id
    assert user_key("tr", "u42") == "tr:user:{u42}"
    assert history_key("tr", "u42") == "tr:hist:{u42}"


async def test_recall_reads_every_user_from_the_cluster_one_round_trip_per_node(
    model_dir: Path,
    bundles: Bundles,
    redis_cluster_url: str,
    cluster_prefix: str,
    redis_url: str,
    redis_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for url, cluster, prefix in ((redis_cluster_url, True, cluster_prefix),
                                 (redis_url, False, redis_prefix)):  # fmt: skip
        client = connect(url, cluster=cluster)
        publish(client, bundles.dataset_v1, prefix=prefix, history_length=5)
        client.close()
    # One BLAS for both apps: each would otherwise time both at load and might pick the other,
    # whose float32 sums round differently (`app.search.flat`).
    standalone = make_settings(
        model_dir,
        redis_url=redis_url,
        redis_prefix=redis_prefix,
        max_batch=64,
        cache_ttl_s=0,
        exact_blas="numpy",
    )
    async with serve(standalone) as client:
        expected = (await client.post("/v1/recall/batch", json=recall_batch(USERS))).json()

    app = create_app(on_cluster(model_dir, redis_cluster_url, cluster_prefix, exact_blas="numpy"))
    async with lifespan(app), client_of(app) as client:
        await client.post("/v1/recall", json={"user_id": "warm-up", "k": 1})  # slot map read
        round_trips: Counter[str] = Counter()
        send = ClusterNode.execute_pipeline

        async def counted(node: ClusterNode, commands: list[Any]) -> bool:
            round_trips[node.name] += 1
            return await send(node, commands)

        monkeypatch.setattr(ClusterNode, "execute_pipeline", counted)
        response = await client.post("/v1/recall/batch", json=recall_batch(USERS))
        monkeypatch.undo()
        assert response.status_code == 200
        results = response.json()["results"]
        assert {r["feature_source"] for r in results} == {"redis"}
        assert results == expected["results"]  # the same answers as from a standalone Redis
        primaries = app.state.services.store.client.get_primaries()
        assert round_trips == {node.name: 1 for node in primaries}  # 48 users on 3 nodes


async def test_feature_writes_and_events_on_the_cluster(
    model_dir: Path, redis_cluster_url: str, cluster_prefix: str
) -> None:
    settings = on_cluster(model_dir, redis_cluster_url, cluster_prefix, history_cap=3)
    admin = redis.RedisCluster.from_url(redis_cluster_url, decode_responses=True)
    try:
        async with serve(settings) as client:
            for user in ("w}1", "w2"):  # one id whose `}` must stay inside the hash tag
                path = f"/v1/users/{user}"
                assert (await client.put(f"{path}/features", json=FEATURES)).status_code == 200
                for items in (["i1", "i2"], ["i3"], ["i4"]):
                    events = await client.post(f"{path}/events", json={"item_ids": items})
                    assert events.status_code == 200, events.text
                assert events.json()["history_length"] == 3  # capped by the transaction
                assert admin.lrange(history_key(cluster_prefix, user), 0, -1) == ["i4", "i3", "i2"]
                recall = await client.post("/v1/recall", json={"user_id": user, "k": 5})
                assert recall.json()["feature_source"] == "redis"
            # A history key of another type is replaced (the Lua check runs on its node).
            admin.set(history_key(cluster_prefix, "w3"), "not a list")
            events = await client.post("/v1/users/w3/events", json={"item_ids": ["i5"]})
            assert events.status_code == 200, events.text
            assert admin.lrange(history_key(cluster_prefix, "w3"), 0, -1) == ["i5"]
            assert (await client.get("/health/ready")).json()["redis"] == "ok"
    finally:
        admin.close()


async def test_events_reach_a_users_slot_while_it_migrates(
    model_dir: Path,
    private_cluster: LocalCluster,  # noqa: F811
) -> None:
    """A reshard (`redis-cli --cluster reshard`) moves a slot key by key: a key already moved
    answers ASK, which a MULTI transaction did not follow (503, nothing written)."""
    cluster, user = private_cluster, "m1"
    key = history_key("tr", user)
    source = cluster.master_of(key)
    nodes = {port: redis.Redis(port=port, decode_responses=True) for port in cluster.ports}
    slots = nodes[source].execute_command("CLUSTER SLOTS")
    primaries = {int(row[2][1]) for row in slots}
    target = min(primaries - {source})
    ids = {port: node.execute_command("CLUSTER MYID") for port, node in nodes.items()}
    settings = on_cluster(model_dir, cluster.url, "tr")
    try:
        async with serve(settings) as client:
            path = f"/v1/users/{user}"
            assert (await client.post(f"{path}/events", json={"item_ids": ["i1"]})).is_success
            slot = nodes[source].execute_command("CLUSTER KEYSLOT", key)
            nodes[target].execute_command("CLUSTER SETSLOT", slot, "IMPORTING", ids[source])
            nodes[source].execute_command("CLUSTER SETSLOT", slot, "MIGRATING", ids[target])
            nodes[source].execute_command("MIGRATE", "127.0.0.1", target, key, 0, 5000)
            events = await client.post(f"{path}/events", json={"item_ids": ["i2", "i3"]})
            assert events.status_code == 200, events.text
            assert events.json()["history_length"] == 3
            for port in primaries:  # the move completes
                nodes[port].execute_command("CLUSTER SETSLOT", slot, "NODE", ids[target])
            assert nodes[target].lrange(key, 0, -1) == ["i3", "i2", "i1"]
    finally:
        for node in nodes.values():
            node.close()


async def test_replicas_share_the_model_pin_through_the_cluster(
    model_dir: Path, bundles: Bundles, redis_cluster_url: str, cluster_prefix: str
) -> None:
    v1, v2 = bundles.v1.name, bundles.v2.name
    settings = on_cluster(model_dir, redis_cluster_url, cluster_prefix, reload_poll_s=0.05)
    async with serve(settings) as first:
        reload = await first.post("/admin/reload", json={"version": v2}, headers=admin_headers())
        assert reload.json() == {"model_version": v2, "previous_version": v1}
        async with serve(settings) as second:  # reads the pin at start-up, not LATEST (v1)
            assert (await second.get("/health/ready")).json()["model_version"] == v2
    admin = redis.RedisCluster.from_url(redis_cluster_url, decode_responses=True)
    try:
        assert admin.get(f"{cluster_prefix}:model:pinned") == v2
    finally:
        admin.close()


async def test_a_dead_primary_costs_only_its_own_users_their_features(
    model_dir: Path,
    bundles: Bundles,
    slow_failover_cluster: LocalCluster,  # noqa: F811
) -> None:
    cluster = slow_failover_cluster
    client = connect(cluster.url, cluster=True)
    publish(client, bundles.dataset_v1, prefix="tr", history_length=5)
    client.close()
    victim = cluster.master_of(user_key("tr", USERS[0]))
    lost = [u for u in USERS if cluster.master_of(user_key("tr", u)) == victim]
    kept = [u for u in USERS if u not in lost]
    assert lost and kept
    settings = on_cluster(model_dir, cluster.url, "tr", redis_retry_after_ms=60_000)
    async with serve(settings) as client:
        await client.post("/v1/recall", json={"user_id": "warm-up", "k": 1})  # slot map read
        cluster.kill(victim)
        for _ in range(2):  # the first call finds the node dead; the second backs off from it
            response = await client.post("/v1/recall/batch", json=recall_batch(USERS))
            assert response.status_code == 200
            results = response.json()["results"]
            sources = {u: r["feature_source"] for u, r in zip(USERS, results, strict=True)}
            assert {sources[u] for u in lost} == {"default"}
            assert {sources[u] for u in kept} == {"redis"}  # not backed off with the dead one
        write = await client.put(f"/v1/users/{lost[0]}/features", json=FEATURES)
        assert write.status_code == 503
        assert write.json()["detail"].startswith("Redis is unavailable")
        assert (await client.put(f"/v1/users/{kept[0]}/features", json=FEATURES)).is_success
        assert (await client.get("/health/ready")).json()["redis"] == "unavailable"


async def test_a_cluster_and_its_setting_must_agree(
    model_dir: Path, redis_cluster_url: str, cluster_prefix: str, redis_url: str
) -> None:
    hint = "Redis error: REDIS_URL names a Redis Cluster node: set REDIS_CLUSTER=true"
    plain = make_settings(model_dir, redis_url=redis_cluster_url, redis_prefix=cluster_prefix)
    async with serve(plain) as client:
        # Users whose slots the URL's node serves are written; the others are MOVED, which a
        # plain client names as what it is.
        writes = [await client.put(f"/v1/users/m{n}/features", json=FEATURES) for n in range(8)]
        assert {w.status_code for w in writes} == {200, 503}
        assert all(w.json() == {"detail": hint} for w in writes if w.status_code == 503)
    on_plain = on_cluster(model_dir, redis_url.rsplit("/", 1)[0], cluster_prefix)
    async with serve(on_plain) as client:
        write = await client.put("/v1/users/m0/features", json=FEATURES)
        assert write.status_code == 503
        assert "Cluster mode is not enabled on this node" in write.json()["detail"]
        assert (await client.get("/health/ready")).json()["redis"] == "unavailable"


@pytest.mark.slow
def test_publish_features_writes_to_a_cluster(redis_cluster_url: str, cluster_prefix: str) -> None:
    source = "synthetic:seed=4,users=30,items=40"
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "models", "publish-features", "--data", source,
         "--redis-url", redis_cluster_url, "--redis-cluster", "--prefix", cluster_prefix,
         "--history-length", "5"],
        capture_output=True, text=True, timeout=300, env=env, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    admin = redis.RedisCluster.from_url(redis_cluster_url, decode_responses=True)
    try:
        match = f"{cluster_prefix}:*"
        nodes = admin.get_primaries()
        keys = [key for node in nodes for key in admin.scan_iter(match=match, target_nodes=node)]
        assert len(keys) == 60  # features and a history for each of the 30 users
        assert len({admin.keyslot(key) for key in keys}) == 30  # one slot per user
        assert admin.lrange(history_key(cluster_prefix, "u1"), 0, -1)
    finally:
        admin.close()


@pytest.mark.slow
def test_a_primary_killed_under_load_and_the_whole_cluster_down_and_back(
    tmp_path: Path,
    bundles: Bundles,
    private_cluster: LocalCluster,  # noqa: F811
) -> None:
    versions = model_dir_with(tmp_path / "artifacts", bundles.v1, bundles.v2, SOURCE_V1)
    options = cluster_faults.ClusterOptions(
        steady_s=1.0, down_s=2.0, users=300, p99_budget_ms=FAULT_P99_BUDGET_MS
    )
    with Stack(tmp_path / "procs") as stack:
        rows = cluster_faults.run(stack, versions, options, private_cluster)
    assert rows and all(not row.problems for row in rows), "\n" + table(rows)


def test_a_cluster_starts_on_fresh_ports_when_a_chosen_one_is_taken() -> None:
    """A port free when the launcher chose it can be taken before its node binds it (on a busy
    host, by an outgoing connection): the node exits at once, and the launcher starts the
    nodes again on fresh ports rather than waiting out its timeout and failing."""
    cluster = LocalCluster()
    taken = cluster.ports[0]
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        cluster.start()
        try:
            assert taken not in cluster.ports and len(set(cluster.ports)) == 6
            client = redis.RedisCluster.from_url(cluster.url)
            try:
                client.set("started", "yes")
                assert client.get("started") == b"yes"
            finally:
                client.close()
        finally:
            cluster.stop()
