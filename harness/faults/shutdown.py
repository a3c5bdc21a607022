"""Scenario: graceful shutdown. Under load, requests are put in flight for certain (the app
has asked for their body, half of it is sent) along with one client that never finishes its
request; then SIGTERM goes to the service's main process, as an orchestrator sends it. The
rest of each in-flight body is sent afterwards: every one must get its whole 200 answer. The
stalled client may hold a worker for SHUTDOWN_TIMEOUT_S at most: the process must then exit,
with status 0. New connections are refused once shutdown begins (the load balancer's cue to
go elsewhere)."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass

from harness.faults.report import Row
from harness.faults.traffic import Stats, Traffic
from harness.stack import Stack, Versions


@dataclass(frozen=True)
class ShutdownOptions:
    workers: int = 2
    inflight: int = 8
    shutdown_timeout_s: int = 3  # SHUTDOWN_TIMEOUT_S of the service (whole seconds)
    hold_s: float = 0.5  # in-flight requests finish their bodies this long after SIGTERM
    exit_slack_s: float = 15.0


CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def _open_request(port: int, body: bytes, sent: int) -> socket.socket:
    """A recall whose headers and first `sent` body bytes are sent. `Expect: 100-continue`
    makes uvicorn answer `100 Continue` once the app asks for the body: from then on the
    request is in the app for certain, not in a listen backlog or a parser buffer."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = (
        f"POST /v1/recall HTTP/1.1\r\nHost: fault-suite\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n"
    )
    sock.sendall(head.encode())
    got = b""
    while len(got) < len(CONTINUE):
        chunk = sock.recv(len(CONTINUE) - len(got))
        if not chunk:
            raise RuntimeError("the service closed a new connection before reading a request")
        got += chunk
    if got != CONTINUE:
        raise RuntimeError(f"expected 100 Continue, got {got!r}")
    sock.sendall(body[:sent])
    return sock


def _finish(sock: socket.socket, rest: bytes) -> tuple[int, int]:
    """Send the rest of the body, read the answer: (status, items), (0, 0) if none came."""
    try:
        sock.sendall(rest)
        response = http.client.HTTPResponse(sock)
        response.begin()
        data = response.read()
    except (OSError, http.client.HTTPException):
        return 0, 0
    items = len(json.loads(data)["items"]) if response.status == 200 else 0
    return response.status, items


def run(stack: Stack, versions: Versions, opts: ShutdownOptions) -> list[Row]:
    env = {"SHUTDOWN_TIMEOUT_S": opts.shutdown_timeout_s}
    (service,) = stack.services(versions.model_dir, "", [opts.workers], env=env)
    assert service.proc is not None
    body = json.dumps({"user_id": "u1", "k": 10}).encode()
    bodies = [{"user_id": f"u{n}", "k": 10} for n in range(32)]
    sockets: list[socket.socket] = []
    try:
        with Traffic([service.base_url + "/v1/recall"], bodies, connections=2) as traffic:
            time.sleep(0.5)
            half = len(body) // 2
            sockets = [_open_request(service.port, body, half) for _ in range(opts.inflight)]
            stalled = _open_request(service.port, body, 1)  # never finishes
            sockets.append(stalled)
            signalled = time.perf_counter()
            os.kill(service.proc.pid, signal.SIGTERM)
            time.sleep(opts.hold_s)
            answers = [_finish(s, body[len(body) // 2 :]) for s in sockets[:-1]]
            finished = time.perf_counter()
            try:
                code: int | None = service.proc.wait(opts.shutdown_timeout_s + opts.exit_slack_s)
            except subprocess.TimeoutExpired:
                code = None
            exited = time.perf_counter() - signalled
        after = traffic.between(signalled, time.perf_counter())
        before = traffic.between(0, signalled - 0.05)
    finally:
        for sock in sockets:
            sock.close()

    completed = sum(1 for status, items in answers if status == 200 and items == 10)
    refused = sum(1 for a in after if a.status == 0 and "Refused" in (a.error or ""))
    http_errors = [a.status for a in after if a.status not in (0, 200)]
    stats = Stats.of_latencies([finished - signalled] * len(answers), len(answers) - completed)
    row = Row("graceful shutdown: SIGTERM under load", stats, recovery_s=round(exited, 2))
    row.expect(
        completed == opts.inflight,
        f"{opts.inflight - completed} of {opts.inflight} in-flight requests lost: {answers}",
    )
    row.expect(code is not None, f"still running {exited:.0f} s after SIGTERM")
    row.expect(code in (0, None), f"exit status {code}")
    row.expect(not http_errors, f"answers with errors during shutdown: {http_errors[:5]}")
    row.expect(Stats.of(before).failures == 0, "recalls failed before SIGTERM")
    row.detail = (
        f"{completed}/{opts.inflight} in-flight requests answered in full after SIGTERM; the "
        f"stalled client was cut after SHUTDOWN_TIMEOUT_S={opts.shutdown_timeout_s:g} s; exit "
        f"{code} after {exited:.1f} s ({opts.workers} workers); {refused} new connections refused"
    )
    row.data = {
        "inflight": answers,
        "exit_code": code,
        "exit_s": round(exited, 2),
        "refused_after": refused,
        "answered_after": sum(a.status == 200 for a in after),
    }
    return [row]
