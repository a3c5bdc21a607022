"""Item changes applied to one serving model: the overlay its searches read beside its index.

The rules, the same for every model and every order in which changes and models arrive, so
every worker that has read the same changes serves the same catalogue:

- a deleted item is masked when the model's bundle holds it, and is in no overlay;
- an added (or changed) item the bundle does not hold is embedded by the model's item tower
  and searched in the overlay;
- an added item the bundle holds is served from the bundle (the bundle wins: it was trained
  with the item; a put on a deleted catalogue item brings it back).

A model with no item tower (bundle format 1) cannot embed items: it serves the deletions only.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from app.catalogue.changes import ChangeSet
from app.errors import ItemTowerUnavailable
from app.model import ServingModel
from app.model.value_checks import attribute_errors
from app.search.overlay import overlay_of
from app.store import ItemChange
from models.features import FeatureEncoder

log = logging.getLogger(__name__)

EMBED_BATCH = 1024  # items per item-tower call while a whole change log is embedded


def apply_changes(model: ServingModel, changes: ChangeSet) -> ServingModel:
    """`model` serving `changes`: itself when its overlay already reflects them, else the same
    model with a new overlay (the items its previous overlay holds unchanged are not embedded
    again). Pure CPU: a worker thread runs it for a new bundle, the event loop for a few."""
    old = model.overlay
    if old.revision == changes.revision:
        return model
    known = model.encoder.item_index
    masked: list[int] = []
    added: list[ItemChange] = []
    for change in changes.items.values():
        row = known.get(change.item_id)
        if change.attributes is None:
            if row is not None:
                masked.append(row)
        elif row is None:
            added.append(change)
    kept: list[tuple[ItemChange, int]] = []
    fresh: list[ItemChange] = []
    for change in added:
        row = old.row_of.get(change.item_id)
        if row is not None and old.applied.get(change.item_id) == changes.tag(change):
            kept.append((change, row))
        else:
            fresh.append(change)
    embedded, vectors = _embed(model, fresh)
    items = [change for change, _ in kept] + embedded
    matrix = np.concatenate([old.vectors[[row for _, row in kept]], vectors]) if kept else vectors
    overlay = overlay_of(
        [c.item_id for c in items],
        matrix.reshape(len(items), model.dim),
        [_attributes(c) for c in items],
        masked,
        changes.revision,
        {c.item_id: changes.tag(c) for c in items},
        model.n_items,
    )
    return dataclasses.replace(model, overlay=overlay)


def _embed(model: ServingModel, changes: Sequence[ItemChange]) -> tuple[list[ItemChange], Any]:
    """The changes `model` can embed and their vectors float32 `(n, dim)`."""
    if not changes:
        return [], np.zeros((0, model.dim), dtype=np.float32)
    encoder = model.item_encoder
    if encoder is None:
        log.warning(
            "bundle %s has no item tower: %d added items are not served by it",
            model.version,
            len(changes),
        )
        return [], np.zeros((0, model.dim), dtype=np.float32)
    parts = []
    for start in range(0, len(changes), EMBED_BATCH):
        batch = changes[start : start + EMBED_BATCH]
        rows = [usable_attributes(encoder, _attributes(c)) for c in batch]
        try:
            parts.append(model.embed_items(rows, [c.item_id for c in batch]))
        except ItemTowerUnavailable:
            return [], np.zeros((0, model.dim), dtype=np.float32)
    return list(changes), np.concatenate(parts)


def usable_attributes(encoder: FeatureEncoder, attributes: Mapping[str, Any]) -> dict[str, Any]:
    """The attributes this model's item tower reads: a name it does not know, or a value of a
    type it cannot read, counts as missing (stored changes were checked against the model
    serving when they were made, and a later bundle may read other attributes)."""
    bad = {error["loc"][-1] for error in attribute_errors(encoder, [attributes], ())}
    return {name: value for name, value in attributes.items() if name not in bad}


def _attributes(change: ItemChange) -> Mapping[str, Any]:
    return change.attributes or {}
