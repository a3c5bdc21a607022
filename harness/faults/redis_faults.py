"""Scenario: Redis faults under load.

The service reaches Redis through a delay proxy (so latency can be injected) with the L1
cache off (every recall asks Redis: the worst case). Under a steady load of recalls, half for
published users (features from Redis) and half carrying their own history, Redis is made slow
(under and over REDIS_TIMEOUT_MS), full (maxmemory 1, noeviction), read-only (a replica of a
master that does not exist), hung (SIGSTOP) and killed (SIGKILL, then restarted empty on its
port). Throughout, every recall must answer 200 within the p99 budget; while Redis is
unusable readiness must say `"redis": "unavailable"` and writes must get a 503 with the
reason; after each fault the service must heal by itself: readiness `ok` on every worker, a
write accepted and read back by the next recall. Recovery time is measured from the moment
the fault is removed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from harness.faults.client import Periodic, call, wait_for_workers
from harness.faults.proxy import DelayProxy
from harness.faults.report import Row
from harness.faults.traffic import Stats, Traffic
from harness.procs import RedisServer, free_port
from harness.stack import RECIPE, Stack, Versions, publish
from models.bundle import ITEM_IDS
from models.redis_keys import DEFAULT_PREFIX, user_key

PROBE_USER = "fault-probe"


@dataclass(frozen=True)
class RedisOptions:
    workers: int = 2
    phase_s: float = 8.0  # how long each fault lasts
    connections: int = 4
    users: int = RECIPE.users  # published users the load asks for (u0..u{users-1})
    # REDIS_TIMEOUT_MS: twice the default, which CPU contention alone can reach on a busy
    # two-core box (then a healthy Redis would look faulty and the verdicts would be noise).
    timeout_ms: int = 100
    retry_after_ms: int = 500  # REDIS_RETRY_AFTER_MS
    p99_budget_ms: float = 250.0  # recall p99 bound during every fault
    recovery_bound_s: float = 15.0
    # Readiness and writes are judged from `grace_s` after the fault is injected until
    # `grace_s` before it is removed: a probe sent just before then may be answered after.
    grace_s: float = 0.5


@dataclass(frozen=True)
class Fault:
    name: str
    inject: Callable[[], None]
    heal: Callable[[], None]
    unavailable: bool  # readiness must say "unavailable" (else "ok")
    write_error: str | None  # what a refused write's 503 detail says; None: writes succeed


class Prober(Periodic):
    """A feature write, an events write and a readiness probe in turn, on fresh connections,
    each recorded with its time, status and detail (the readiness' `redis` field)."""

    def __init__(self, base: str, features: dict[str, Any], item: str, period_s: float = 0.05):
        super().__init__(period_s)
        self.base = base
        self.records: list[tuple[float, str, int, str]] = []
        self.calls = [
            ("features", "PUT", f"/v1/users/{PROBE_USER}/features", {"features": features}),
            ("events", "POST", f"/v1/users/{PROBE_USER}/events", {"item_ids": [item]}),
            ("ready", "GET", "/health/ready", None),
        ]

    def step(self) -> None:
        kind, method, path, body = self.calls[len(self.records) % len(self.calls)]
        start = time.perf_counter()
        reply = call(self.base, method, path, body, timeout=10)
        if isinstance(reply.body, dict):
            detail = reply.body.get("redis" if kind == "ready" else "detail", "")
        else:
            detail = reply.body
        self.records.append((start, kind, reply.status, str(detail or "")))

    def between(self, start: float, end: float, kind: str) -> list[tuple[int, str]]:
        return [(s, d) for t, k, s, d in list(self.records) if k == kind and start <= t < end]


def run(stack: Stack, versions: Versions, opts: RedisOptions) -> list[Row]:
    server = stack.redis()
    publish(server.url, versions.source)
    admin = redis.Redis.from_url(server.url, socket_timeout=2, decode_responses=True)
    stack.callback(admin.close)
    features = json.loads(admin.get(user_key(DEFAULT_PREFIX, "u1")) or "{}")
    item = json.loads((versions.model_dir / versions.v1 / ITEM_IDS).read_text())[0]
    proxy = DelayProxy(server.port)
    stack.callback(proxy.stop)
    env = {
        "CACHE_TTL_S": 0,
        "REDIS_TIMEOUT_MS": opts.timeout_ms,
        "REDIS_RETRY_AFTER_MS": opts.retry_after_ms,
        "RELOAD_POLL_S": 1,
    }
    (service,) = stack.services(versions.model_dir, proxy.url(), [opts.workers], env=env)
    bodies: list[dict[str, Any]] = []
    for n in range(64):  # published users, and users that bring their history along
        bodies.append({"user_id": f"u{(n * 37) % opts.users}", "k": 10})
        bodies.append({"user_id": f"guest-{n}", "k": 10, "history": [item]})
    faults = _faults(server, proxy, admin, opts)
    rows = []
    recall = [service.base_url + "/v1/recall"]
    with (
        Traffic(recall, bodies, opts.connections) as traffic,
        Prober(service.base_url, features, item) as prober,
    ):
        for fault in faults:
            start = time.perf_counter()
            fault.inject()
            time.sleep(opts.phase_s)
            end = time.perf_counter()
            fault.heal()
            recovery = _recover(service.base_url, opts) if fault.name != "none" else None
            rows.append(_judge(fault, traffic, prober, start, end, recovery, opts))
    return rows


def _faults(
    server: RedisServer, proxy: DelayProxy, admin: redis.Redis, opts: RedisOptions
) -> list[Fault]:
    def nothing() -> None:
        return None

    def config(**values: Any) -> Callable[[], None]:
        def apply() -> None:
            for name, value in values.items():
                admin.config_set(name.replace("_", "-"), value)

        return apply

    def restart() -> None:
        server.start()  # same port, empty: nothing was persisted

    over, under = 4 * opts.timeout_ms / 1000, opts.timeout_ms / 5000
    unavailable = "Redis is unavailable"
    return [
        Fault("none", nothing, nothing, False, None),
        Fault(f"slow (+{under * 1000:g} ms, under the timeout)",
              lambda: proxy.delay(under), lambda: proxy.delay(0), False, None),
        Fault("full (maxmemory 1, noeviction)",
              config(maxmemory_policy="noeviction", maxmemory=1), config(maxmemory=0), False,
              "command not allowed when used memory"),
        Fault("read-only (replica of a dead master)",
              lambda: _replicaof(admin, "127.0.0.1", free_port()),
              lambda: _replicaof(admin, "NO", "ONE"), False, "read only replica"),
        Fault(f"slow (+{over * 1000:g} ms, over the timeout)",
              lambda: proxy.delay(over), lambda: proxy.delay(0), True, unavailable),
        Fault("hung (SIGSTOP)", server.pause, server.resume, True, unavailable),
        Fault("killed (SIGKILL), restarted empty", server.kill, restart, True, unavailable),
    ]  # fmt: skip


def _replicaof(admin: redis.Redis, host: str, port: int | str) -> None:
    admin.replicaof(host, port)


def _recover(base: str, opts: RedisOptions) -> float | None:
    """Seconds until every worker reports Redis ok, a write is accepted and the next recall
    reads it back from Redis; None past the bound."""
    start = time.perf_counter()
    deadline = start + opts.recovery_bound_s
    history = {"item_ids": ["i1"]}
    while time.perf_counter() < deadline:
        written = call(base, "POST", f"/v1/users/{PROBE_USER}-heal/events", history)
        recall = call(base, "POST", "/v1/recall", {"user_id": f"{PROBE_USER}-heal", "k": 5})
        if (
            written.status == 200
            and recall.status == 200
            and (recall.body["feature_source"] == "redis")
        ):
            break
        time.sleep(0.02)
    else:
        return None
    left = deadline - time.perf_counter()
    # Each worker heals on its own next call: readiness probes them all.
    if wait_for_workers([base], [opts.workers], {"redis": "ok"}, max(left, 0.1)) is None:
        return None
    return round(time.perf_counter() - start, 2)


def _judge(
    fault: Fault,
    traffic: Traffic,
    prober: Prober,
    start: float,
    end: float,
    recovery: float | None,
    opts: RedisOptions,
) -> Row:
    answers = traffic.between(start, end)
    row = Row(f"redis: {fault.name}", Stats.of(answers), recovery_s=recovery)
    s = row.stats
    row.expect(s.requests > 0, "no recall was answered")
    row.expect(
        s.failures == 0,
        f"{s.failures} recalls failed: {[(a.status, a.error) for a in answers if a.failed][:3]}",
    )
    row.expect(
        s.p99_ms is not None and s.p99_ms <= opts.p99_budget_ms,
        f"recall p99 {s.p99_ms} ms over the {opts.p99_budget_ms:g} ms budget",
    )
    settled, until = start + opts.grace_s, end - opts.grace_s
    ready = prober.between(settled, until, "ready")
    want = "unavailable" if fault.unavailable else "ok"
    row.expect(
        bool(ready) and all(d == want for _, d in ready),
        f"readiness said {sorted({d for _, d in ready})}, not only {want!r}",
    )
    writes = prober.between(settled, until, "features") + prober.between(settled, until, "events")
    if fault.write_error is None:
        row.expect(
            bool(writes) and all(st == 200 for st, _ in writes),
            f"writes answered {sorted({st for st, _ in writes})}, not only 200",
        )
    else:
        error = fault.write_error
        row.expect(
            bool(writes) and all(st == 503 and error in d for st, d in writes),
            f"writes answered {sorted({(st, d[:60]) for st, d in writes})}, not only 503 "
            f"'{error}…'",
        )
    if fault.name != "none":
        row.expect(recovery is not None, f"not healed {opts.recovery_bound_s:g} s after the fault")
    sources: dict[str, int] = {}
    for a in answers:
        if a.source:
            sources[a.source] = sources.get(a.source, 0) + 1
    write_details = sorted({d for st, d in writes if st != 200})
    row.detail = f"ready {want}; writes {sorted({st for st, _ in writes})}; sources {sources}"
    row.data = {"sources": sources, "write_errors": write_details[:3], "ready_probes": len(ready)}
    return row
