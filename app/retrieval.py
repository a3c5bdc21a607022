"""The CPU-bound step of recall: encode a batch of users, search, exclude seen items.

`retrieve` takes a whole batch of prepared queries so one tower call and one index search
serve all of them (`/v1/recall/batch`, and the micro-batches of concurrent `/v1/recall`
requests). User vectors already encoded from the same inputs by the same model version come
from a `UserVectorCache` instead of the tower. The model's item index decides how it searches
(`app.search.ItemIndex`); this module only asks it for enough candidates to fill each query's
top k once its seen items are left out.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from app.model import ServingModel
from app.user_vector_cache import UserVectorCache

StageObserver = Callable[[str, float], None]


@dataclass(frozen=True, slots=True)
class Query:
    """One user's prepared recall.

    Attributes:
        features: raw features after merging (request over stored); missing = default.
        history: item ids, newest first (the vector cache's key).
        history_rows: the catalogue rows of its known items, in order (the tower's input).
        exclude: catalogue rows never to return (the seen items).
        k: results wanted.
        user_id: whose vector this is (the vector cache's key); None: not cached.
    """

    features: Mapping[str, Any]
    history: Sequence[str]
    history_rows: Sequence[int]
    exclude: frozenset[int]
    k: int
    user_id: str | None = None

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
    ) -> Query:
        """The query for `model`: the history is mapped to catalogue rows once, for the tower
        and the exclusion both."""
        rows = model.encoder.history_rows(history)
        exclude = frozenset(rows) if exclude_seen else frozenset()
        return cls(features, history, rows, exclude, k, user_id)


Result = list[tuple[str, float]]


def search(model: ServingModel, vectors: np.ndarray, queries: Sequence[Query]) -> list[Result]:
    """Top k per query, seen items excluded: an index search over-fetching by the query's
    exclusions, then an exact search for any query the index could not fill."""
    index, ids, n_items = model.index, model.item_ids, model.n_items
    fetches = [min(n_items, q.k + len(q.exclude)) for q in queries]
    candidates = index.search_depths(vectors, fetches)
    results: list[Result] = []
    for i, (query, (scores, rows)) in enumerate(zip(queries, candidates, strict=True)):
        want = min(query.k, n_items - len(query.exclude))
        out: Result = []
        if want <= 0:
            results.append(out)
            continue
        exclude = query.exclude
        for row, score in zip(rows, scores, strict=True):
            if row >= 0 and row not in exclude:
                out.append((ids[row], score))
                if len(out) == want:
                    break
        if len(out) < want:
            scores, rows = index.exact_top(vectors[i], want, exclude)
            out = [(ids[row], score) for row, score in zip(rows, scores, strict=True)]
        results.append(out)
    return results


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
    results = search(model, vectors, queries)
    if observe is not None:
        observe("encode", encoded - start)
        observe("search", time.perf_counter() - encoded)
    return results
