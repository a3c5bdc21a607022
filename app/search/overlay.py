"""`ItemOverlay`: what changed in the catalogue since its bundle was built, searched beside the
bundle's item index, which is never mutated.

Two parts: the items added since (a small float32 matrix, searched exactly: every query scores
all of them) and the catalogue rows deleted since (a mask: they join each query's excluded
rows). An overlay is immutable and belongs to one serving model (the vectors come from that
model's item tower); a change builds a new one, and the serving model that carries it is
swapped in as one reference (`app.model.ModelRepository.update`), so a search reads either the
old overlay or the new one, never half of one. `app.catalogue` decides what goes in it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from app.search.item_index import shared_tensor


@dataclass(frozen=True, eq=False)
class ItemOverlay:
    """Added items and deleted catalogue rows of one serving model.

    Attributes:
        ids: the added items' external ids; overlay row i is `ids[i]`.
        vectors: float32 `(len(ids), dim)`, read-only: their vectors as the index would hold
            them (model's item tower, prior of an item without interactions).
        attributes: each added item's raw attributes (what request filters read).
        masked: catalogue rows never to return (deleted items).
        revision: the revision of the change set it reflects (-1: none).
        applied: item id -> a tag of the change each added item reflects (so that the next
            overlay of the same model embeds only what changed since).
    """

    ids: tuple[str, ...]
    vectors: np.ndarray
    attributes: tuple[Mapping[str, Any], ...]
    masked: frozenset[int]
    revision: int
    applied: Mapping[str, str]
    row_of: Mapping[str, int] = field(init=False)

    def __post_init__(self) -> None:
        if len(self.vectors) != len(self.ids) or len(self.attributes) != len(self.ids):
            raise ValueError("an overlay needs one vector and one attribute set per item")
        self.vectors.setflags(write=False)
        object.__setattr__(self, "row_of", {item: row for row, item in enumerate(self.ids)})

    def __len__(self) -> int:
        return len(self.ids)

    def rows_of(self, item_ids: Iterable[str]) -> frozenset[int]:
        """The overlay rows of those of `item_ids` that are added items."""
        row_of = self.row_of
        return frozenset(row for row in map(row_of.get, item_ids) if row is not None)

    def top(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top `k` (at most `len(self)`) of each row of `vectors` float32 `(B, dim)`:
        (scores float32 `(B, k)`, overlay rows int64 `(B, k)`), best first. torch's top-k,
        several times faster than numpy's partition and sort at thousands of items."""
        k = min(k, len(self))
        with torch.inference_mode():
            scores = torch.from_numpy(vectors) @ shared_tensor(self.vectors).T
            top = torch.topk(scores, k, dim=1, sorted=True)
        return top.values.numpy(), top.indices.numpy()


def empty_overlay(dim: int = 0) -> ItemOverlay:
    """No change: what a model serves with until its changes are applied."""
    return ItemOverlay((), np.zeros((0, dim), dtype=np.float32), (), frozenset(), -1, {})


def overlay_of(
    ids: Sequence[str],
    vectors: np.ndarray,
    attributes: Sequence[Mapping[str, Any]],
    masked: Iterable[int],
    revision: int,
    applied: Mapping[str, str],
) -> ItemOverlay:
    """An overlay whose matrix is its own contiguous float32 copy."""
    matrix = np.ascontiguousarray(vectors, dtype=np.float32)
    return ItemOverlay(
        tuple(ids), matrix, tuple(attributes), frozenset(masked), revision, dict(applied)
    )


EMPTY_OVERLAY = empty_overlay()
