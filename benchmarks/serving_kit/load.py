"""Closed-loop HTTP load on loopback: `wrk` with a Lua script when installed, else a Python
asyncio generator (raw HTTP/1.1 keep-alive; far slower than wrk, so on a small box it can be
the bottleneck itself, and its results say so).

Recall bodies are `{"user_id": "u<random published user>", "k": K}` (plus the target's
`extra` fields, e.g. a filter): every request reads that user's features and history from
Redis, as production traffic would.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlsplit

from harness.latency import percentile_ms

WRK_MARK = "BENCH_JSON "
FALLBACK_WARNING = (
    "wrk is not installed (Debian/Ubuntu: apt-get install -y wrk): the Python generator ran "
    "instead; it shares the cores with the server and may itself be the bottleneck"
)

# Each wrk thread has its own Lua state: seed it per thread so runs are reproducible.
RECALL_LUA = """
local users, k, seed, extra = %(users)d, %(k)d, %(seed)d, [==[%(extra)s]==]
local counter = 0
setup = function(thread)
  counter = counter + 1
  thread:set("tid", counter)
end
init = function(args)
  math.randomseed(seed * 1000 + (tid or 0))
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end
request = function()
  local body = string.format('{"user_id":"u%%d","k":%%d%%s}', math.random(0, users - 1), k, extra)
  return wrk.format(nil, nil, nil, body)
end
"""
DONE_LUA = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%(mark)s{"requests":%%d,"duration_us":%%d,"errors":{"connect":%%d,"read":%%d,' ..
    '"write":%%d,"status":%%d,"timeout":%%d},"latency_us":{"p50":%%.1f,"p90":%%.1f,' ..
    '"p99":%%.1f,"max":%%.1f,"mean":%%.1f}}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    latency.mean))
end
"""


@dataclass(frozen=True)
class Target:
    """What to load: a recall POST (random published users) or a bare GET."""

    url: str
    users: int = 0  # 0: GET without a body
    k: int = 50
    seed: int = 0
    extra: str = ""  # more body fields, JSON after a comma: ',"filter":{...}'

    @property
    def is_recall(self) -> bool:
        return self.users > 0


@dataclass(frozen=True)
class LoadResult:
    generator: str
    connections: int
    threads: int
    duration_s: float
    requests: int
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    errors: dict[str, int]

    @property
    def total_errors(self) -> int:
        return sum(self.errors.values())

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"total_errors": self.total_errors}


def wrk_path() -> str | None:
    return shutil.which("wrk")


def wrk_version() -> str:
    path = wrk_path()
    if path is None:
        return ""
    proc = subprocess.run([path, "-v"], capture_output=True, text=True, check=False)
    return (proc.stdout + proc.stderr).splitlines()[0].strip() if proc.stdout or proc.stderr else ""


def wrk_script(target: Target) -> str:
    """The Lua script wrk runs for `target`: random published users for a recall, and the
    summary as one JSON line after `WRK_MARK`."""
    lua = RECALL_LUA % asdict(target) if target.is_recall else ""
    return lua + DONE_LUA % {"mark": WRK_MARK}


def run_wrk(target: Target, connections: int, threads: int, duration_s: float) -> LoadResult:
    """One wrk run; raises RuntimeError when wrk fails or prints no summary."""
    threads = max(1, min(threads, connections))
    with tempfile.NamedTemporaryFile("w", suffix=".lua", prefix="bench-") as script:
        script.write(wrk_script(target))
        script.flush()
        command = ["wrk", "-t", str(threads), "-c", str(connections)]
        command += ["-d", f"{max(1, round(duration_s))}s", "--timeout", "10s", "-s", script.name]
        proc = subprocess.run([*command, target.url], capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(WRK_MARK)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stdout}\n{proc.stderr}")
    data = json.loads(lines[-1][len(WRK_MARK) :])
    seconds = data["duration_us"] / 1e6
    lat = data["latency_us"]
    return LoadResult(
        generator="wrk",
        connections=connections,
        threads=threads,
        duration_s=round(seconds, 2),
        requests=data["requests"],
        rps=round(data["requests"] / seconds, 1),
        p50_ms=round(lat["p50"] / 1000, 3),
        p90_ms=round(lat["p90"] / 1000, 3),
        p99_ms=round(lat["p99"] / 1000, 3),
        max_ms=round(lat["max"] / 1000, 3),
        mean_ms=round(lat["mean"] / 1000, 3),
        errors=data["errors"],
    )


# -- the Python fallback -------------------------------------------------------------------


def _request_bytes(target: Target, host: str, path: str, rng: random.Random) -> bytes:
    if not target.is_recall:
        return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    body = f'{{"user_id":"u{rng.randrange(target.users)}","k":{target.k}{target.extra}}}'.encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _connection(
    target: Target,
    rng: random.Random,
    stop_at: float,
    latencies: list[float],
    errors: dict[str, int],
) -> None:
    parts = urlsplit(target.url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        errors["connect"] += 1
        return
    try:
        while time.perf_counter() < stop_at:
            start = time.perf_counter()
            writer.write(_request_bytes(target, parts.netloc, parts.path, rng))
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - start)
            if not 200 <= status < 300:
                errors["status"] += 1
    except (OSError, asyncio.IncompleteReadError, ValueError):
        errors["read"] += 1
    finally:
        writer.close()


async def python_load(target: Target, connections: int, duration_s: float) -> LoadResult:
    latencies: list[float] = []
    errors = {"connect": 0, "read": 0, "write": 0, "status": 0, "timeout": 0}
    start = time.perf_counter()
    stop_at = start + duration_s
    await asyncio.gather(
        *(
            _connection(target, random.Random(target.seed * 1000 + i), stop_at, latencies, errors)
            for i in range(connections)
        )
    )
    seconds = time.perf_counter() - start
    samples = latencies or [0.0]

    def pct(q: float) -> float:
        return percentile_ms(samples, q) or 0.0

    return LoadResult(
        generator="python-asyncio",
        connections=connections,
        threads=1,
        duration_s=round(seconds, 2),
        requests=len(latencies),
        rps=round(len(latencies) / seconds, 1),
        p50_ms=pct(0.50),
        p90_ms=pct(0.90),
        p99_ms=pct(0.99),
        max_ms=round(max(samples) * 1000, 3),
        mean_ms=round(sum(samples) / len(samples) * 1000, 3),
        errors=errors,
    )


def run_python(target: Target, connections: int, duration_s: float) -> LoadResult:
    return asyncio.run(python_load(target, connections, duration_s))


def run_load(
    target: Target, connections: int, duration_s: float, *, use_wrk: bool, wrk_threads: int
) -> LoadResult:
    if use_wrk:
        return run_wrk(target, connections, wrk_threads, duration_s)
    return run_python(target, connections, duration_s)
