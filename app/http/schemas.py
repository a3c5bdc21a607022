"""Request and response models: the HTTP contract of docs/design.md, with static bounds.

Bounds that depend on settings (MAX_K, MAX_HISTORY, MAX_BATCH) are checked by the service
after parsing and reported in the same 422 shape. The lists bound statically by their ceilings
fail fast: one wrong id stands for the rest (130,000 wrong ids made 130,000 errors: a second of
the event loop).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StringConstraints

from app.catalogue import ItemStatus
from app.http.fields import MAX_ID_LENGTH, MAX_STRING_VALUE, ExternalId, Name
from app.http.filter_schema import RecallFilter
from app.recall import FeatureSource
from app.settings import MAX_BATCH_CEILING, MAX_HISTORY_CEILING
from app.store import StoreStatus

MAX_FEATURES = 64
MAX_LIST_VALUES = 64

FeatureName = Name
ShortString = Annotated[str, StringConstraints(max_length=MAX_STRING_VALUE)]
# Integers within float64's exact range: the encoder turns numerics into floats.
SafeInt = Annotated[StrictInt, Field(ge=-(2**53), le=2**53)]
FeatureValue = (
    StrictBool
    | SafeInt
    | Annotated[float, Field(allow_inf_nan=False)]
    | ShortString
    | Annotated[list[ShortString], Field(max_length=MAX_LIST_VALUES, fail_fast=True)]
    | None
)
Features = Annotated[dict[FeatureName, FeatureValue], Field(max_length=MAX_FEATURES)]

_RECALL_EXAMPLE: dict[str, Any] = {
    "user_id": "u42",
    "k": 10,
    "features": {"country": "DE", "age_group": "25-34"},
    "history": ["i17", "i3"],
    "exclude_seen": True,
    "filter": {"include": {"category": ["c1"]}, "range": {"price": {"lt": 20}}},
}
_RECALL_RESPONSE_EXAMPLE: dict[str, Any] = {
    "user_id": "u42",
    "model_version": "20261122T113000Z-3f9a1c",
    "items": [{"item_id": "i88", "score": 0.8123}, {"item_id": "i5", "score": 0.7991}],
    "feature_source": "request",
}


class RecallRequest(BaseModel):
    """Recall for one user. `features` override the stored ones name by name (null = missing);
    `history` (newest first) replaces the stored list when given, even when empty."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [_RECALL_EXAMPLE]})

    user_id: ExternalId
    k: Annotated[
        StrictInt | None,
        Field(ge=1, description="items to return, 1..MAX_K; omitted or null: min(50, MAX_K)"),
    ] = None
    features: Features | None = None
    history: Annotated[
        list[ExternalId] | None,
        Field(
            max_length=MAX_HISTORY_CEILING,
            fail_fast=True,
            description="newest first; at most MAX_HISTORY ids",
        ),
    ] = None
    exclude_seen: StrictBool = True
    filter: Annotated[
        RecallFilter | None,
        Field(description="only items that pass it; k of them when that many pass"),
    ] = None


class ScoredItem(BaseModel):
    item_id: str
    score: float = Field(description="inner product of the user and item embeddings")


class RecallResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [_RECALL_RESPONSE_EXAMPLE]})

    user_id: str
    model_version: str
    items: list[ScoredItem] = Field(description="best first")
    feature_source: FeatureSource


class BatchRecallRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"requests": [_RECALL_EXAMPLE]}]}
    )

    requests: list[RecallRequest] = Field(
        min_length=1, max_length=MAX_BATCH_CEILING, fail_fast=True, description="at most MAX_BATCH"
    )


class BatchRecallResponse(BaseModel):
    results: list[RecallResponse] = Field(description="in request order")


class EventsRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"item_ids": ["i3", "i17"]}]}
    )

    item_ids: list[ExternalId] = Field(
        min_length=1,
        max_length=MAX_HISTORY_CEILING,
        fail_fast=True,
        description="oldest first: the last one becomes the newest; ≤ MAX_HISTORY",
    )


class EventsResponse(BaseModel):
    user_id: str
    history_length: int = Field(description="stored history length after capping")


class FeaturesRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"features": {"country": "DE", "activity": 12.5}}]},
    )

    features: Features


class FeaturesResponse(BaseModel):
    user_id: str
    features: list[str] = Field(description="names stored (they replace the previous set)")


class LiveResponse(BaseModel):
    status: Literal["alive"] = "alive"


class ReadyResponse(BaseModel):
    model_version: str
    n_items: int
    index_type: str
    redis: StoreStatus
    worker: str = Field(description="host:pid of the worker process that answered")
    reload_error: str | None = Field(
        description="why the desired version (pinned, else LATEST) is not serving; null if it is"
    )


class ReloadRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"version": "20261122T113000Z-3f9a1c"}, {}]},
    )

    version: Annotated[
        str | None,
        StringConstraints(max_length=MAX_ID_LENGTH),
        Field(
            description="a version directory of MODEL_DIR, pinned for every worker; "
            "default: unpin and serve what LATEST names"
        ),
    ] = None


class ReloadResponse(BaseModel):
    model_version: str
    previous_version: str | None


class ModelsResponse(BaseModel):
    active: str | None = Field(description="the version serving now (in this worker)")
    latest: str | None = Field(description="what LATEST names")
    pinned: str | None = Field(description="the version set by a reload with a version, if any")
    reload_error: str | None = Field(description="why the desired version is not serving")
    versions: list[str] = Field(description="version directories in MODEL_DIR, oldest first")


class ErrorResponse(BaseModel):
    """Every error body: a message, or for input errors the list FastAPI uses."""

    detail: str | list[dict[str, Any]]


# What every route that reads a body may answer before reading it as JSON
# (`app.http.middleware.BodyLimitMiddleware`).
BODY_ERRORS: dict[int | str, dict[str, Any]] = {
    408: {"model": ErrorResponse, "description": "Body not received within BODY_TIMEOUT_S"},
    413: {"model": ErrorResponse, "description": "Body larger than MAX_BODY_BYTES"},
}


_ITEM_EXAMPLE: dict[str, Any] = {
    "attributes": {"category": "c3", "tags": ["t1", "t7"], "price": 12.5}
}
_ITEM_RESPONSE_EXAMPLE: dict[str, Any] = {
    "item_id": "new-42",
    "status": "added",
    "model_version": "20261122T113000Z-3f9a1c",
    "worker": "web-1:4242",
    "seq": 17,
    "attributes": _ITEM_EXAMPLE["attributes"],
}


class ItemRequest(BaseModel):
    """An item's raw attributes, as the item table spells them (names the serving bundle's
    item tower reads; a missing or null one is a missing value)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [_ITEM_EXAMPLE]})

    attributes: Features


class ItemResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [_ITEM_RESPONSE_EXAMPLE]})

    item_id: str
    status: ItemStatus = Field(
        description="how the worker that answered serves it: `catalogue` (from the bundle, "
        "which wins over an added item of the same id: its vector, and for filters its "
        "attributes, are the bundle's), `added` (searched beside the index), "
        "`deleted` (never returned), `not_served` (added, but the serving bundle has no item "
        "tower)"
    )
    model_version: str | None = Field(description="the bundle serving in that worker")
    worker: str = Field(description="host:pid of the worker process that answered")
    seq: int | None = Field(
        description="the number of the item's latest change in the change log; null: none"
    )
    attributes: dict[str, Any] | None = Field(
        description="the attributes of its latest change; null: deleted or never changed"
    )
