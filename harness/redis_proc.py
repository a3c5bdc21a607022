"""Starting a throw-away redis-server and waiting for it: what `harness.procs.RedisServer`
and `harness.cluster.LocalCluster` share. Each server's output goes to a log file, whose
tail a failure quotes."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

# Starts on fresh ports when a server exits at once: a port free when chosen can be taken
# before the server binds it (by an outgoing connection's ephemeral port, on a busy host).
START_ATTEMPTS = 3


class ServerExited(RuntimeError):
    """A redis-server exited while it was awaited (its log's tail in the message)."""


def spawn(args: Sequence[str], log: Path) -> subprocess.Popen[bytes]:
    """`redis-server args`, its output appended to `log`."""
    with log.open("ab") as out:
        return subprocess.Popen(["redis-server", *args], stdout=out, stderr=subprocess.STDOUT)


def await_ready(
    port: int,
    proc: subprocess.Popen[bytes] | None,
    log: Path,
    ready: Callable[[redis.Redis], object] = lambda client: client.ping(),
    timeout_s: float = 10.0,
    what: str = "did not start",
) -> None:
    """Wait until `ready` holds for the server on `port`.

    Raises:
        ServerExited: `proc` (when given) exited first.
        RuntimeError: neither within `timeout_s`.
    """
    # One try a turn (redis-py retries thrice by default): a server that exited is noticed
    # within a second even when something else answers on its port.
    client = redis.Redis(
        port=port, socket_timeout=1, retry=Retry(NoBackoff(), 0), decode_responses=True
    )
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError):
                if ready(client):
                    return
            if proc is not None and proc.poll() is not None:
                raise ServerExited(
                    f"redis-server on 127.0.0.1:{port} exited ({proc.returncode}): {tail(log)}"
                )
            time.sleep(0.05)
    finally:
        client.close()
    raise RuntimeError(f"redis-server on 127.0.0.1:{port} {what} in {timeout_s:g} s: {tail(log)}")


def tail(log: Path, lines: int = 3) -> str:
    """The last `lines` of a server's log, on one line."""
    try:
        text = log.read_text(errors="replace").splitlines()
    except OSError:
        return "no log"
    return " | ".join(text[-lines:]) or "empty log"
