"""How one worker serves one item id now: from the bundle, from the overlay, deleted, or (an
added item a bundle without item tower cannot embed) not at all."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from app.catalogue.changes import ChangeSet
from app.model import ServingModel

# catalogue: the serving bundle holds it (and it is not deleted); added: searched in the
# overlay; deleted: never returned; not_served: added, but the serving bundle has no item tower.
ItemStatus = Literal["catalogue", "added", "deleted", "not_served"]


@dataclass(frozen=True, slots=True)
class ItemState:
    """Attributes:
    item_id: the item.
    status: how the serving model serves it.
    model_version: the serving model's version; None while none serves.
    seq: the number of the item's latest change in the log; None: never changed.
    attributes: the attributes its latest change gave it; None: none (deleted, or unchanged).
    """

    item_id: str
    status: ItemStatus
    model_version: str | None
    seq: int | None
    attributes: Mapping[str, Any] | None


def item_state(model: ServingModel | None, changes: ChangeSet, item_id: str) -> ItemState | None:
    """`item_id` as `model` serves it with `changes`; None: neither knows it."""
    change = changes.items.get(item_id)
    in_bundle = model is not None and item_id in model.encoder.item_index
    status: ItemStatus
    if change is not None and change.deleted:
        status = "deleted"
    elif in_bundle:
        status = "catalogue"
    elif change is None:
        return None
    elif model is not None and item_id in model.overlay.row_of:
        status = "added"
    else:
        status = "not_served"
    version = model.version if model is not None else None
    seq = change.seq if change is not None else None
    attributes = change.attributes if change is not None else None
    return ItemState(item_id, status, version, seq, attributes)
