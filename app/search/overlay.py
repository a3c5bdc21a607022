"""`ItemOverlay`: what changed in the catalogue since its bundle was built, searched beside the
bundle's item index, which is never mutated.

Two parts: the items added since (a small float32 matrix, searched exactly: every query scores
all of them) and the catalogue rows deleted since. A few deleted rows join each query's
excluded rows (`excluded`; the index over-fetches by them); from MASK_MIN_ROWS on they are a
mask instead (`allowed`: the rows not deleted, built with the overlay), which the index search
honours as it does a filter's, so that neither the exclusions nor the search's depth grow
with the deletions. A filtered query then reads its filter's rows less the deleted ones
(`allowed_with`: combined once per compiled filter and overlay). An overlay is immutable and
belongs to one serving model (the vectors come from that model's item tower); a change builds
a new one, with its own mask and no combined ones, and the serving model that carries it is
swapped in as one reference (`app.model.ModelRepository.update`), so a search reads either the
old overlay or the new one, never half of one. `app.catalogue` decides what goes in it.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from app.search.allowed import AllowedRows
from app.search.item_index import shared_tensor

# Deleted rows are a mask from this many on; fewer join each query's excluded rows, which keeps
# unfiltered queries on the index's unfiltered path and spares a combined mask per filter after
# every change. Per-query ms of prepare + search, exclusions / mask, 200k random 64-d unit
# items, k 50, 20 seen rows, one thread, batch 1 | 64 (benchmarks/deletions.py, 2-core box,
# busy): HNSW 100 deleted 0.69 / 0.73 | 0.60 / 0.51, 250 1.15 / 1.05 | 1.07 / 0.90, 500 1.44 /
# 1.09 | 1.37 / 0.93, 1k 1.48 / 0.72 | 1.61 / 0.65, 10k 4.11 / 1.02 | 4.70 / 0.75; flat 100
# 3.33 / 3.79 | 1.18 / 1.43, 250 3.33 / 3.79 | 1.12 / 0.97, 500 2.98 / 3.02 | 1.19 / 1.01, 1k
# 3.79 / 3.51 | 1.98 / 1.38, 10k 6.23 / 3.62 | 5.13 / 1.53. A 10 % filter: the mask as fast or
# faster from 100 on (10k: HNSW 2.78 / 0.83, flat 2.64 / 0.75); combining it 0.1 ms, once.
MASK_MIN_ROWS = 500


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
        n_items: the catalogue's size (the bundle's rows).
        allowed: the catalogue rows not deleted, when they are a mask (at least MASK_MIN_ROWS
            deleted); None: every row, less `excluded`.
        excluded: the deleted rows each query excludes itself (fewer than MASK_MIN_ROWS).
    """

    ids: tuple[str, ...]
    vectors: np.ndarray
    attributes: tuple[Mapping[str, Any], ...]
    masked: frozenset[int]
    revision: int
    applied: Mapping[str, str]
    n_items: int
    row_of: Mapping[str, int] = field(init=False)
    allowed: AllowedRows | None = field(init=False)
    excluded: frozenset[int] = field(init=False)
    # A filter's allowed rows -> those less the deleted ones; an entry lives as long as the
    # compiled filter (`app.filters.FilterCache` holds the last 16) and this overlay (the value
    # refers to its key weakly, `AllowedRows.base`).
    _combined: weakref.WeakKeyDictionary[AllowedRows, AllowedRows] = field(init=False, repr=False)
    _lock: threading.Lock = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.vectors) != len(self.ids) or len(self.attributes) != len(self.ids):
            raise ValueError("an overlay needs one vector and one attribute set per item")
        self.vectors.setflags(write=False)
        set_ = object.__setattr__
        set_(self, "row_of", {item: row for row, item in enumerate(self.ids)})
        allowed = None
        if self.masked and len(self.masked) >= MASK_MIN_ROWS:
            mask = np.ones(self.n_items, dtype=bool)
            mask[np.fromiter(self.masked, dtype=np.int64, count=len(self.masked))] = False
            allowed = AllowedRows(mask)
            allowed.selector()  # what the ANN and cluster searches read: built here, once
        set_(self, "allowed", allowed)
        set_(self, "excluded", self.masked if allowed is None else frozenset())
        set_(self, "_combined", weakref.WeakKeyDictionary())
        set_(self, "_lock", threading.Lock())

    def __len__(self) -> int:
        return len(self.ids)

    def rows_of(self, item_ids: Iterable[str]) -> frozenset[int]:
        """The overlay rows of those of `item_ids` that are added items."""
        row_of = self.row_of
        return frozenset(row for row in map(row_of.get, item_ids) if row is not None)

    def allowed_with(self, allowed: AllowedRows | None) -> AllowedRows | None:
        """The rows a query with a filter's `allowed` rows (None: unfiltered) may return, less
        the deleted ones when they are a mask: built once per filter and overlay."""
        if self.allowed is None:
            return allowed
        if allowed is None:
            return self.allowed
        with self._lock:
            combined = self._combined.get(allowed)
            if combined is None:
                combined = AllowedRows(allowed.mask & self.allowed.mask, base=allowed)
                self._combined[allowed] = combined
        return combined

    def top(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top `k` (at most `len(self)`) of each row of `vectors` float32 `(B, dim)`:
        (scores float32 `(B, k)`, overlay rows int64 `(B, k)`), best first. torch's top-k,
        several times faster than numpy's partition and sort at thousands of items."""
        k = min(k, len(self))
        with torch.inference_mode():
            scores = torch.from_numpy(vectors) @ shared_tensor(self.vectors).T
            top = torch.topk(scores, k, dim=1, sorted=True)
        return top.values.numpy(), top.indices.numpy()


def overlay_of(
    ids: Sequence[str],
    vectors: np.ndarray,
    attributes: Sequence[Mapping[str, Any]],
    masked: Iterable[int],
    revision: int,
    applied: Mapping[str, str],
    n_items: int,
) -> ItemOverlay:
    """An overlay of a catalogue of `n_items` rows; its matrix is its own contiguous float32
    copy."""
    matrix = np.ascontiguousarray(vectors, dtype=np.float32)
    return ItemOverlay(
        tuple(ids), matrix, tuple(attributes), frozenset(masked), revision, dict(applied), n_items
    )


# No change: what a model serves with until its changes are applied.
EMPTY_OVERLAY = ItemOverlay((), np.zeros((0, 0), dtype=np.float32), (), frozenset(), -1, {}, 0)
