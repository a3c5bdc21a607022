"""`POST /v1/recall` with a JSON body, answered as plain ASGI in front of FastAPI's routing.

FastAPI's per-request machinery (route matching, dependency solving, the body parsed by
`json.loads` and then validated, the response class) cost about as much CPU as the recall
itself: in process, ~370 µs a request through the route, ~215 µs through this path (same
app and bundle, interleaved). Here the body is validated straight from its bytes by
pydantic-core and the service's JSON is sent as is, through the route's own handler
(`recall_response`).

Which requests it takes is decided from the request line and headers alone, before any body
is read: the route's path and method, and a JSON content type. Every request it takes it
answers itself, whatever happens, so nothing is computed or counted twice. Its answers are
the route's: a body the fast parse refuses is read again the way FastAPI reads it (its 422,
or, where Python's JSON parser is laxer, a recall), and every failure is answered by the
app's own error handlers (`app.http.errors`); an unexpected one propagates as from the
route. The route stays the one documented in OpenAPI, and answers the requests with another
content type. Requests get their id, metrics and access line from
`app.http.middleware.RequestObserver` outside it, as the route's do.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from fastapi.dependencies.utils import request_body_to_args
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import ValidationError
from pydantic_core import PydanticUndefined
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from app.http.deps import services_of
from app.http.errors import HANDLED, error_response
from app.http.middleware import read_body
from app.http.routes.recall import recall_response
from app.http.schemas import RecallRequest

PATH = "/v1/recall"
JSON_TYPES = (b"application/json", b"application/json; charset=utf-8")


class RecallFastPath:
    """Answers `POST /v1/recall` requests with a JSON body; `routes`: the app's, to find the
    route it answers for (requests are labelled with it, and a body the fast parse refuses is
    validated against its body field)."""

    def __init__(self, app: ASGIApp, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.route = next(
            r
            for r in routes
            if isinstance(r, APIRoute) and r.path == PATH and "POST" in (r.methods or ())
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not _takes(scope):
            await self.app(scope, receive, send)
            return
        body = await read_body(receive)  # bounded by BodyLimitMiddleware outside
        if body is None:  # the client went away
            return
        scope["route"] = self.route
        services = services_of(scope["app"])
        assert services is not None, "requests are served within the lifespan"
        response: Response
        try:
            response = await recall_response(services.recall, await self._parse(body))
        except HANDLED as exc:
            response = await error_response(Request(scope, receive), exc)
        await response(scope, receive, send)

    async def _parse(self, body: bytes) -> RecallRequest:
        try:
            return RecallRequest.model_validate_json(body)
        except ValidationError:
            return await self._parse_as_the_route(body)

    async def _parse_as_the_route(self, body: bytes) -> RecallRequest:
        """The body read as FastAPI reads a JSON body (0.165's `get_request_handler`): the
        route's request, else the route's RequestValidationError or HTTPException."""
        value: Any = PydanticUndefined  # no body: the route's "Field required"
        if body:
            try:
                value = json.loads(body)
            except json.JSONDecodeError as exc:
                error: dict[str, Any] = {"type": "json_invalid", "loc": ("body", exc.pos)}
                error |= {"msg": "JSON decode error", "input": {}, "ctx": {"error": exc.msg}}
                raise RequestValidationError([error], body=exc.doc) from exc
            except Exception as exc:  # not UTF-8, nested too deep: as FastAPI, a 400's cause
                raise HTTPException(400, "There was an error parsing the body") from exc
        fields = self.route.dependant.body_params
        values, errors = await request_body_to_args(fields, value, embed_body_fields=False)
        if errors:
            raise RequestValidationError(errors, body=value)
        request = values[fields[0].name]
        assert isinstance(request, RecallRequest)
        return request


def _takes(scope: Scope) -> bool:
    if scope["type"] != "http" or scope["path"] != PATH or scope["method"] != "POST":
        return False
    for name, value in scope["headers"]:
        if name == b"content-type":
            return bytes(value).lower() in JSON_TYPES
    return False
