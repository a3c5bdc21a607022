"""How fast this machine is against the one issue 6's targets were set on.

The issue's figures come from a faster box: its bare FastAPI prototype (one `async def` route
returning a small dict, uvicorn, 16 connections) served 13.4k requests/s with one worker and
22.4k with two. The same prototype, measured here in the same run, gives `speed`: this
machine's share of that. Throughput targets times `speed` (and latency targets divided by
it) are what the same code would be expected to reach here; the report lists both.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import urllib.error
from pathlib import Path
from typing import Any

from harness import procs
from serving_kit import load

ISSUE_BARE_RPS = {1: 13_400, 2: 22_400}  # issue 6, "bare GET", quiet machine

PROTOTYPE = """from fastapi import FastAPI

app = FastAPI()


@app.get("/health/live")
async def live() -> dict[str, str]:
    return {"status": "ok"}
"""


def measure(
    workers: int, connections: int, seconds: float, *, use_wrk: bool, wrk_threads: int
) -> dict[str, Any]:
    """The prototype's bare GET with `workers` uvicorn workers (the faster of two runs):
    requests/s, latency, speed."""
    with tempfile.TemporaryDirectory(prefix="bench-reference-") as tmp:
        Path(tmp, "prototype.py").write_text(PROTOTYPE)
        port = procs.free_port()
        command = [sys.executable, "-m", "uvicorn", "prototype:app", "--port", str(port)]
        command += ["--workers", str(workers), "--no-access-log", "--log-level", "warning"]
        env = {**os.environ, "PYTHONPATH": tmp}
        proc = subprocess.Popen(command, cwd=tmp, env=env, start_new_session=True)
        try:
            url = f"http://127.0.0.1:{port}/health/live"
            _wait_up(url, proc)
            target = load.Target(url)
            load.run_load(target, connections, 2.0, use_wrk=use_wrk, wrk_threads=wrk_threads)
            # Other jobs only ever slow a run down: the faster of two is the machine's speed
            # (a slow reference would make the scaled targets too easy).
            runs = [
                load.run_load(
                    target, connections, seconds, use_wrk=use_wrk, wrk_threads=wrk_threads
                ).to_json()
                for _ in range(2)
            ]
            result = max(runs, key=lambda run: run["rps"])
        finally:
            procs.stop_group(proc)
    issue = ISSUE_BARE_RPS.get(workers)
    return {
        "workers": workers,
        "rps": result["rps"],
        "p50_ms": result["p50_ms"],
        "p99_ms": result["p99_ms"],
        "rps_of_each_run": [run["rps"] for run in runs],
        "issue_rps": issue,
        "speed": round(result["rps"] / issue, 3) if issue else None,
    }


def _wait_up(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"reference app exited ({proc.returncode})")
        try:
            procs.http_json(url, timeout=1.0)
            time.sleep(0.5)  # every worker up (uvicorn starts them together)
            return
        except (urllib.error.URLError, OSError, ValueError):
            time.sleep(0.1)
    raise RuntimeError("reference app did not start")
