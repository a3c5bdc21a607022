from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from app.api.deps import RecallDep
from app.schemas import (
    BatchRecallRequest,
    BatchRecallResponse,
    ErrorResponse,
    RecallRequest,
    RecallResponse,
)

router = APIRouter(prefix="/v1/recall", tags=["recall"])

ERRORS: dict[int | str, dict[str, Any]] = {
    413: {"model": ErrorResponse, "description": "Body larger than MAX_BODY_BYTES"},
    422: {"model": ErrorResponse, "description": "Invalid body, limit exceeded, unknown feature"},
    503: {"model": ErrorResponse, "description": "No model loaded (the reason is the detail)"},
}


@router.post("", responses=ERRORS, summary="Top-K items for one user")
async def recall(body: RecallRequest, service: RecallDep) -> RecallResponse:
    """Features: request over stored over defaults; history: the request's, else the stored
    list. Seen items (that history) are excluded unless `exclude_seen` is false, and `k`
    items are still returned when the catalogue has them. Unknown users get a cold-start
    recall (`feature_source` = `default`); an unavailable Redis degrades the same way."""
    return await service.recall(body)


@router.post("/batch", responses=ERRORS, summary="Recall for several users at once")
async def recall_batch(body: BatchRecallRequest, service: RecallDep) -> BatchRecallResponse:
    """One encode and one index search for the whole batch; results in request order."""
    return BatchRecallResponse(results=await service.recall_batch(body.requests))
