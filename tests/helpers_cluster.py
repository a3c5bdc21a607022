"""A Redis Cluster of a test's own: the fault suite's launcher (`harness.cluster`,
re-exported here) started by a fixture, for the tests that kill its nodes; and the clean-up of
a key prefix on a cluster (every primary holds some of its keys)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest
import redis

from harness.cluster import LocalCluster

__all__ = ["LocalCluster", "delete_prefix", "private_cluster", "slow_failover_cluster"]


def _cluster_of_own(node_timeout_ms: int) -> Iterator[LocalCluster]:
    if shutil.which("redis-server") is None:
        pytest.fail("no redis-server binary to start a Redis Cluster with")
    cluster = LocalCluster(node_timeout_ms=node_timeout_ms).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def private_cluster() -> Iterator[LocalCluster]:
    """3 primaries + 3 replicas on loopback (cluster-node-timeout 1 s: a failover takes about
    two seconds) for this test alone, so that killing its nodes never disturbs the session's
    shared cluster."""
    yield from _cluster_of_own(1000)


@pytest.fixture
def slow_failover_cluster() -> Iterator[LocalCluster]:
    """As `private_cluster`, but a dead primary is noticed only after 60 s: until then the
    cluster keeps serving the other primaries' slots (no CLUSTERDOWN, no promotion)."""
    yield from _cluster_of_own(60_000)


def delete_prefix(url: str, prefix: str) -> None:
    """Delete every key under `prefix` from every primary of the cluster at `url`."""
    client = redis.RedisCluster.from_url(url)
    try:
        for node in client.get_primaries():
            keys = list(client.scan_iter(match=f"{prefix}:*", count=1000, target_nodes=node))
            for key in keys:  # one slot each: a cluster refuses a multi-slot DEL
                client.delete(key)
    finally:
        client.close()
