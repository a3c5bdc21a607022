"""The CPU-bound step of recall: encode a batch of users, search, exclude seen items.

`retrieve` takes a whole batch of prepared queries so one tower call and one index search
serve all of them (`/v1/recall/batch` today, cross-request micro-batching later).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from app.bundle_loader import ServingBundle

StageObserver = Callable[[str, float], None]


@dataclass(frozen=True, slots=True)
class Query:
    """One user's prepared recall.

    Attributes:
        features: raw features after merging (request over stored); missing = default.
        history: item ids, newest first (the encoder keeps the known ones, up to its length).
        exclude: catalogue rows never to return (the seen items).
        k: results wanted.
    """

    features: Mapping[str, Any]
    history: Sequence[str]
    exclude: frozenset[int]
    k: int


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


def search(bundle: ServingBundle, vectors: np.ndarray, queries: Sequence[Query]) -> list[Result]:
    """Top k per query, seen items excluded: one index search over-fetching by the largest
    exclusion, then an exact search for any row the index could not fill."""
    n_items = bundle.n_items
    fetch = min(n_items, max(q.k + len(q.exclude) for q in queries))
    scores, rows = bundle.search(vectors, fetch)
    results: list[Result] = []
    for i, query in enumerate(queries):
        want = min(query.k, n_items - len(query.exclude))
        out: Result = []
        if want <= 0:
            results.append(out)
            continue
        for row, score in zip(rows[i].tolist(), scores[i].tolist(), strict=True):
            if row >= 0 and row not in query.exclude:
                out.append((bundle.item_ids[row], score))
                if len(out) == want:
                    break
        if len(out) < want:
            out = _exact_top(bundle, vectors[i], query, want)
        results.append(out)
    return results


def retrieve(
    bundle: ServingBundle, queries: Sequence[Query], observe: StageObserver | None = None
) -> list[Result]:
    """Encode + search a batch of queries on one bundle; `observe(stage, seconds)` gets the
    `encode` and `search` timings."""
    start = time.perf_counter()
    vectors = bundle.encode([q.features for q in queries], [q.history for q in queries])
    encoded = time.perf_counter()
    results = search(bundle, vectors, queries)
    if observe is not None:
        observe("encode", encoded - start)
        observe("search", time.perf_counter() - encoded)
    return results
