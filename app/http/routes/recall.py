"""`/v1/recall` and `/v1/recall/batch`. A `POST /v1/recall` with a JSON body is answered
before routing by `app.http.fast_path`, through the same `recall_response` and the same error
handlers; this route answers the others and is the one OpenAPI documents."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app.http.deps import RecallDep
from app.http.schemas import (
    BODY_ERRORS,
    BatchRecallRequest,
    BatchRecallResponse,
    ErrorResponse,
    RecallRequest,
    RecallResponse,
)
from app.recall import RecallService

router = APIRouter(prefix="/v1/recall", tags=["recall"])

ERRORS: dict[int | str, dict[str, Any]] = {
    **BODY_ERRORS,
    422: {
        "model": ErrorResponse,
        "description": "Invalid body, limit exceeded, unknown feature or wrong-typed value",
    },
    503: {"model": ErrorResponse, "description": "No model loaded (the reason is the detail)"},
}


class JSONBytes(JSONResponse):
    """A body the service already serialised (orjson), exactly in the declared model's shape;
    a JSONResponse, so the OpenAPI document shows that model."""

    def render(self, content: Any) -> bytes:
        assert isinstance(content, bytes)
        return content


async def recall_response(service: RecallService, request: RecallRequest) -> JSONBytes:
    """One user's recall as the HTTP response: the handler of the route and of the fast path.
    Failures are raised, for the app's error handlers (`app.http.errors`) to answer."""
    return JSONBytes(await service.recall(request))


@router.post(
    "",
    response_model=RecallResponse,
    response_class=JSONBytes,
    responses=ERRORS,
    summary="Top-K items for one user",
)
async def recall(body: RecallRequest, service: RecallDep) -> JSONBytes:
    """Features: request over stored over defaults; history: the request's, else the stored
    list's newest items, as many as the model's user tower reads. Seen items (that history)
    are excluded unless `exclude_seen` is false, and `k` items are still returned when the
    catalogue has them. Unknown users get a cold-start recall (`feature_source` =
    `default`); an unavailable Redis degrades the same way."""
    return await recall_response(service, body)


@router.post(
    "/batch",
    response_model=BatchRecallResponse,
    response_class=JSONBytes,
    responses=ERRORS,
    summary="Recall for several users at once",
)
async def recall_batch(body: BatchRecallRequest, service: RecallDep) -> JSONBytes:
    """One encode and one index search for the whole batch; results in request order."""
    return JSONBytes(await service.recall_batch(body.requests))
