"""Pure ASGI middleware: the body's limits (size and time, before any parsing), and each
request's id, metrics and access line."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Coroutine, Sequence

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.http.access_log import AccessLog
from app.http.deps import services_of
from app.logs import bind_request, valid_request_id
from app.metrics import Metrics

CLIENT_CLOSED = 499
REQUEST_ID = b"x-request-id"
# A refused body is still read (and dropped) up to this much and this long: a server that
# answers and closes with unread data makes the kernel reset the connection, and a client
# still sending sees "Connection reset by peer" instead of the 413.
DRAIN_MIN_BYTES = 64 << 20
DRAIN_TIMEOUT_S = 10.0


class BodyLimitMiddleware:
    """Refuses bodies over `max_bytes` with 413, by Content-Length when declared, else by
    counting the streamed chunks; the accepted body is then replayed to the app. A refused
    body is drained (at most max(4 x max_bytes, DRAIN_MIN_BYTES), DRAIN_TIMEOUT_S) before the
    413, so that an ordinary client reads it; past either bound, or when the client waits for
    `100 Continue`, the 413 closes the connection. A body that has not all arrived within
    `timeout_s` of the request's start is refused with 408 and the connection closed: a client
    that trickles its body (or stalls) cannot hold a connection and a request slot for ever."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.drain_bytes = max(4 * max_bytes, DRAIN_MIN_BYTES)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            # A client waiting for `100 Continue` has sent nothing: nothing to drain.
            waits = headers.get("expect", "").lower() == "100-continue"
            await self._refuse(scope, receive, send, drain=not waits)
            return
        try:
            async with asyncio.timeout(self.timeout_s):
                body = await read_body(receive, self.max_bytes)
        except TimeoutError:
            detail = {"detail": f"request body not received within {self.timeout_s:g} s"}
            await JSONResponse(detail, 408, {"connection": "close"})(scope, receive, send)
            return
        except BodyTooLarge as refused:
            # A body that crossed the limit in its last chunk has all arrived: nothing to
            # drain (waiting for more would wait out DRAIN_TIMEOUT_S), and the connection lives.
            await self._refuse(scope, receive, send, drain=not refused.ended, ended=refused.ended)
            return
        if body is not None:
            await self.app(scope, replay(body, receive), send)

    async def _refuse(
        self, scope: Scope, receive: Receive, send: Send, drain: bool, ended: bool = False
    ) -> None:
        """The 413, after draining the rest of the body when `drain`; `ended`: the body has
        already all arrived. A body that did not end closes the connection."""
        if drain:
            try:
                async with asyncio.timeout(DRAIN_TIMEOUT_S):
                    ended = await drain_body(receive, self.drain_bytes)
            except TimeoutError:
                pass
            except ClientGone:
                return
        detail = f"request body exceeds {self.max_bytes} bytes"
        headers = None if ended else {"connection": "close"}
        await JSONResponse({"detail": detail}, 413, headers)(scope, receive, send)


class BodyTooLarge(Exception):
    """The body exceeded the limit; `ended`: in its last chunk (the client sent it all)."""

    def __init__(self, ended: bool) -> None:
        super().__init__("request body too large")
        self.ended = ended


class ClientGone(Exception):
    pass


async def read_body(receive: Receive, max_bytes: int | None = None) -> bytes | None:
    """The whole request body, or None when the client went away first. Raises BodyTooLarge
    (reading no further) once it exceeds `max_bytes`."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # client went away
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if max_bytes is not None and size > max_bytes:
            raise BodyTooLarge(ended=not message.get("more_body", False))
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def drain_body(receive: Receive, max_bytes: int) -> bool:
    """Reads and drops the rest of the body: True once it ended, False past `max_bytes`;
    raises ClientGone if the client went away."""
    size = 0
    while size <= max_bytes:
        message = await receive()
        if message["type"] != "http.request":
            raise ClientGone
        size += len(message.get("body", b""))
        if not message.get("more_body", False):
            return True
    return False


def replay(body: bytes, receive: Receive) -> Receive:
    """`receive` that hands the app the already-read `body` first."""
    replayed = False

    async def receive_replayed() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return receive_replayed


def route_template(scope: Scope, routes: Sequence[BaseRoute]) -> str:
    """The matched route's path template (a bounded label, without its convertors), or
    `unmatched`."""
    route = scope.get("route")
    if route is None:  # refused before routing (413): the route it was meant for
        route = next((r for r in routes if r.matches(scope)[0] is Match.FULL), None)
    return getattr(route, "path_format", "unmatched")


def request_id(scope: Scope) -> str:
    """The request's id: the client's `X-Request-ID` when it is a valid one, else a new one
    (128 random bits in hex, as a uuid4's `.hex` but without building the UUID: 0.5 against
    2.5 µs). The one decision for every route, the fast path's included."""
    for name, value in scope["headers"]:
        if name == REQUEST_ID:
            given = value.decode("latin-1")
            if valid_request_id(given):
                return given
            break
    return os.urandom(16).hex()


def client_left(receive: Receive) -> bool:
    """Whether the server already knows that the client of a request whose body has all
    arrived went away, asked without waiting. Such a `receive()` answers `http.disconnect` at
    once when the connection has closed (uvicorn's does) and waits otherwise: it is stepped
    once by hand and closed unfinished if it would wait (~4 µs, where Starlette's
    `Request.is_disconnected`, a cancelled anyio scope, costs ~100 µs a request)."""
    probe = receive()
    if not isinstance(probe, Coroutine):
        return False  # a server's awaitable of another kind: not asked (200 as before)
    try:
        probe.send(None)
    except StopIteration as done:
        return bool(done.value.get("type") == "http.disconnect")
    probe.close()
    return False


def _serving_version(scope: Scope) -> str | None:
    services = services_of(scope["app"])
    model = services.repository.current if services is not None else None
    return model.version if model is not None else None


class RequestObserver:
    """Gives every HTTP request its id (`X-Request-ID` on every response, and on every log
    line written while it runs), counts and times it by method, route template and status,
    and writes its line to `access_log` (None: no access lines)."""

    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        routes: Sequence[BaseRoute],
        access_log: AccessLog | None,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        context = bind_request(request_id(scope))
        header = (REQUEST_ID, context.request_id.encode("latin-1"))
        status: int | None = None
        body_read = False

        async def receive_watched() -> Message:
            nonlocal body_read
            message = await receive()
            body_read = body_read or not message.get("more_body", False)
            return message

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                # A client that left while its request was served gets no answer (the server
                # drops it): counted as nginx's 499, not as the status nobody received.
                left = body_read and client_left(receive)
                status = CLIENT_CLOSED if left else message["status"]
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        try:
            await self.app(scope, receive_watched, send_with_id)
        except asyncio.CancelledError:
            if status is not None:
                raise
            # The server ended it at shutdown (SHUTDOWN_TIMEOUT_S run out, a client stalled):
            # a 503 to retry elsewhere, with its id, where the server would answer a bare 500
            # and log the cancellation as a crash.
            detail = {"detail": "the server is shutting down: retry"}
            await JSONResponse(detail, 503)(scope, receive, send_with_id)
        except BaseException:
            status = status or 500
            raise
        finally:
            # Returned without a response: the client went away before its body arrived
            # (499 too), not a server error.
            status = status or CLIENT_CLOSED
            elapsed = time.perf_counter() - start
            route = route_template(scope, self.routes)
            self.metrics.observe_request(scope["method"], route, status, elapsed)
            if self.access_log is not None:
                self.access_log.write(
                    context.request_id,
                    {
                        "method": scope["method"],
                        "route": route,
                        "status": status,
                        "latency_ms": round(elapsed * 1000, 3),
                        # The bundle that answered (recalls note it), else the one serving now.
                        "model_version": context.model_version or _serving_version(scope),
                    },
                )
