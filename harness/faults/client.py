"""Small blocking HTTP helpers on fresh connections (so successive calls can reach different
worker processes), with the answer's status and JSON body, never an exception for a 4xx/5xx."""

from __future__ import annotations

import http.client
import json
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Self
from urllib.parse import urlsplit

from harness.stack import ADMIN_TOKEN


@dataclass(frozen=True)
class Reply:
    status: int  # 0: no HTTP answer (refused, reset, timed out)
    body: Any  # parsed JSON, else the text, else the transport error
    elapsed_s: float


def call(
    base: str,
    method: str,
    path: str,
    body: Any = None,
    *,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
    admin: bool = False,
    timeout: float = 30.0,
) -> Reply:
    """One request on a new connection; `raw` sends those bytes as the body unchanged."""
    parts = urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=timeout)
    sent = dict(headers or {})
    data = raw
    if body is not None:
        data = json.dumps(body).encode()
    if data is not None:
        sent.setdefault("Content-Type", "application/json")
    if admin:
        sent["Authorization"] = f"Bearer {ADMIN_TOKEN}"
    start = time.perf_counter()
    try:
        conn.request(method, path, body=data, headers=sent)
        response = conn.getresponse()
        text = response.read()
        status = response.status
    except (OSError, http.client.HTTPException) as exc:
        return Reply(0, f"{type(exc).__name__}: {exc}", time.perf_counter() - start)
    finally:
        conn.close()
    elapsed = time.perf_counter() - start
    try:
        return Reply(status, json.loads(text), elapsed)
    except ValueError:
        return Reply(status, text.decode(errors="replace"), elapsed)


def ready(base: str) -> Reply:
    return call(base, "GET", "/health/ready", timeout=5)


def wait_for_workers(
    bases: list[str], workers: list[int], want: dict[str, Any], timeout_s: float
) -> float | None:
    """Poll /health/ready on fresh connections until every worker of every replica (the
    count of each is `workers`) has answered with the fields in `want` as its latest answer.
    Returns the seconds it took, None when `timeout_s` passed first."""
    start = time.perf_counter()
    latest: list[dict[str, dict[str, Any]]] = [{} for _ in bases]
    while time.perf_counter() - start < timeout_s:
        for n, base in enumerate(bases):
            reply = ready(base)
            if reply.status == 200 and isinstance(reply.body, dict):
                latest[n][reply.body["worker"]] = reply.body
        if all(
            len(seen) == count and all(_has(b, want) for b in seen.values())
            for seen, count in zip(latest, workers, strict=True)
        ):
            return time.perf_counter() - start
        time.sleep(0.02)
    return None


def _has(body: dict[str, Any], want: dict[str, Any]) -> bool:
    for key, value in want.items():
        if callable(value):
            if not value(body.get(key)):
                return False
        elif body.get(key) != value:
            return False
    return True


class Periodic(ABC):
    """Side traffic next to the load: `step()` every `period_s` on a thread of its own, from
    entering the with-block until leaving it."""

    def __init__(self, period_s: float) -> None:
        self.period_s = period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @abstractmethod
    def step(self) -> None: ...

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.step()
            self._stop.wait(self.period_s)
