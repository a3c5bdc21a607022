"""The service's exceptions: one class per failure, each carrying its HTTP status, all mapped
to a JSON `{"detail": ...}` body by one handler (kserve style)."""

from __future__ import annotations

import logging
import math
from typing import Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from app.logs import current_request_id

log = logging.getLogger(__name__)

# A detail is a message, or FastAPI's validation-error list for input errors.
Detail = str | list[dict[str, Any]]


class AppError(Exception):
    """Base class: `status_code` and optional response `headers` are fixed per subclass."""

    status_code: ClassVar[int] = 500
    headers: ClassVar[dict[str, str]] = {}

    def __init__(self, detail: Detail) -> None:
        super().__init__(detail)
        self.detail = detail


class InvalidInput(AppError):
    """A request that passed schema validation breaks a limit only known at run time (MAX_K,
    MAX_HISTORY, MAX_BATCH), names an unknown feature or gives one a value of the wrong type;
    same body shape as FastAPI's 422."""

    status_code = 422


class VersionNotFound(AppError):
    status_code = 404


class BundleRejected(AppError):
    """The bundle failed verification, loading or warm-up; nothing was swapped."""

    status_code = 409


class ModelNotReady(AppError):
    """No bundle is serving (none yet, or the start-up load failed)."""

    status_code = 503


class FeatureStoreUnavailable(AppError):
    """Redis is down, slow beyond the timeout, or erroring; writes cannot be accepted."""

    status_code = 503


class Unauthorized(AppError):
    status_code = 401
    headers: ClassVar[dict[str, str]] = {"WWW-Authenticate": "Bearer"}


class AdminDisabled(AppError):
    """ADMIN_TOKEN is empty: no token can be right, so the admin API is switched off."""

    status_code = 403


def input_error(loc: tuple[str | int, ...], msg: str, value: Any, kind: str) -> dict[str, Any]:
    """One entry of a 422 `detail` list, shaped like pydantic's errors."""
    return {"type": kind, "loc": list(loc), "msg": msg, "input": value}


def _json_safe(value: Any) -> Any:
    """Echoed inputs may hold what Python's JSON parser accepts but UTF-8 JSON cannot carry:
    NaN/Infinity become null, lone surrogates (`"\\ud800"`) become `?`, instead of failing the
    error response itself."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, dict):
        return {_json_safe(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


async def _app_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, AppError)
    body = {"detail": _json_safe(exc.detail)}
    return JSONResponse(body, exc.status_code, headers=exc.headers or None)


async def _invalid_request(request: Request, exc: Exception) -> JSONResponse:
    # FastAPI's own body for 422s, made safe to serialise whatever the input was.
    assert isinstance(exc, RequestValidationError)
    return JSONResponse({"detail": _json_safe(jsonable_encoder(exc.errors()))}, 422)


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


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(AppError, _app_error)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
