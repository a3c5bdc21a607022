"""The CPU-bound step of recall: encode a batch of users, search, exclude seen items.

`retrieve` takes a whole batch of prepared queries so one tower call and one index search
serve all of them (`/v1/recall/batch`, and the micro-batches of concurrent `/v1/recall`
requests). User vectors already encoded from the same inputs by the same model version come
from a `UserVectorCache` instead of the tower. The model's item index decides how it searches
(`app.search.ItemIndex`); this module only asks it for enough candidates to fill each query's
top k once its seen items are left out, among the items its filter allows (queries that share
a filter are searched together), and fills from an exact search any query it answered short.
Items changed at serving time (`app.catalogue`) are the model's overlay
(`app.search.overlay`): its deleted catalogue rows join each query's excluded rows while they
are few, and are a mask of the rows it may return (`Query.allowed`, with its filter's) once
they are many; its added items are scored exactly and merged into each top k
(`merge_overlay`).
"""

from __future__ import annotations

import operator
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from app.filters import CompiledFilter
from app.model import ServingModel
from app.search import AllowedRows, ItemIndex
from app.search.item_index import Candidates
from app.user_vector_cache import UserVectorCache

StageObserver = Callable[[str, float], None]


@dataclass(frozen=True, slots=True)
class Query:
    """One user's prepared recall.

    Attributes:
        features: raw features after merging (request over stored); missing = default.
        history: the item ids the user tower reads, newest first (the vector cache's key).
        history_rows: the catalogue rows of its known items, in order (the tower's input).
        exclude: catalogue rows never to return (the seen items the tower reads; the deleted
            ones while the overlay does not mask them, `ItemOverlay.excluded`).
        k: results wanted.
        user_id: whose vector this is (the vector cache's key); None: not cached.
        filter: which items may be returned; None: any.
        overlay_exclude: rows of the model's overlay never to return (seen added items).
        allowed: the catalogue rows it may return (the filter's, less the deleted ones when
            the overlay masks them); None: every row. Left out, the filter's.
        older_seen: ids of the seen items older than the tower reads, never to return: kept
            as ids and checked only against the candidates, since mapping a long history to
            rows costs a cache miss or two per item in a large catalogue (`search`).
    """

    features: Mapping[str, Any]
    history: Sequence[str]
    history_rows: Sequence[int]
    exclude: frozenset[int]
    k: int
    user_id: str | None = None
    filter: CompiledFilter | None = None
    overlay_exclude: frozenset[int] = frozenset()
    allowed: AllowedRows | None = None
    older_seen: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if self.allowed is None and self.filter is not None:
            object.__setattr__(self, "allowed", self.filter.allowed)

    @classmethod
    def prepare(
        cls,
        model: ServingModel,
        features: Mapping[str, Any],
        history: Sequence[str],
        k: int,
        *,
        exclude_seen: bool = True,
        user_id: str | None = None,
        filter: CompiledFilter | None = None,
        history_cap: int | None = None,
    ) -> Query:
        """The query for `model`: the newest items the user tower reads (its `history_length`
        known ones, among the newest `history_cap` ids: what a stored history holds, so that a
        history sent in the request reads as the same history stored; None: all of them) are
        mapped to catalogue rows once, for the tower and the exclusion both; the older ones
        are excluded by id. Added items in the history are unknown to the bundle (the tower
        skips them) but left out of the overlay's results like any seen item. The deleted rows
        are the overlay's mask or join the excluded rows (`ItemOverlay`)."""
        rows, taken = model.encoder.newest_rows(history[:history_cap])
        read = history[:taken]
        exclude = frozenset(rows) if exclude_seen else frozenset()
        older = frozenset(history[taken:]) if exclude_seen else frozenset()
        overlay = model.overlay
        if overlay.excluded:
            exclude |= overlay.excluded
        seen_added = overlay.rows_of(history) if exclude_seen and len(overlay) else frozenset()
        allowed = overlay.allowed_with(None if filter is None else filter.allowed)
        return cls(features, read, rows, exclude, k, user_id, filter, seen_added, allowed, older)

    def resolved(self, model: ServingModel) -> Query:
        """The same query with its older seen items mapped to rows and excluded as rows."""
        older = model.encoder.history_rows(self.older_seen)
        return replace(self, exclude=self.exclude | frozenset(older), older_seen=frozenset())

    def available(self, n_items: int) -> int:
        """How many catalogue rows this query may return: allowed and not excluded."""
        allowed = self.allowed
        if allowed is None:
            return n_items - len(self.exclude)
        return allowed.count - allowed.allowed_among(self.exclude)


Result = list[tuple[str, float]]


def search(model: ServingModel, vectors: np.ndarray, queries: Sequence[Query]) -> list[Result]:
    """Top k per query, seen items excluded, filters applied: an index search over-fetching by
    the query's exclusions, then an exact search for any query the index could not fill."""
    index, ids, n_items = model.index, model.item_ids, model.n_items
    candidates = _candidates(index, vectors, queries)
    results: list[Result] = []
    again: list[int] = []
    for i, (query, (scores, rows)) in enumerate(zip(queries, candidates, strict=True)):
        # An upper bound while older seen items are ids (some may be unknown or repeated).
        want = min(query.k, query.available(n_items))
        out: Result = []
        if want <= 0:
            results.append(out)
            continue
        exclude, older = query.exclude, query.older_seen
        for row, score in zip(rows, scores, strict=True):
            if row >= 0 and row not in exclude:
                item = ids[row]
                if item in older:
                    continue
                out.append((item, score))
                if len(out) == want:
                    break
        if len(out) < want:
            if older:  # the older seen items took the slack: search again, all as rows
                again.append(i)
            else:
                scores, rows = index.exact_top(vectors[i], want, exclude, query.allowed)
                out = [(ids[row], score) for row, score in zip(rows, scores, strict=True)]
        results.append(out)
    if again:
        resolved = [queries[i].resolved(model) for i in again]
        for i, out in zip(again, search(model, vectors[again], resolved), strict=True):
            results[i] = out
    return results


def _candidates(
    index: ItemIndex, vectors: np.ndarray, queries: Sequence[Query]
) -> list[Candidates]:
    """Each query's candidates: enough to fill its k once its allowed seen items are dropped.
    One index search per set of allowed rows (a filter's, the overlay's mask, both; None:
    every row) serves every query that has it."""
    groups: dict[AllowedRows | None, list[int]] = {}
    for i, query in enumerate(queries):
        groups.setdefault(query.allowed, []).append(i)
    out: list[Candidates] = [([], [])] * len(queries)
    for allowed, members in groups.items():
        if allowed is None:
            fetches = [min(index.n_items, queries[i].k + len(queries[i].exclude)) for i in members]
        elif allowed.count == 0:
            continue  # nothing can pass: no search
        else:
            fetches = [
                min(allowed.count, queries[i].k + allowed.allowed_among(queries[i].exclude))
                for i in members
            ]
        found = index.search_depths(vectors[members], fetches, allowed)
        for i, candidates in zip(members, found, strict=True):
            out[i] = candidates
    return out


_score = operator.itemgetter(1)


def merge_overlay(
    model: ServingModel, vectors: np.ndarray, queries: Sequence[Query], results: list[Result]
) -> list[Result]:
    """Each query's top k of the index's results and the overlay's added items together, by
    score. The overlay is small: every query scores all of it, exactly (a filtered query
    judges each added item by its attributes, `CompiledFilter.accepts`)."""
    overlay = model.overlay
    if not len(overlay):
        return results
    filtered = any(q.filter is not None for q in queries)
    depth = len(overlay) if filtered else max(q.k + len(q.overlay_exclude) for q in queries)
    scores, rows = overlay.top(vectors, depth)
    ids, attributes = overlay.ids, overlay.attributes
    merged: list[Result] = []
    for i, (query, found) in enumerate(zip(queries, results, strict=True)):
        # A full top k takes only added items scoring above its last (the overlay's scores
        # are in descending order): usually a few, or none.
        limit = depth
        if len(found) == query.k:
            limit = int(np.searchsorted(-scores[i], -found[-1][1], side="left"))
        skip, accepts = query.overlay_exclude, query.filter.accepts if query.filter else None
        added: Result = []
        for row, score in zip(rows[i, :limit].tolist(), scores[i, :limit].tolist(), strict=True):
            if row in skip or (accepts is not None and not accepts(ids[row], attributes[row])):
                continue
            added.append((ids[row], score))
            if len(added) == query.k:
                break
        if not added:
            merged.append(found)
            continue
        both = sorted([*found, *added], key=_score, reverse=True)
        merged.append(both[: query.k])
    return merged


def encode(
    model: ServingModel, queries: Sequence[Query], cache: UserVectorCache | None = None
) -> np.ndarray:
    """User vectors float32 `(B, dim)`: the cached ones, and one tower call for the rest."""
    if cache is None:
        return _encode(model, queries)
    vectors = np.empty((len(queries), model.dim), dtype=np.float32)
    keys = [cache.key(model.version, q.features, q.history) for q in queries]
    missing = []
    for i, (query, key) in enumerate(zip(queries, keys, strict=True)):
        vector = None
        if query.user_id is not None and key is not None:
            vector = cache.get(query.user_id, key)
        if vector is None:
            missing.append(i)
        else:
            vectors[i] = vector
    if missing:
        fresh = _encode(model, [queries[i] for i in missing])
        vectors[missing] = fresh
        for i, vector in zip(missing, fresh, strict=True):
            user_id, key = queries[i].user_id, keys[i]
            if user_id is not None and key is not None:
                cache.put(user_id, key, vector.copy())
    return vectors


def _encode(model: ServingModel, queries: Sequence[Query]) -> np.ndarray:
    features = [q.features for q in queries]
    return model.encode(features, history_rows=[q.history_rows for q in queries])


def retrieve(
    model: ServingModel,
    queries: Sequence[Query],
    observe: StageObserver | None = None,
    cache: UserVectorCache | None = None,
) -> list[Result]:
    """Encode + search a batch of queries on one model; `observe(stage, seconds)` gets the
    `encode` and `search` timings."""
    start = time.perf_counter()
    vectors = encode(model, queries, cache)
    encoded = time.perf_counter()
    results = merge_overlay(model, vectors, queries, search(model, vectors, queries))
    if observe is not None:
        observe("encode", encoded - start)
        observe("search", time.perf_counter() - encoded)
    return results
