"""A throw-away Redis Cluster on loopback: `masters` redis-server processes with `replicas`
replicas each (nothing persisted), created with `redis-cli --cluster create`, for the fault
suite and the tests. Nodes can be killed (SIGKILL, as in a crash) and started again on their
port, where they rejoin with the cluster state of their `nodes.conf` (empty of data).

    python -m harness.cluster      # from the repository root: start one, print its URL
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import redis

from harness.redis_proc import START_ATTEMPTS, ServerExited, await_ready, spawn


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (each port + 10000, the cluster bus, is checked too)."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port + 10000 > 65535 or port in ports:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        ports.append(port)
    return ports


def _state_ok(client: redis.Redis) -> bool:
    if client.execute_command("CLUSTER INFO").get("cluster_state") != "ok":
        return False
    replication = client.info("replication")
    return replication["role"] == "master" or replication.get("master_link_status") == "up"


class LocalCluster:
    """Args:
    masters: primaries; the slots are spread evenly over them.
    replicas: replicas of each primary.
    node_timeout_ms: `cluster-node-timeout`: how long a silent node takes to be failed
        over (Redis's default of 15 s would make every failover test wait that long).
    """

    def __init__(self, masters: int = 3, replicas: int = 1, node_timeout_ms: int = 1000) -> None:
        self.ports = free_ports(masters * (1 + replicas))
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.workdir = tempfile.TemporaryDirectory(prefix="redis-cluster-")
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        """Any node names the cluster; the client discovers the others."""
        return f"redis://127.0.0.1:{self.ports[0]}"

    def start(self, timeout_s: float = 30.0) -> LocalCluster:
        try:
            self._start_nodes_on_free_ports()
            nodes = [f"127.0.0.1:{port}" for port in self.ports]
            subprocess.run(
                ["redis-cli", "--cluster", "create", *nodes, "--cluster-replicas",
                 str(self.replicas), "--cluster-yes"],
                check=True, capture_output=True, timeout=timeout_s,
            )  # fmt: skip
            self.wait_ok(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_nodes_on_free_ports(self) -> None:
        for attempt in range(START_ATTEMPTS):
            try:
                self.start_nodes(self.ports)
                return
            except ServerExited:
                if attempt == START_ATTEMPTS - 1:
                    raise
                self._stop_nodes()
                self.ports = free_ports(len(self.ports))

    def start_nodes(self, ports: Iterable[int]) -> None:
        """Start (or restart, after `kill`) the nodes on `ports`, each answering PING.

        Raises:
            ServerExited: a node's process exited (its port taken, say) instead.
        """
        for port in ports:
            args = [
                "--port", str(port), "--bind", "127.0.0.1",
                "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf",
                "--cluster-node-timeout", str(self.node_timeout_ms),
                "--save", "", "--appendonly", "no", "--dir", self.workdir.name,
                # A replica that never finished its first sync cannot be failed over to: no
                # 5 s wait for more replicas before the (diskless) transfer starts.
                "--repl-diskless-sync-delay", "0",
            ]  # fmt: skip
            self.procs[port] = spawn(args, self._log(port))
        for port in ports:
            self._wait(lambda c: c.ping(), port, 10.0, "did not start")

    def wait_ok(self, timeout_s: float = 30.0, ports: Iterable[int] | None = None) -> float:
        """Wait until every node (of `ports`) says `cluster_state:ok`, each replica in sync with
        its primary; returns the seconds."""
        start = time.perf_counter()
        for port in self.ports if ports is None else ports:
            left = max(0.1, timeout_s - (time.perf_counter() - start))
            self._wait(_state_ok, port, left, "not ok")
        return time.perf_counter() - start

    def _wait(
        self, ready: Callable[[redis.Redis], object], port: int, timeout_s: float, what: str
    ) -> None:
        await_ready(port, self.procs.get(port), self._log(port), ready, timeout_s, what)

    def _log(self, port: int) -> Path:
        return Path(self.workdir.name) / f"node-{port}.log"

    def master_of(self, key: str) -> int:
        """The port of the primary that serves `key`'s slot now, as a live node sees it."""
        port = next(p for p, proc in self.procs.items() if proc.poll() is None)
        client = redis.Redis(port=port, socket_timeout=1, decode_responses=True)
        try:
            slot = int(client.execute_command("CLUSTER KEYSLOT", key))
            for start, end, primary, *_ in client.execute_command("CLUSTER SLOTS"):
                if int(start) <= slot <= int(end):
                    return int(primary[1])
        finally:
            client.close()
        raise LookupError(f"no node serves slot {slot}")

    def kill(self, port: int) -> None:
        proc = self.procs.pop(port)
        proc.kill()
        proc.wait(10)

    def stop(self) -> None:
        self._stop_nodes()
        self.workdir.cleanup()

    def _stop_nodes(self) -> None:
        for port in list(self.procs):
            proc = self.procs.pop(port)
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


class ClusterRedis:
    """A throw-away Redis Cluster on loopback (3 primaries + 3 replicas, `LocalCluster`) with
    `harness.procs.RedisServer`'s face, for `serving.py --redis-cluster`. `pid` is the first
    primary's: the CPU the report counts as Redis is one primary's of three."""

    cluster = True

    def __init__(self) -> None:
        self.nodes = LocalCluster()

    @property
    def url(self) -> str:
        return self.nodes.url

    @property
    def pid(self) -> int:
        return self.nodes.procs[self.nodes.ports[0]].pid

    def start(self) -> ClusterRedis:
        self.nodes.start()
        return self

    def flush(self) -> None:
        client = redis.RedisCluster.from_url(self.url)
        try:
            client.flushall(target_nodes=redis.RedisCluster.PRIMARIES)
        finally:
            client.close()

    def stop(self) -> None:
        self.nodes.stop()


if __name__ == "__main__":
    argparse.ArgumentParser(
        prog="python -m harness.cluster",
        description="A throw-away Redis Cluster on loopback: prints its URL, stops on Ctrl-C.",
    ).parse_args()
    cluster = LocalCluster().start()
    print(cluster.url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
