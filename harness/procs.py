"""Processes the tests and benchmarks own: a redis-server, the real service (`python -m app`),
`publish-features`; plus readiness, worker discovery and resident memory from /proc."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from harness.redis_proc import START_ATTEMPTS, ServerExited, await_ready, spawn

# app.model.repository logs this once per worker when its first bundle serves (uvicorn's "startup
# complete" comes before: a worker listens while its first bundle loads).
STARTUP_LINE = "serving bundle "
LOAD_FAILED_LINE = "start-up model load failed"  # app.model.sync: up, but never ready
INDEX_CACHED_LINE = "index read from the cache"  # app.search.build, per worker
INDEX_BUILT_LINE = "index built in"
# Ready answers in a row (each on a fresh connection, so any worker may answer) once every
# worker has started: with several workers one 200 proves only one of them.
READY_STREAK = 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_json(url: str, body: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
    """GET (or POST `body`) and parse the JSON answer; raises urllib.error.HTTPError on 4xx/5xx."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


class RedisServer:
    """A throw-away redis-server on a loopback port (nothing persisted), for the benchmarks
    and the tests; it can be frozen (SIGSTOP: connections open, nothing answers), killed
    (SIGKILL, as in a crash) and started again on the same port, empty."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        # A port chosen here may move to a fresh one at the first start: free when chosen,
        # it can be taken before redis-server binds it (an outgoing connection, on a busy host).
        self._may_move = port is None
        self.workdir = tempfile.TemporaryDirectory(prefix="bench-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> RedisServer:
        """Start (or start again, after `kill`, on the same port) and wait for PING."""
        try:
            self._start_on_a_free_port()
        except BaseException:
            self.stop()
            raise
        self._may_move = False
        return self

    def _start_on_a_free_port(self) -> None:
        log = Path(self.workdir.name) / "redis.log"
        for attempt in range(START_ATTEMPTS):
            args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
            self.proc = spawn([*args, "--appendonly", "no", "--dir", self.workdir.name], log)
            try:
                await_ready(self.port, self.proc, log)
                return
            except ServerExited:
                self.proc = None
                if not self._may_move or attempt == START_ATTEMPTS - 1:
                    raise
                self.port = free_port()

    def flush(self) -> None:
        client = redis.Redis.from_url(self.url)
        try:
            client.flushall()
        finally:
            client.close()

    def pause(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.resume()  # a stopped process would not act on SIGTERM
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        self.workdir.cleanup()


def publish_features(
    source: str, redis_url: str, history_length: int, cluster: bool = False
) -> float:
    """`python -m models publish-features`; returns its wall time in seconds."""
    start = time.perf_counter()
    command = [sys.executable, "-m", "models", "publish-features", "--data", source]
    command += ["--redis-url", redis_url, "--history-length", str(history_length)]
    command += ["--redis-cluster"] if cluster else []
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"publish-features failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return time.perf_counter() - start


MEMORY_FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile")


def read_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (peak), RssAnon and RssFile (file-backed pages, shareable between
    workers) of a process, in kB, from /proc/PID/status."""
    out: dict[str, int] = {}
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except FileNotFoundError:
        return out
    for line in lines:
        name, _, value = line.partition(":")
        if name in MEMORY_FIELDS:
            out[name] = int(value.split()[0])
    return out


def proportional_set_kb(pid: int) -> int | None:
    """PSS of a process in kB (/proc/PID/smaps_rollup): its private pages plus each shared
    page divided by the processes mapping it, so the workers' PSS add up to what they hold
    together (the bundle's memory-mapped id table is counted once, not once per worker as in
    VmRSS). None where the kernel does not have the file."""
    try:
        lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    except (FileNotFoundError, PermissionError):
        return None
    for line in lines:
        name, _, value = line.partition(":")
        if name == "Pss":
            return int(value.split()[0])
    return None


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (0 when it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        # The command name may hold spaces and parentheses: the ppid follows the last ')'.
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return sorted(found)


@dataclass
class Service:
    """`python -m app` in its own process group, configured by environment variables."""

    model_dir: Path
    redis_url: str
    index_type: str
    workers: int
    log_path: Path
    port: int = field(default_factory=free_port)
    extra_env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Service:
        env = dict(os.environ)
        env.update(
            MODEL_DIR=str(self.model_dir),
            REDIS_URL=self.redis_url,
            INDEX_TYPE=self.index_type,
            WORKERS=str(self.workers),
            PORT=str(self.port),
            HOST="127.0.0.1",
            OMP_NUM_THREADS="1",
            LOG_LEVEL="info",
        )
        env.update(self.extra_env)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.started_at = time.perf_counter()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "app"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # its own process group: stop() reaches the workers
            )
        return self

    def _log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout_s: float) -> dict[str, float]:
        """Block until every worker serves; returns start-up timings in seconds from process
        start (`first_ready_s`: the first 200 from /health/ready; `ready_s`: every worker
        started and READY_STREAK answers in a row were 200)."""
        assert self.proc is not None
        deadline = self.started_at + timeout_s
        first_ready: float | None = None
        streak = 0
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                tail = self._log()[-3000:]
                raise RuntimeError(f"service exited ({self.proc.returncode}):\n{tail}")
            text = self._log()
            if LOAD_FAILED_LINE in text:
                raise RuntimeError(f"service could not load the bundle:\n{text[-3000:]}")
            try:
                http_json(self.base_url + "/health/ready", timeout=2.0)
                streak += 1
                if first_ready is None:
                    first_ready = time.perf_counter() - self.started_at
            except (urllib.error.URLError, OSError, ValueError):
                streak = 0
            if streak >= READY_STREAK and text.count(STARTUP_LINE) >= self.workers:
                assert first_ready is not None
                ready = time.perf_counter() - self.started_at
                return {"first_ready_s": round(first_ready, 2), "ready_s": round(ready, 2)}
            time.sleep(0.01 if streak else 0.1)
        raise RuntimeError(f"service not ready after {timeout_s:.0f} s:\n{self._log()[-3000:]}")

    def index_from_cache(self) -> bool | None:
        """Whether every worker read its ANN index from the bundle's index cache (None: the
        service logged nothing about it: a flat index, or a service without that cache)."""
        text = self._log()
        if INDEX_CACHED_LINE not in text and INDEX_BUILT_LINE not in text:
            return None
        return INDEX_BUILT_LINE not in text

    def worker_pids(self) -> list[int]:
        """The processes that serve requests: the main process with one worker, else the
        spawned children (not the supervisor, not multiprocessing's resource tracker)."""
        assert self.proc is not None
        if self.workers == 1:
            return [self.proc.pid]
        pids = []
        for pid in children(self.proc.pid):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except FileNotFoundError:
                continue
            if b"spawn_main" in cmdline:
                pids.append(pid)
        return pids

    def memory(self) -> list[dict[str, float | None]]:
        """Resident memory (MB) of each worker: total, peak, anonymous, file-backed, and its
        proportional share (PSS; None where unknown)."""
        out = []
        for pid in self.worker_pids():
            status = read_status(pid)
            pss = proportional_set_kb(pid)
            out.append(
                {
                    "pid": pid,
                    "rss_mb": round(status.get("VmRSS", 0) / 1024, 1),
                    "peak_rss_mb": round(status.get("VmHWM", 0) / 1024, 1),
                    "anon_mb": round(status.get("RssAnon", 0) / 1024, 1),
                    "file_mb": round(status.get("RssFile", 0) / 1024, 1),
                    "pss_mb": None if pss is None else round(pss / 1024, 1),
                }
            )
        return out

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc)
        self.proc = None


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM a process started with `start_new_session=True` and its children (uvicorn's
    workers); SIGKILL them if they are not gone within 20 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
