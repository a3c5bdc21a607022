from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from app.http.deps import UserIdPath, UsersDep
from app.http.schemas import (
    BODY_ERRORS,
    ErrorResponse,
    EventsRequest,
    EventsResponse,
    FeaturesRequest,
    FeaturesResponse,
)

router = APIRouter(prefix="/v1/users", tags=["users"])
# `:id` (`app.http.fields.PathIdConvertor`): a user id may hold "/", as in recalls.

ERRORS: dict[int | str, dict[str, Any]] = {
    **BODY_ERRORS,
    422: {
        "model": ErrorResponse,
        "description": "Invalid body, unknown feature or wrong-typed value",
    },
    503: {
        "model": ErrorResponse,
        "description": "Redis unavailable: nothing was stored (after a TimeoutError, it may "
        "have been)",
    },
}


@router.post(
    "/{user_id:id}/events", responses=ERRORS, summary="Record items the user interacted with"
)
async def append_events(
    user_id: UserIdPath, body: EventsRequest, users: UsersDep
) -> EventsResponse:
    """Prepends the items to the user's recent history (newest first, capped at
    HISTORY_CAP, TTL FEATURE_TTL_S); the next recall sees them."""
    length = await users.append_events(user_id, body.item_ids)
    return EventsResponse(user_id=user_id, history_length=length)


@router.put("/{user_id:id}/features", responses=ERRORS, summary="Replace the user's raw features")
async def put_features(
    user_id: UserIdPath, body: FeaturesRequest, users: UsersDep
) -> FeaturesResponse:
    """Names must be features of the serving model, and values of their kind's type (422
    otherwise); with no model loaded they are stored unchecked."""
    names = await users.put_features(user_id, body.features)
    return FeaturesResponse(user_id=user_id, features=names)
