"""The CPU-bound step of recall: encode a batch of users, search, exclude seen items.

`retrieve` takes a whole batch of prepared queries so one tower call and one index search
serve all of them (`/v1/recall/batch`, and the micro-batches of concurrent `/v1/recall`
requests). User vectors already encoded from the same inputs by the same model version come
from a `VectorCache` instead of the tower.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from app.bundle_loader import ServingBundle
from app.cache import VectorCache

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
        bundle: ServingBundle,
        features: Mapping[str, Any],
        history: Sequence[str],
        k: int,
        *,
        exclude_seen: bool = True,
        user_id: str | None = None,
    ) -> Query:
        """The query for `bundle`: the history is mapped to catalogue rows once, for the tower
        and the exclusion both."""
        rows = bundle.encoder.history_rows(history)
        exclude = frozenset(rows) if exclude_seen else frozenset()
        return cls(features, history, rows, exclude, k, user_id)


Result = list[tuple[str, float]]


def _exact_top(bundle: ServingBundle, vector: np.ndarray, query: Query, want: int) -> Result:
    """Brute-force top `want` over the whole catalogue: the fallback when an approximate
    index returns too few results once seen items are removed."""
    with torch.inference_mode():
        scores = bundle.matrix @ torch.from_numpy(vector)
        if query.exclude:
            scores[torch.tensor(sorted(query.exclude), dtype=torch.int64)] = -torch.inf
        top = torch.topk(scores, want, sorted=True)
    ids = bundle.item_ids
    return [
        (ids[row], score)
        for row, score in zip(top.indices.tolist(), top.values.tolist(), strict=True)
    ]


def _candidates(
    bundle: ServingBundle, vectors: np.ndarray, fetches: list[int]
) -> list[tuple[list[float], list[int]]]:
    """(scores, rows) of each query's top `fetches[i]` from the index. Exact search and IVF
    return a prefix of the same ranking at any depth, so one search at the deepest serves
    all; some FAISS versions widen an HNSW search to max(efSearch, depth), so there each
    depth gets its own search, and a query's answer never depends on its batch."""
    if bundle.index_type != "hnsw":
        depths = {max(fetches): list(range(len(fetches)))}
    else:
        depths = {}
        for i, fetch in enumerate(fetches):
            depths.setdefault(fetch, []).append(i)
    out: list[tuple[list[float], list[int]]] = [([], [])] * len(fetches)
    for depth, members in depths.items():
        scores, rows = bundle.search(vectors[members], depth)
        for j, i in enumerate(members):
            out[i] = (scores[j].tolist(), rows[j].tolist())
    return out


def search(bundle: ServingBundle, vectors: np.ndarray, queries: Sequence[Query]) -> list[Result]:
    """Top k per query, seen items excluded: an index search over-fetching by the query's
    exclusions, then an exact search for any query the index could not fill."""
    n_items = bundle.n_items
    fetches = [min(n_items, q.k + len(q.exclude)) for q in queries]
    candidates = _candidates(bundle, vectors, fetches)
    ids = bundle.item_ids
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
            out = _exact_top(bundle, vectors[i], query, want)
        results.append(out)
    return results


def encode(
    bundle: ServingBundle, queries: Sequence[Query], cache: VectorCache | None = None
) -> np.ndarray:
    """User vectors float32 `(B, dim)`: the cached ones, and one tower call for the rest."""
    if cache is None:
        return _encode(bundle, queries)
    vectors = np.empty((len(queries), bundle.dim), dtype=np.float32)
    keys = [cache.key(bundle.version, q.features, q.history) for q in queries]
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
        fresh = _encode(bundle, [queries[i] for i in missing])
        vectors[missing] = fresh
        for i, vector in zip(missing, fresh, strict=True):
            user_id, key = queries[i].user_id, keys[i]
            if user_id is not None and key is not None:
                cache.put(user_id, key, vector.copy())
    return vectors


def _encode(bundle: ServingBundle, queries: Sequence[Query]) -> np.ndarray:
    features = [q.features for q in queries]
    return bundle.encode(features, history_rows=[q.history_rows for q in queries])


def retrieve(
    bundle: ServingBundle,
    queries: Sequence[Query],
    observe: StageObserver | None = None,
    cache: VectorCache | None = None,
) -> list[Result]:
    """Encode + search a batch of queries on one bundle; `observe(stage, seconds)` gets the
    `encode` and `search` timings."""
    start = time.perf_counter()
    vectors = encode(bundle, queries, cache)
    encoded = time.perf_counter()
    results = search(bundle, vectors, queries)
    if observe is not None:
        observe("encode", encoded - start)
        observe("search", time.perf_counter() - encoded)
    return results
