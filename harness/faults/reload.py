"""Scenario: reloads under load.

Replicas (each with its own worker processes) share a MODEL_DIR and a Redis. While a steady
recall load runs on all of them, the fleet is moved back and forth between two good versions,
first by `POST /admin/reload {version}` (pinned through Redis, sent to each replica in turn),
then by rewriting LATEST; then every corrupt bundle is offered, through the admin API and
through LATEST. Every answer must be a 200 that matches, item for item, what the version it
names gives for that body; every bad bundle must be refused with a 4xx and its reason while the
last good version serves on; every change must reach every worker within a bound.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.faults.client import Reply, call, wait_for_workers
from harness.faults.corrupt import CORRUPTIONS, Corruption, make_bad_version
from harness.faults.report import Row
from harness.faults.traffic import Answer, Oracle, Stats, Traffic, items_of
from harness.stack import Stack, Versions
from models.bundle import ITEM_IDS, write_latest


@dataclass(frozen=True)
class ReloadOptions:
    replicas: tuple[int, ...] = (2, 2)  # worker processes of each replica
    reloads: int = 20  # good reloads: half through the admin API, half through LATEST
    connections: int = 4
    poll_s: float = 0.5  # RELOAD_POLL_S of the services
    converge_bound_s: float = 20.0  # a reload must reach every worker within this


def probe_bodies(bundle: Path, n: int = 8) -> list[dict[str, Any]]:
    """Requests that carry their own history, so the answer depends on the model only."""
    item_ids = json.loads((bundle / ITEM_IDS).read_text())
    rng = random.Random(7)
    return [
        {"user_id": f"probe-{i}", "k": 10, "history": rng.sample(item_ids, 5)} for i in range(n)
    ]


class Fleet:
    """The replicas as one: reloads, convergence and what each version answers."""

    def __init__(self, bases: list[str], workers: list[int], opts: ReloadOptions) -> None:
        self.bases, self.workers, self.opts = bases, workers, opts

    def converge(self, want: dict[str, Any]) -> float | None:
        return wait_for_workers(self.bases, self.workers, want, self.opts.converge_bound_s)

    def learn(self, oracle: Oracle, version: str, bodies: list[dict[str, Any]]) -> list[str]:
        """Ask every replica (twice, to reach more workers) for every body; the problems."""
        problems = []
        for base in self.bases * 2:
            for n, body in enumerate(bodies):
                reply = call(base, "POST", "/v1/recall", body)
                if reply.status != 200 or reply.body["model_version"] != version:
                    problems.append(f"calm recall on {version}: {reply.status} {reply.body}")
                elif not oracle.learn(version, n, items_of(reply.body)):
                    problems.append(f"two workers answer body {n} differently on {version}")
        return problems


def run(stack: Stack, versions: Versions, opts: ReloadOptions) -> list[Row]:
    model_dir, v1, v2 = versions.model_dir, versions.v1, versions.v2
    bad = [
        (make_bad_version(model_dir, model_dir / v2, n, c), c) for n, c in enumerate(CORRUPTIONS)
    ]
    redis = stack.redis()
    replicas = stack.services(
        model_dir, redis.url, opts.replicas, env={"RELOAD_POLL_S": opts.poll_s}
    )
    fleet = Fleet([s.base_url for s in replicas], list(opts.replicas), opts)
    bodies = probe_bodies(model_dir / v1)
    oracle = Oracle()
    setup: list[str] = []
    for version in (v2, v1):  # calm: only one version serves while its answers are learnt
        reply = call(fleet.bases[0], "POST", "/admin/reload", {"version": version}, admin=True)
        if reply.status != 200 or fleet.converge({"model_version": version}) is None:
            raise RuntimeError(f"cannot move the fleet to {version}: {reply.body}")
        setup += fleet.learn(oracle, version, bodies)
    if not oracle.distinguishes(v1, v2):
        setup.append("the two versions answer some probe alike: the check would be blind")

    urls = [b + "/v1/recall" for b in fleet.bases]
    with Traffic(urls, bodies, opts.connections, oracle=oracle) as traffic:
        start = time.perf_counter()
        good = _good_reloads(fleet, versions, opts)
        middle = time.perf_counter()
        refused = _bad_bundles(fleet, model_dir, bad, current=good.data["final_version"])
        end = time.perf_counter()

    good.problems[:0] = setup
    phases = ((good, traffic.between(start, middle)), (refused, traffic.between(middle, end)))
    for row, answers in phases:
        row.stats = Stats.of(answers)
        mismatches = sum(1 for a in answers if a.mismatch)
        row.expect(row.stats.requests > 0, "no recall was answered during the phase")
        row.expect(
            row.stats.failures == 0,
            f"{row.stats.failures} failed recalls "
            f"({mismatches} mixed or misnamed versions): {_examples(answers)}",
        )
        row.data["answers_by_version"] = _count_versions(answers)
    good.expect(
        set(good.data["answers_by_version"]) == {v1, v2},
        f"recalls answered by {good.data['answers_by_version']}, not both versions",
    )
    return [good, refused]


def _good_reloads(fleet: Fleet, versions: Versions, opts: ReloadOptions) -> Row:
    row = Row("reload: 2 good versions under load", Stats.of([]))
    v1, v2, model_dir = versions.v1, versions.v2, versions.model_dir
    current = v1  # the calm phase ended on v1, pinned
    times: list[float] = []
    admin = opts.reloads // 2
    for n in range(opts.reloads):
        target = v2 if current == v1 else v1
        base = fleet.bases[n % len(fleet.bases)]
        reply: Reply | None = None
        if n < admin:
            reply = call(base, "POST", "/admin/reload", {"version": target}, admin=True)
        else:
            write_latest(model_dir, target)
            # The first LATEST change also unpins (a reload without a version): from then
            # on every worker follows LATEST by itself.
            if n == admin:
                reply = call(base, "POST", "/admin/reload", admin=True)
        if reply is not None and not row.expect(
            reply.status == 200 and reply.body["model_version"] == target,
            f"reload to {target} answered {reply.status} {reply.body}",
        ):
            continue
        took = fleet.converge({"model_version": target, "reload_error": None})
        if took is None:
            row.problems.append(f"not every worker serves {target} after {opts.converge_bound_s} s")
        else:
            times.append(took)
            current = target
    row.recovery_s = round(max(times), 2) if times else None
    workers = "+".join(str(w) for w in fleet.workers)
    row.detail = (
        f"{len(times)} reloads ({admin} admin, {opts.reloads - admin} LATEST), all "
        f"{sum(fleet.workers)} workers ({workers}) converged ≤ {row.recovery_s} s"
    )
    row.data |= {"converge_s": [round(t, 2) for t in times], "final_version": current}
    return row


def _bad_bundles(
    fleet: Fleet, model_dir: Path, bad: list[tuple[str, Corruption]], current: str
) -> Row:
    row = Row("reload: corrupt bundles refused", Stats.of([]))
    refusals = []
    for name, corruption in bad:
        reply = call(fleet.bases[0], "POST", "/admin/reload", {"version": name}, admin=True)
        detail = reply.body.get("detail", "") if isinstance(reply.body, dict) else ""
        ok = 400 <= reply.status < 500 and detail.startswith(f"bundle {name} rejected: ")
        row.expect(
            ok and corruption.reason in detail,
            f"{corruption.name}: admin reload answered {reply.status} {reply.body}",
        )
        refusals.append({"bundle": corruption.name, "status": reply.status, "detail": detail})
        # Through LATEST: every worker tries it, refuses it, says why, and serves on.
        write_latest(model_dir, name)
        reason = corruption.reason
        took = fleet.converge(
            {"model_version": current, "reload_error": lambda e, r=reason: bool(e) and r in e}
        )
        row.expect(
            took is not None,
            f"{corruption.name} via LATEST: not every worker "
            "reports the refusal while serving the last good version",
        )
        write_latest(model_dir, current)
        healed = fleet.converge({"model_version": current, "reload_error": None})
        row.expect(healed is not None, f"{corruption.name}: reload_error did not clear")
    statuses = sorted({r["status"] for r in refusals})
    row.detail = (
        f"{len(bad)} kinds ({', '.join(c.name for _, c in bad)}) refused with {statuses} "
        f"by the admin API and via LATEST on every worker; {current} served on"
    )
    row.data["refusals"] = refusals
    return row


def _count_versions(answers: list[Answer]) -> dict[str, int]:
    out: dict[str, int] = {}
    for a in answers:
        if a.version is not None:
            out[a.version] = out.get(a.version, 0) + 1
    return out


def _examples(answers: list[Answer], n: int = 3) -> str:
    failed = [a for a in answers if a.failed][:n]
    return "; ".join(f"{a.status} {a.version} mismatch={a.mismatch} {a.error}" for a in failed)
