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
here: the workers load it themselves.)
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import socket
import sys
import threading
import time
from multiprocessing.process import BaseProcess

import uvicorn
from uvicorn.config import STARTUP_FAILURE

log = logging.getLogger("uvicorn.error")

# The kernel balances SO_REUSEPORT listeners only on Linux (elsewhere the option exists with
# other meanings), so other systems keep uvicorn's shared socket.
SUPPORTED = sys.platform == "linux" and hasattr(socket, "SO_REUSEPORT")
POLL_S = 0.5
KILL_GRACE_S = 5.0  # beyond the graceful shutdown timeout, before a worker is killed


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to `host:port` with `SO_REUSEPORT`, not yet listening."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def claim_port(host: str, port: int) -> socket.socket:
    """Fail if anything listens on `host:port`, then hold it with a bound `SO_REUSEPORT` socket.

    Sockets that all set `SO_REUSEPORT` share a port silently, so a second copy of the service
    would take half of the first one's connections: a plain bind first refuses a port in use.
    The claim is bound but never listens, so it takes no connections itself.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no conflict
        probe.bind((host, port))
    return reuse_port_socket(host, port)


def serve_worker(config: uvicorn.Config) -> None:
    """One worker process: its own socket (uvicorn listens on it), then uvicorn's server."""
    config.configure_logging()  # a spawned process starts with Python's defaults
    server = uvicorn.Server(config)
    server.run(sockets=[reuse_port_socket(config.host, config.port)])
    if not server.started:
        sys.exit(STARTUP_FAILURE)


class Supervisor:
    """Runs `workers` processes of `serve_worker(config)` until SIGINT or SIGTERM."""

    def __init__(self, config: uvicorn.Config, workers: int) -> None:
        self.config = config
        self.workers = workers
        self.context = multiprocessing.get_context("spawn")  # as uvicorn: no forked state
        self.stopping = threading.Event()
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
            signal.signal(sig, lambda *_: self.stopping.set())
        log.info("Started parent process; %d workers, one SO_REUSEPORT socket each", self.workers)
        processes = [self._start() for _ in range(self.workers)]
        try:
            while not self.stopping.wait(POLL_S):
                for i, process in enumerate(processes):
                    if not process.is_alive():
                        processes[i] = self._replace(process)
        finally:
            self._stop(processes)
            claim.close()
        return self.exit_code

    def _start(self) -> BaseProcess:
        process = self.context.Process(target=serve_worker, args=(self.config,))
        process.start()
        return process

    def _replace(self, process: BaseProcess) -> BaseProcess:
        if process.exitcode == STARTUP_FAILURE:
            log.error("Worker [%s] failed to start; stopping", process.pid)
            self.exit_code = STARTUP_FAILURE
            self.stopping.set()
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
