"""A checking load generator: closed-loop recall requests on keep-alive connections, each
answer recorded with its status, latency, model version and feature source, and checked
against an oracle: the exact items and scores each version gives for that body.

Threads with `http.client`, one connection each: far slower than wrk, but every answer is
parsed and checked, which is the point here; a few connections are enough to keep the
service busy on a small box without starving the processes under test.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from harness.latency import percentile_ms

Items = tuple[tuple[str, float], ...]
SCORE_TOLERANCE = 1e-5


@dataclass(frozen=True, slots=True)
class Answer:
    at: float  # time.perf_counter() when the request was sent
    latency_s: float
    status: int  # 0: no HTTP answer (the connection failed)
    version: str | None
    source: str | None  # feature_source
    body: int  # index of the request body
    mismatch: bool  # a 200 whose items differ from what its version gives for this body
    error: str | None = None

    @property
    def failed(self) -> bool:
        return self.status != 200 or self.mismatch


def items_of(answer: dict[str, Any]) -> Items:
    return tuple((i["item_id"], float(i["score"])) for i in answer["items"])


def same_items(a: Items, b: Items) -> bool:
    return [i for i, _ in a] == [i for i, _ in b] and all(
        abs(x - y) <= SCORE_TOLERANCE for (_, x), (_, y) in zip(a, b, strict=True)
    )


@dataclass
class Oracle:
    """What each version answers for each body, learnt while only that version served."""

    expected: dict[str, dict[int, Items]] = field(default_factory=dict)

    def learn(self, version: str, body: int, items: Items) -> bool:
        """Record (or confirm) an answer; False when it contradicts an earlier one."""
        known = self.expected.setdefault(version, {}).setdefault(body, items)
        return same_items(known, items)

    def matches(self, version: str, body: int, items: Items) -> bool:
        known = self.expected.get(version, {}).get(body)
        return known is not None and same_items(known, items)

    def distinguishes(self, a: str, b: str) -> bool:
        """Every body is answered differently by versions a and b (so a response that mixed
        them, or named the wrong one, cannot pass)."""
        ea, eb = self.expected.get(a, {}), self.expected.get(b, {})
        return bool(ea) and ea.keys() == eb.keys() and all(not same_items(ea[i], eb[i]) for i in ea)


class Traffic:
    """`connections` threads posting `bodies` round-robin to `urls` (connection i uses
    urls[i % len(urls)]) until stopped; with an oracle, every 200 is checked against it.

    Args:
        urls: recall endpoints (one per replica).
        bodies: request bodies, sent in turn.
        connections: concurrent keep-alive connections.
        pause_s: sleep after each answer (keeps the offered load sane on small boxes).
        oracle: expected items per version and body; None: no content check.
        timeout_s: per-request socket timeout.
    """

    def __init__(
        self,
        urls: Sequence[str],
        bodies: Sequence[dict[str, Any]],
        connections: int = 4,
        pause_s: float = 0.0,
        oracle: Oracle | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        self.urls = list(urls)
        self.bodies = [json.dumps(b).encode() for b in bodies]
        self.connections = connections
        self.pause_s = pause_s
        self.oracle = oracle
        self.timeout_s = timeout_s
        self.answers: list[Answer] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> Traffic:
        for n in range(self.connections):
            thread = threading.Thread(target=self._run, args=(n,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout_s + 5)

    def between(self, start: float, end: float | None = None) -> list[Answer]:
        end = time.perf_counter() if end is None else end
        return [a for a in list(self.answers) if start <= a.at < end]

    def _connect(self, url: str) -> http.client.HTTPConnection:
        parts = urlsplit(url)
        host = parts.hostname or "127.0.0.1"
        return http.client.HTTPConnection(host, parts.port, timeout=self.timeout_s)

    def _run(self, n: int) -> None:
        url = self.urls[n % len(self.urls)]
        path = urlsplit(url).path
        conn = self._connect(url)
        headers = {"Content-Type": "application/json"}
        i = n
        try:
            while not self._stop.is_set():
                index = i % len(self.bodies)
                i += self.connections
                start = time.perf_counter()
                try:
                    conn.request("POST", path, body=self.bodies[index], headers=headers)
                    response = conn.getresponse()
                    data = response.read()
                except (OSError, http.client.HTTPException) as exc:
                    elapsed = time.perf_counter() - start
                    error = f"{type(exc).__name__}: {exc}"
                    self.answers.append(Answer(start, elapsed, 0, None, None, index, False, error))
                    conn.close()
                    conn = self._connect(url)
                    continue
                self.answers.append(self._record(start, response.status, data, index))
                if self.pause_s:
                    self._stop.wait(self.pause_s)
        finally:
            conn.close()

    def _record(self, start: float, status: int, data: bytes, index: int) -> Answer:
        elapsed = time.perf_counter() - start
        if status != 200:
            return Answer(start, elapsed, status, None, None, index, False, data[:300].decode())
        answer = json.loads(data)
        version, source = answer["model_version"], answer["feature_source"]
        mismatch = self.oracle is not None and not self.oracle.matches(
            version, index, items_of(answer)
        )
        return Answer(start, elapsed, status, version, source, index, mismatch)


@dataclass(frozen=True)
class Stats:
    requests: int
    failures: int
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None

    @classmethod
    def of(cls, answers: Sequence[Answer]) -> Stats:
        """Of a load's answers; a failure is a non-200 or a mismatch."""
        failures = sum(1 for a in answers if a.failed)
        return cls.of_latencies([a.latency_s for a in answers], failures)

    @classmethod
    def of_latencies(cls, latencies: Sequence[float], failures: int) -> Stats:
        def pct(q: float) -> float | None:
            return percentile_ms(latencies, q, digits=1)

        return cls(len(latencies), failures, pct(0.50), pct(0.99), pct(1.0))
