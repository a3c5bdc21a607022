"""Several uvicorn workers, each listening on its own `SO_REUSEPORT` socket (Linux).

uvicorn's own supervisor hands one listening socket to all its workers. Whichever worker
wakes first accepts every connection waiting, and a keep-alive connection stays with the
worker that accepted it: a burst of connections (a proxy's pool, a load generator's 16) can
all land on one worker while the other idles. It happened in 2 of ~9 two-worker benchmark
runs (671 requests/s against 931-1103). With a socket per worker the kernel spreads new
connections over the workers by a hash of each connection's addresses.

The supervisor is deliberately small: start the workers, replace one that dies (stop if one
fails during start-up: it would fail again), and on SIGINT, SIGTERM, SIGHUP or SIGQUIT pass
SIGTERM on, so each worker drains its requests (uvicorn's graceful shutdown) before the parent
exits. (uvicorn's supervisor restarts its workers on SIGHUP; a new bundle needs no restart
here: the workers load it themselves.) Each worker asks the kernel for SIGTERM when the
supervisor dies, so killing the supervisor outright (SIGKILL, the OOM killer) leaves no worker
serving as an orphan (uvicorn's supervisor leaves them). Unlike uvicorn's, it does not ping
its workers: a worker that hangs without dying keeps its share of new connections until it is
killed, and one killed with connections still queued on its socket resets them.

The workers count their metrics into one directory (`shared_metrics`, prometheus_client's
multiprocess mode), so a scrape of `/metrics`, which any one worker answers, covers them all.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from multiprocessing.process import BaseProcess
from pathlib import Path

import uvicorn
from prometheus_client import multiprocess
from uvicorn.config import STARTUP_FAILURE

from app.metrics import MULTIPROCESS_DIR

log = logging.getLogger("uvicorn.error")

# The kernel balances SO_REUSEPORT listeners only on Linux (elsewhere the option exists with
# other meanings), so other systems keep uvicorn's shared socket.
SUPPORTED = sys.platform == "linux" and hasattr(socket, "SO_REUSEPORT")
POLL_S = 0.5
KILL_GRACE_S = 5.0  # beyond the graceful shutdown timeout, before a worker is killed
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _tcp_socket(host: str, *, reuse_addr: bool, reuse_port: bool) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    if reuse_addr:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    return sock


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A worker's TCP socket bound to `host:port` with `SO_REUSEPORT`, not yet listening."""
    sock = _tcp_socket(host, reuse_addr=True, reuse_port=True)
    sock.bind((host, port))
    return sock


def claim_port(host: str, port: int) -> socket.socket:
    """Refuse a port in use, then hold it for this service's workers alone.

    Sockets that all set `SO_REUSEPORT` share a port silently, so a second copy of the service
    would take half the first one's connections. A plain bind first refuses a port something
    listens on. The claim sets `SO_REUSEPORT` but not `SO_REUSEADDR`, so while it is held no
    other socket can bind the port except through `SO_REUSEPORT` (our workers), and a second
    copy's plain bind fails even before our workers listen. Bound but never listening, the
    claim takes no connections itself.
    """
    with _tcp_socket(host, reuse_addr=True, reuse_port=False) as probe:  # TIME_WAIT: no conflict
        probe.bind((host, port))
    claim = _tcp_socket(host, reuse_addr=False, reuse_port=True)
    try:
        claim.bind((host, port))
    except OSError:
        claim.close()
        raise
    return claim


def stop_with_parent(parent_pid: int) -> None:
    """Have the kernel send this process SIGTERM (a graceful stop) when its parent dies, however
    it dies; exit now if the parent is already gone."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        log.warning(
            "Worker cannot follow its supervisor: prctl: %s", os.strerror(ctypes.get_errno())
        )
    if os.getppid() != parent_pid:  # died before the request took effect
        sys.exit(0)


def serve_worker(config: uvicorn.Config, parent_pid: int) -> None:
    """One worker process: its own socket (uvicorn listens on it), then uvicorn's server."""
    config.configure_logging()  # a spawned process starts with Python's defaults
    stop_with_parent(parent_pid)
    try:
        sock = reuse_port_socket(config.host, config.port)
    except OSError as exc:  # would fail the same way on every restart
        log.error("Worker cannot bind %s:%s: %s", config.host, config.port, exc)
        sys.exit(STARTUP_FAILURE)
    server = uvicorn.Server(config)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C reaches the workers too
        server.run(sockets=[sock])
    if not server.started:
        sys.exit(STARTUP_FAILURE)


class Supervisor:
    """Runs `workers` processes of `serve_worker(config)` until a stop signal."""

    def __init__(self, config: uvicorn.Config, workers: int) -> None:
        self.config = config
        self.workers = workers
        self.context = multiprocessing.get_context("spawn")  # as uvicorn: no forked state
        # Set by the signal handler: a plain attribute, since a handler that takes a lock
        # (threading.Event.set) can deadlock against the same lock held by the code it
        # interrupted.
        self.stop_reason: str | None = None
        self.exit_code = 0

    def run(self) -> int:
        try:
            claim = claim_port(self.config.host, self.config.port)
        except OSError as exc:
            log.error("Cannot listen on %s:%s: %s", self.config.host, self.config.port, exc)
            return STARTUP_FAILURE
        # SIGHUP and SIGQUIT too: their default would end the parent alone, leaving the
        # workers serving as orphans.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
            signal.signal(sig, self._on_signal)
        log.info("Started parent process; %d workers, one SO_REUSEPORT socket each", self.workers)
        with shared_metrics():
            processes = [self._start() for _ in range(self.workers)]
            try:
                while self.stop_reason is None:
                    time.sleep(POLL_S)
                    for i, process in enumerate(processes):
                        if self.stop_reason is None and not process.is_alive():
                            processes[i] = self._replace(process)
            finally:
                log.info("Stopping the workers (%s)", self.stop_reason)
                self._stop(processes)
                claim.close()
        return self.exit_code

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.stop_reason = signal.Signals(signum).name

    def _start(self) -> BaseProcess:
        process = self.context.Process(target=serve_worker, args=(self.config, os.getpid()))
        process.start()
        return process

    def _replace(self, process: BaseProcess) -> BaseProcess:
        if process.pid is not None:  # its gauges go; its counts stay in the sums
            multiprocess.mark_process_dead(process.pid)
        if process.exitcode == STARTUP_FAILURE:
            log.error("Worker [%s] failed to start; stopping", process.pid)
            self.exit_code = STARTUP_FAILURE
            self.stop_reason = "a worker failed to start"
            return process
        log.warning(
            "Worker [%s] died (exit code %s); starting another", process.pid, process.exitcode
        )
        return self._start()

    def _stop(self, processes: list[BaseProcess]) -> None:
        for process in processes:
            if process.is_alive():
                process.terminate()  # SIGTERM: uvicorn drains in-flight requests
        grace = (self.config.timeout_graceful_shutdown or 0) + KILL_GRACE_S
        deadline = time.monotonic() + grace
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                log.error("Worker [%s] still running after %.0f s; killing it", process.pid, grace)
                process.kill()
                process.join()
        log.info("Stopped parent process")


@contextlib.contextmanager
def shared_metrics() -> Iterator[Path]:
    """The directory the workers count their metrics into (`app.metrics`), set in the
    environment they inherit: PROMETHEUS_MULTIPROC_DIR when given (its old counts wiped:
    a restart starts from zero, as a single process does), else a new temporary one, removed
    at exit."""
    given = os.environ.get(MULTIPROCESS_DIR)
    path = Path(given) if given else Path(tempfile.mkdtemp(prefix="tower-recall-metrics-"))
    path.mkdir(parents=True, exist_ok=True)
    for old in path.glob("*.db"):
        old.unlink()
    os.environ[MULTIPROCESS_DIR] = str(path)
    try:
        yield path
    finally:
        if given is None:
            del os.environ[MULTIPROCESS_DIR]
            shutil.rmtree(path, ignore_errors=True)
