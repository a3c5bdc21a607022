"""Scenario: item changes during reloads and under load.

Replicas (each with its own worker processes) share a MODEL_DIR and a Redis. While a steady
recall load runs on all of them, rounds of item changes are made: an item added (the
attributes of a catalogue item, under a new id) through one replica, a catalogue item the
probes are answered with deleted through another, and every other round a reload to the
other version started at the same moment. Every recall must be a 200 without a duplicate
item; every change must reach every worker of every replica within a bound (its state in
`GET /v1/items/{id}`, on the version then serving). One probe of the load filters on exactly
the changed ids (`allow_ids`): every answer it gets sent after an addition reached every
worker must hold the added item, and none sent after a deletion did the deleted one. Then
one replica is restarted: it must replay every change.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from typing import Any

from harness.faults.client import Reply, call, wait_for_workers
from harness.faults.reload import probe_bodies
from harness.faults.report import Row
from harness.faults.traffic import Answer, Stats, Traffic
from harness.stack import Stack, Versions
from models.sources import load_dataset


@dataclass(frozen=True)
class ItemsOptions:
    replicas: tuple[int, ...] = (2, 2)  # worker processes of each replica
    rounds: int = 8  # an added and a deleted item each; a reload every other round
    connections: int = 4
    poll_s: float = 0.5  # RELOAD_POLL_S of the services
    converge_bound_s: float = 20.0  # a change must reach every worker within this


Seen = tuple[float, int, list[str]]  # an answer: when it was sent, its body, its items


class ItemTraffic(Traffic):
    """The recall load, keeping the items of every answer."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.items: list[Seen] = []

    def _record(self, start: float, status: int, data: bytes, index: int) -> Answer:
        answer = super()._record(start, status, data, index)
        if status == 200:
            self.items.append((start, index, [i["item_id"] for i in json.loads(data)["items"]]))
        return answer


class Fleet:
    """The replicas as one: where each worker serves an item, and how long it took."""

    def __init__(self, bases: list[str], workers: list[int], opts: ItemsOptions) -> None:
        self.bases, self.workers, self.opts = bases, workers, opts

    def converge(self, item_id: str, status: str, version: str) -> float | None:
        """Seconds until every worker of every replica serves `item_id` as `status` on
        `version` (GET on fresh connections); None past the bound."""
        start = time.perf_counter()
        seen: list[set[str]] = [set() for _ in self.bases]
        while time.perf_counter() - start < self.opts.converge_bound_s:
            for n, base in enumerate(self.bases):
                reply = call(base, "GET", f"/v1/items/{item_id}", timeout=5)
                body = reply.body if isinstance(reply.body, dict) else {}
                if (body.get("status"), body.get("model_version")) == (status, version):
                    seen[n].add(body["worker"])
            if all(len(s) == c for s, c in zip(seen, self.workers, strict=True)):
                return time.perf_counter() - start
            time.sleep(0.02)
        return None


def run(stack: Stack, versions: Versions, opts: ItemsOptions) -> list[Row]:
    redis = stack.redis()
    replicas = stack.services(
        versions.model_dir, redis.url, opts.replicas, env={"RELOAD_POLL_S": opts.poll_s}
    )
    fleet = Fleet([s.base_url for s in replicas], list(opts.replicas), opts)
    bodies = probe_bodies(versions.model_dir / versions.v1)
    victims = _answered(fleet.bases[0], bodies)[: opts.rounds]
    if len(victims) < opts.rounds:
        raise RuntimeError(f"the probes are answered with {len(victims)} items only")
    attributes = _attributes(versions.source, opts.rounds)
    added = [f"fault-new-{n}" for n in range(opts.rounds)]
    # The probe that sees the overlay whatever the model ranks: only the changed ids pass.
    watch = {"allow_ids": added + victims}
    bodies.append({"user_id": "probe-items", "k": len(watch["allow_ids"]), "filter": watch})
    row = Row("items: changes during reloads under load", Stats.of([]))
    urls = [b + "/v1/recall" for b in fleet.bases]
    traffic = ItemTraffic(urls, bodies, opts.connections)
    with traffic:
        start = time.perf_counter()
        served = _rounds(fleet, versions, list(zip(added, victims, attributes, strict=True)), row)
    answers = traffic.between(start)
    row.stats = Stats.of(answers)
    row.expect(row.stats.requests > 0, "no recall was answered during the changes")
    row.expect(row.stats.failures == 0, f"{row.stats.failures} failed recalls")
    _check_answers(row, traffic.items, served, len(bodies) - 1)
    row.data["versions"] = sorted({a.version for a in answers if a.version})
    restarted = _restart(replicas[-1], fleet, served)
    return [row, restarted]


def _answered(base: str, bodies: list[dict[str, Any]]) -> list[str]:
    """Catalogue items the probes are answered with, best first: what deleting shows."""
    found: dict[str, None] = {}
    for body in bodies:
        reply = call(base, "POST", "/v1/recall", body)
        if reply.status != 200:
            raise RuntimeError(f"calm recall failed: {reply.status} {reply.body}")
        found |= dict.fromkeys(i["item_id"] for i in reply.body["items"])
    return list(found)


def _attributes(source: str, n: int) -> list[dict[str, Any]]:
    """The raw attributes of `n` catalogue items, as the item table spells them."""
    rows = load_dataset(source).items.head(n).to_dict("records")
    return [
        {"category": str(r["category"]), "tags": str(r["tags"]).split("|"), "price": r["price"]}
        for r in rows
    ]


Served = dict[str, tuple[str, float]]  # item id -> (status, when every worker served it)


def _rounds(
    fleet: Fleet, versions: Versions, changes: list[tuple[str, str, dict[str, Any]]], row: Row
) -> Served:
    """The rounds of changes (added id, deleted id, attributes); when each reached every
    worker."""
    version, times, served = versions.v1, [], {}
    for n, (added, victim, attributes) in enumerate(changes):
        base, other = fleet.bases[n % len(fleet.bases)], fleet.bases[-1 - n % len(fleet.bases)]
        reload = None
        if n % 2:  # a reload started with the changes, so they land around its swap
            version = versions.v2 if version == versions.v1 else versions.v1
            reload = Background(other, "POST", "/admin/reload", {"version": version})
        put = call(base, "PUT", f"/v1/items/{added}", {"attributes": attributes}, admin=True)
        gone = call(other, "DELETE", f"/v1/items/{victim}", admin=True)
        replies = [(put, f"put {added}"), (gone, f"delete {victim}")]
        if reload is not None:
            replies.append((reload.reply(), f"reload to {version}"))
        for reply, what in replies:
            row.expect(reply.status == 200, f"{what}: {reply.status} {reply.body}")
        if wait_for_workers(fleet.bases, fleet.workers, {"model_version": version}, 60) is None:
            row.problems.append(f"round {n}: not every worker serves {version}")
        for item_id, status in ((added, "added"), (victim, "deleted")):
            took = fleet.converge(item_id, status, version)
            if took is None:
                row.problems.append(f"{item_id} not {status} on every worker")
                continue
            times.append(took)
            served[item_id] = (status, time.perf_counter())
    row.recovery_s = round(max(times), 2) if times else None
    row.detail = (
        f"{len(changes)} items added and {len(changes)} deleted, {len(changes) // 2} reloads "
        f"with them; every change on all {sum(fleet.workers)} workers ≤ {row.recovery_s} s"
    )
    row.data["converge_s"] = [round(t, 2) for t in times]
    return served


class Background(threading.Thread):
    """One call on a thread of its own, started at once; `reply()` waits for it."""

    def __init__(self, base: str, method: str, path: str, body: Any) -> None:
        super().__init__(daemon=True)
        self.args_ = (base, method, path, body)
        self.result: Reply | None = None
        self.start()

    def run(self) -> None:
        base, method, path, body = self.args_
        self.result = call(base, method, path, body, admin=True)

    def reply(self) -> Reply:
        self.join(60)
        return self.result or Reply(0, "no answer within 60 s", 60.0)


def _check_answers(row: Row, items: list[Seen], served: Served, watch: int) -> None:
    """No duplicate in an answer; no deleted item in one sent after the deletion reached
    every worker; every added item in the watch probe's answers sent after it did."""
    duplicates = sum(1 for _, _, ids in items if len(ids) != len(set(ids)))
    row.expect(duplicates == 0, f"{duplicates} answers hold an item twice")
    late, missing = [], []
    for at, body, ids in items:
        for item_id, (status, when) in served.items():
            if at <= when:
                continue
            if status == "deleted" and item_id in ids:
                late.append((item_id, round(at - when, 3)))
            elif status == "added" and body == watch and item_id not in ids:
                missing.append((item_id, round(at - when, 3)))
    row.expect(not late, f"deleted items returned after every worker hid them: {late[:5]}")
    row.expect(not missing, f"added items missing after every worker served them: {missing[:5]}")
    watched = [ids for _, body, ids in items if body == watch]
    row.expect(bool(watched), "the probe of the changed ids was never answered")
    row.data |= {"answers_checked": len(items), "watch_answers": len(watched)}


def _restart(service: Any, fleet: Fleet, served: Served) -> Row:
    """Restart one replica (no load): it must serve every change again, replayed."""
    row = Row("items: a restarted replica replays the changes", Stats.of([]))
    service.stop()
    started = time.perf_counter()
    service.start()
    service.wait_ready(120)
    reply = call(service.base_url, "GET", "/health/ready")
    version = str(reply.body.get("model_version") if isinstance(reply.body, dict) else None)
    single = Fleet([service.base_url], [fleet.workers[-1]], fleet.opts)
    for item_id, (status, _) in served.items():
        replayed = single.converge(item_id, status, version)
        row.expect(replayed is not None, f"{item_id} not {status} after the restart")
    row.recovery_s = round(time.perf_counter() - started, 2)
    row.detail = f"{len(served)} changes replayed on {version} by every worker"
    return row
