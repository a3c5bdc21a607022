"""The one mapping from an exception to its HTTP response: the app's exception handlers, and
`error_response` for the recall fast path, which answers its errors itself with the same
handlers. Bodies are JSON `{"detail": ...}` as FastAPI's; never a traceback."""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from app.errors import AppError, input_error
from app.logs import current_request_id

log = logging.getLogger(__name__)

Handler = Callable[[Request, Exception], Awaitable[Response]]


# A 422 names at most MAX_ERRORS errors, each echoing its input at most ECHO_DEPTH levels
# deep and ECHO_ITEMS wide: a body of 130,000 wrong history items held the event loop for 6 s
# and answered 13.5 MB, and one nested ~500 deep overflowed the recursion (a 500).
MAX_ERRORS = 20
ECHO_DEPTH = 8
ECHO_ITEMS = 32


def _json_safe(value: Any, depth: int = 0) -> Any:
    """Echoed inputs may hold what Python's JSON parser accepts but UTF-8 JSON cannot carry:
    NaN/Infinity become null, lone surrogates (`"\\ud800"`) and undecodable bytes (a body that
    is not JSON) `?`/U+FFFD, instead of failing the error response itself; containers past
    ECHO_DEPTH become "…" and keep their first ECHO_ITEMS entries."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, dict | list | tuple) and depth >= ECHO_DEPTH:
        return "…"
    if isinstance(value, dict):
        entries = itertools.islice(value.items(), ECHO_ITEMS)
        return {_json_safe(k, depth + 1): _json_safe(v, depth + 1) for k, v in entries}
    if isinstance(value, list | tuple):
        return [_json_safe(v, depth + 1) for v in value[:ECHO_ITEMS]]
    return value


async def _app_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, AppError)
    body = {"detail": _json_safe(exc.detail)}
    return JSONResponse(body, exc.status_code, headers=exc.headers or None)


async def _invalid_request(request: Request, exc: Exception) -> JSONResponse:
    # FastAPI's own body for 422s, bounded and safe to serialise whatever the input was.
    assert isinstance(exc, RequestValidationError)
    detail = [
        {k: _json_safe(v) if k == "input" else jsonable_encoder(v) for k, v in error.items()}
        for error in itertools.islice(exc.errors(), MAX_ERRORS)
    ]
    return JSONResponse({"detail": detail}, 422)


async def _http_error(request: Request, exc: Exception) -> Response:
    # FastAPI answers 400 when the body cannot be decoded at all (not UTF-8, nested past the
    # parser's recursion limit): an invalid body, which the contract answers with 422 in the
    # shape of its other JSON errors. Every other HTTPException (404, 405...) is FastAPI's.
    assert isinstance(exc, HTTPException)
    cause = exc.__cause__
    if exc.status_code == 400 and isinstance(cause, Exception):
        reason = "not UTF-8" if isinstance(cause, UnicodeDecodeError) else type(cause).__name__
        error = input_error(("body",), "JSON decode error", {}, "json_invalid")
        return JSONResponse({"detail": [error | {"ctx": {"error": reason}}]}, 422)
    return await http_exception_handler(request, exc)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # A bug, never the client's input: log it with the traceback, answer without it. Starlette
    # answers it outside the middleware that adds X-Request-ID to the other responses.
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    request_id = current_request_id()
    headers = {"x-request-id": request_id} if request_id is not None else None
    return JSONResponse({"detail": "internal server error"}, 500, headers)


# The failures a request can meet, each with its handler. Anything else is a bug, answered by
# `_unexpected` from Starlette's outermost middleware.
HANDLERS: tuple[tuple[type[Exception], Handler], ...] = (
    (AppError, _app_error),
    (RequestValidationError, _invalid_request),
    (HTTPException, _http_error),
)
HANDLED = tuple(cls for cls, _ in HANDLERS)


def install_error_handlers(app: FastAPI) -> None:
    for cls, handler in HANDLERS:
        app.add_exception_handler(cls, handler)
    app.add_exception_handler(Exception, _unexpected)


async def error_response(request: Request, exc: Exception) -> Response:
    """The response the app's handlers give `exc`, one of HANDLED."""
    handler = next(h for cls, h in HANDLERS if isinstance(exc, cls))
    return await handler(request, exc)
