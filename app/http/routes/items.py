"""Items added, changed and deleted at serving time (`app.catalogue`): writes need the admin
token; reading an item's state does not."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter

from app.catalogue import ItemState
from app.http.deps import AdminDep, ServicesDep, id_path
from app.http.routes.admin import AUTH_ERRORS
from app.http.schemas import BODY_ERRORS, ErrorResponse, ItemRequest, ItemResponse

router = APIRouter(prefix="/v1/items", tags=["items"])
# `:id` (`app.http.fields.PathIdConvertor`): an id may hold "/", as a catalogue's may.

ItemIdPath = Annotated[str, id_path("new-42")]
LOG_UNAVAILABLE = (
    "The change log (Redis) cannot be written: nothing changed (after a TimeoutError it may "
    "have; the same change can be sent again)"
)


@router.put(
    "/{item_id:id}",
    dependencies=[AdminDep],
    responses={
        **AUTH_ERRORS,
        503: {"model": ErrorResponse, "description": f"{LOG_UNAVAILABLE}; or no model serves yet"},
        409: {"model": ErrorResponse, "description": "The serving bundle has no item tower"},
        **BODY_ERRORS,
        422: {"model": ErrorResponse, "description": "Unknown attribute or wrong-typed value"},
    },
    summary="Add or change an item: retrievable without retraining",
)
async def put_item(item_id: ItemIdPath, body: ItemRequest, services: ServicesDep) -> ItemResponse:
    """Embeds the item with the serving bundle's item tower (its id unknown to the bundle, the
    prior of an item without interactions) and serves it beside the index. Answers once the
    change is durable (in Redis; without Redis, in this process) and served by the worker
    that answers; the others follow within RELOAD_POLL_S, and every bundle loaded later serves
    it too, unless that bundle holds the item itself (the bundle wins)."""
    return _response(await services.catalogue.put(item_id, body.attributes), services.worker)


@router.delete(
    "/{item_id:id}",
    dependencies=[AdminDep],
    responses={**AUTH_ERRORS, 503: {"model": ErrorResponse, "description": LOG_UNAVAILABLE}},
    summary="Delete an item: never returned again",
)
async def delete_item(item_id: ItemIdPath, services: ServicesDep) -> ItemResponse:
    """A catalogue item, an added one, or an id a later bundle may bring: never returned by
    any worker (within RELOAD_POLL_S), on every bundle, until it is put again. Answers once
    the change is durable and served by the worker that answers; with no model serving yet,
    once durable (`model_version` null): the bundle that loads next hides it."""
    return _response(await services.catalogue.delete(item_id), services.worker)


@router.get(
    "/{item_id:id}",
    responses={404: {"model": ErrorResponse, "description": "Neither served nor changed"}},
    summary="How the worker that answers serves an item",
)
async def get_item(item_id: ItemIdPath, services: ServicesDep) -> ItemResponse:
    return _response(services.catalogue.get(item_id), services.worker)


def _response(state: ItemState, worker: str) -> ItemResponse:
    attributes = dict(state.attributes) if state.attributes is not None else None
    return ItemResponse(
        item_id=state.item_id,
        status=state.status,
        model_version=state.model_version,
        worker=worker,
        seq=state.seq,
        attributes=attributes,
    )
