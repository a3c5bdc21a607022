"""Scenario: a Redis Cluster's faults under load (REDIS_CLUSTER=true).

One replica (`python -m app`) on a cluster of 3 primaries + 3 replicas on loopback
(`harness.cluster`, cluster-node-timeout 1 s), the L1 cache off (every recall asks Redis).
Under a steady load of recalls, for published users spread over all three primaries and for
users carrying their own history:

- steady: nothing wrong; every published user's recall reads its features from the cluster
  (the baseline: requests/s and p99);
- primary killed: the primary that holds the slots of a third of the users is killed
  (SIGKILL). Every recall must still answer 200, within the p99 budget: the users on the lost
  slots degrade to default features (and everyone while the cluster answers CLUSTERDOWN, from
  the failure's detection to the promotion), writes for them get a 503. Recovery is measured
  from the promotion (the replica serves those slots as primary) until, with no restart, a
  recall of one of those users reads its stored features again and an events write for
  another is accepted and read back; then every worker reports Redis ok. The killed node is
  started again afterwards and rejoins as a replica;
- whole cluster down and back: every node killed for `down_s` (recalls still 200, writes 503),
  then all started again on their ports (empty: nothing persisted). Recovery is measured from
  `cluster_state:ok` until a write is accepted and read back, every worker reporting ok.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from harness.cluster import LocalCluster
from harness.faults.client import call, wait_for_workers
from harness.faults.report import Row
from harness.faults.traffic import Answer, Stats, Traffic
from harness.stack import RECIPE, Stack, Versions
from models import online_store, redis_keys
from models.bundle import ITEM_IDS
from models.sources import load_dataset

PREFIX = redis_keys.DEFAULT_PREFIX


@dataclass(frozen=True)
class ClusterOptions:
    workers: int = 2
    connections: int = 4
    users: int = RECIPE.users  # published users the load asks for (u0..u{users-1})
    steady_s: float = 5.0  # the baseline phase
    down_s: float = 5.0  # how long the whole cluster stays down
    timeout_ms: int = 100  # REDIS_TIMEOUT_MS, as in the `redis` scenario
    retry_after_ms: int = 500  # REDIS_RETRY_AFTER_MS
    p99_budget_ms: float = 250.0
    promotion_bound_s: float = 15.0  # kill -> a replica serves the slots
    recovery_bound_s: float = 10.0  # promotion (or cluster ok) -> read again
    tail_s: float = 1.0  # load kept after recovery, to see every worker read the users again


def run(
    stack: Stack, versions: Versions, opts: ClusterOptions, cluster: LocalCluster | None = None
) -> list[Row]:
    """The three phases, on `cluster` (a fresh one, stopped with the stack, when None)."""
    if cluster is None:
        cluster = LocalCluster()
        stack.callback(cluster.stop)
        cluster.start()
    client = online_store.connect(cluster.url, cluster=True)
    online_store.publish(client, load_dataset(versions.source), history_length=20)
    client.close()
    item = json.loads((versions.model_dir / versions.v1 / ITEM_IDS).read_text())[0]
    env = {
        "REDIS_CLUSTER": "true",
        "CACHE_TTL_S": 0,
        "REDIS_TIMEOUT_MS": opts.timeout_ms,
        "REDIS_RETRY_AFTER_MS": opts.retry_after_ms,
        "RELOAD_POLL_S": 1,
    }
    (service,) = stack.services(versions.model_dir, cluster.url, [opts.workers], env=env)
    published = [f"u{(n * 37) % opts.users}" for n in range(64)]
    bodies: list[dict[str, Any]] = []
    for n, user in enumerate(published):
        bodies.append({"user_id": user, "k": 10})
        bodies.append({"user_id": f"guest-{n}", "k": 10, "history": [item]})
    victim = cluster.master_of(redis_keys.user_key(PREFIX, published[0]))
    lost = {u for u in published if cluster.master_of(redis_keys.user_key(PREFIX, u)) == victim}
    base = service.base_url
    with Traffic([base + "/v1/recall"], bodies, opts.connections) as traffic:
        rows = [_steady(traffic, opts)]
        rows.append(_failover(cluster, victim, lost, base, traffic, item, opts))
        rows.append(_whole_cluster(cluster, base, traffic, item, opts))
    return rows


def _sources(answers: list[Answer]) -> dict[str, int]:
    out: dict[str, int] = {}
    for a in answers:
        if a.source:
            out[a.source] = out.get(a.source, 0) + 1
    return out


def _judge(row: Row, answers: list[Answer], opts: ClusterOptions) -> None:
    s = row.stats
    row.expect(s.requests > 0, "no recall was answered")
    failed = [(a.status, a.error) for a in answers if a.failed]
    row.expect(s.failures == 0, f"{s.failures} recalls failed: {failed[:3]}")
    row.expect(
        s.p99_ms is not None and s.p99_ms <= opts.p99_budget_ms,
        f"recall p99 {s.p99_ms} ms over the {opts.p99_budget_ms:g} ms budget",
    )


def _steady(traffic: Traffic, opts: ClusterOptions) -> Row:
    start = time.perf_counter()
    time.sleep(opts.steady_s)
    answers = traffic.between(start)
    row = Row("cluster: steady (baseline)", Stats.of(answers))
    _judge(row, answers, opts)
    published = [a for a in answers if a.body % 2 == 0]  # even bodies: published users
    row.expect(
        bool(published) and all(a.source == "redis" for a in published),
        f"published users read from {_sources(published)}, not only from Redis",
    )
    rps = round(len(answers) / opts.steady_s, 1)
    row.detail = f"{rps} requests/s on {opts.connections} connections"
    row.data = {"rps": rps}
    return row


def _probe_user(cluster: LocalCluster, port: int) -> str:
    """A user id (never published) whose slot the primary on `port` holds."""
    n = 0
    while cluster.master_of(redis_keys.user_key(PREFIX, f"probe-{n}")) != port:
        n += 1
    return f"probe-{n}"


def _reads_again(base: str, user: str, writer: str, item: str) -> bool:
    """A recall of `user` reads its stored features, and an events write for `writer` is
    accepted and read back by the next recall."""
    recall = call(base, "POST", "/v1/recall", {"user_id": user, "k": 5}, timeout=10)
    if recall.status != 200 or recall.body["feature_source"] != "redis":
        return False
    written = call(base, "POST", f"/v1/users/{writer}/events", {"item_ids": [item]}, timeout=10)
    if written.status != 200:
        return False
    back = call(base, "POST", "/v1/recall", {"user_id": writer, "k": 5}, timeout=10)
    return back.status == 200 and back.body["feature_source"] == "redis"


def _until(condition: Any, bound_s: float, period_s: float = 0.02) -> float | None:
    """Seconds until `condition()` held, None past `bound_s`."""
    start = time.perf_counter()
    while time.perf_counter() - start < bound_s:
        if condition():
            return time.perf_counter() - start
        time.sleep(period_s)
    return None


def _failover(
    cluster: LocalCluster,
    victim: int,
    lost: set[str],
    base: str,
    traffic: Traffic,
    item: str,
    opts: ClusterOptions,
) -> Row:
    user = sorted(lost)[0]
    writer = _probe_user(cluster, victim)
    key = redis_keys.user_key(PREFIX, user)
    start = time.perf_counter()
    cluster.kill(victim)
    promotion = _until(lambda: cluster.master_of(key) != victim, opts.promotion_bound_s)
    promoted_at = time.perf_counter()
    recovery = None
    if promotion is not None:
        recovery = _until(lambda: _reads_again(base, user, writer, item), opts.recovery_bound_s)
    healed = wait_for_workers([base], [opts.workers], {"redis": "ok"}, opts.recovery_bound_s)
    healed_at = time.perf_counter()
    time.sleep(opts.tail_s)
    end = time.perf_counter()
    answers = traffic.between(start, end)
    row = Row(
        "cluster: primary killed, replica promoted",
        Stats.of(answers),
        recovery_s=None if recovery is None else round(recovery, 2),
    )
    _judge(row, answers, opts)
    row.expect(promotion is not None, f"no replica promoted {opts.promotion_bound_s:g} s after")
    row.expect(recovery is not None, f"lost users not read {opts.recovery_bound_s:g} s after")
    row.expect(healed is not None, "not every worker reported Redis ok again")
    # From the answers themselves: when each user group was last served without its features.
    lost_bodies = {i for i, a in enumerate(traffic.bodies) if json.loads(a)["user_id"] in lost}
    degraded = [a.at for a in answers if a.body % 2 == 0 and a.source != "redis"]
    degraded_lost = [a.at for a in answers if a.body in lost_bodies and a.source != "redis"]
    last = max(degraded_lost, default=start) - promoted_at
    late = [a for a in traffic.between(healed_at, end) if a.body % 2 == 0 and a.source != "redis"]
    row.expect(not late, f"{len(late)} published-user answers still degraded after recovery")
    row.detail = (
        f"promoted {promotion or 0:.2f} s after the kill; lost users read again "
        f"{recovery or 0:.2f} s after the promotion; {len(degraded)} published-user answers "
        f"degraded ({len(degraded_lost)} of the lost slots')"
    )
    row.data = {
        "victim_port": victim,
        "lost_users": len(lost),
        "promotion_s": None if promotion is None else round(promotion, 2),
        "last_degraded_after_promotion_s": round(last, 2),
        "every_worker_ok_after_promotion_s": round(healed_at - promoted_at, 2),
        "degraded_answers": len(degraded),
        "degraded_lost_answers": len(degraded_lost),
        "sources": _sources(answers),
    }
    cluster.start_nodes([victim])  # rejoins as a replica of the promoted one
    cluster.wait_ok()
    return row


def _whole_cluster(
    cluster: LocalCluster, base: str, traffic: Traffic, item: str, opts: ClusterOptions
) -> Row:
    ports = sorted(cluster.procs)
    start = time.perf_counter()
    for port in ports:
        cluster.kill(port)
    time.sleep(opts.down_s / 2)
    write = call(base, "POST", "/v1/users/probe-down/events", {"item_ids": [item]}, timeout=10)
    ready = call(base, "GET", "/health/ready", timeout=10)
    time.sleep(opts.down_s / 2)
    cluster.start_nodes(ports)
    back = cluster.wait_ok()
    ok_at = time.perf_counter()
    recovery = _until(lambda: _reads_again_written(base, item), opts.recovery_bound_s)
    healed = wait_for_workers([base], [opts.workers], {"redis": "ok"}, opts.recovery_bound_s)
    end = time.perf_counter()
    answers = traffic.between(start, end)
    row = Row(
        "cluster: every node killed, then restarted (empty)",
        Stats.of(answers),
        recovery_s=None if recovery is None or healed is None else round(end - ok_at, 2),
    )
    _judge(row, answers, opts)
    row.expect(
        write.status == 503 and "Redis is unavailable" in str(write.body),
        f"a write while down answered {write.status} {str(write.body)[:80]}, not 503",
    )
    row.expect(
        ready.status == 200 and ready.body.get("redis") == "unavailable",
        f"readiness while down said {ready.status} {ready.body}",
    )
    row.expect(recovery is not None, f"no write read back {opts.recovery_bound_s:g} s after")
    row.expect(healed is not None, "not every worker reported Redis ok again")
    row.detail = (
        f"down {opts.down_s:g} s, cluster ok {back:.2f} s after the restart; "
        f"sources {_sources(answers)}"
    )
    row.data = {"down_s": opts.down_s, "cluster_ok_s": round(back, 2), "sources": _sources(answers)}
    return row


def _reads_again_written(base: str, item: str) -> bool:
    written = call(base, "POST", "/v1/users/probe-back/events", {"item_ids": [item]}, timeout=10)
    if written.status != 200:
        return False
    back = call(base, "POST", "/v1/recall", {"user_id": "probe-back", "k": 5}, timeout=10)
    return back.status == 200 and back.body["feature_source"] == "redis"
