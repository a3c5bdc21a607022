"""`FilterIndexes`: a hot filter's own index, over its rows alone, searched exactly.

FAISS's filtered HNSW search keeps about `efSearch x share` allowed candidates, so it is
widened to `efSearch / share` to keep its depth: a filter allowing 10 % of 1M items costs
~0.7 ms a query against 0.05 ms unfiltered, whether it is a price window or a category whose
items sit together in the graph. Recommender traffic repeats a few filters (a slot's
category, a region, in stock), so a filter searched `after` times gets an index of its own
rows: an IVF over them, under their catalogue rows, read by cluster bounds
(`ClusterPruning`: exact, no recall lost). It is built in a background thread, one at a time;
until it is ready, and for the few queries whose bounds prune nothing, the caller's own
filtered search serves.

An index lives as long as its filter's `AllowedRows` (the compiled filter, `FilterCache`) and
the model's index; a filter narrowed by deleted items (`AllowedRows.base`) is searched in
its base's index with the narrower selector. Their rows together are capped (`max_rows`).
"""

from __future__ import annotations

import logging
import math
import threading
import time
import weakref
from typing import Any

import faiss
import numpy as np

from app.search.allowed import AllowedRows
from app.search.cluster_pruning import ClusterPruning

log = logging.getLogger(__name__)

# Clusters per filter index: about 2 sqrt(rows), at most 1,024, each of ~39 rows or more (what
# k-means wants). 1M-item benchmark bundle, one query (an ad hoc script), p50 ms by clusters
# for 256 / 512 / 1,024 lists: a 10 % price window 0.32 / 0.24 / 0.36, a 10 % category 0.22 /
# 0.22 / 0.31, built in 0.45 / 1.1 / 2.3 s (one thread); FAISS's filtered HNSW search 0.86-1.12
# ms for either.
LISTS_PER_SQRT_ROWS = 2
MAX_LISTS = 1024
MIN_ROWS_PER_LIST = 39
# A build that failed is not tried again for this filter: this marks it.
_FAILED: Any = object()


class FilterIndexes:
    """Own indexes of the filters searched often, over the rows of `matrix`.

    Args:
        matrix: the catalogue's item vectors, float32 `(n_items, dim)`, never written.
        after: searches of one filter before its index is built (0: never built).
        max_rows: the most rows all live filter indexes may hold together.
    """

    def __init__(self, matrix: np.ndarray, *, after: int, max_rows: int) -> None:
        self.matrix = matrix
        self.after = after
        self.max_rows = max_rows
        self._uses: weakref.WeakKeyDictionary[AllowedRows, int] = weakref.WeakKeyDictionary()
        self._built: weakref.WeakKeyDictionary[AllowedRows, Any] = weakref.WeakKeyDictionary()
        self._building: threading.Thread | None = None
        self._lock = threading.Lock()

    def search(
        self, vectors: np.ndarray, k: int, allowed: AllowedRows
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """Exact top `k` of each row of `vectors` among `allowed` by the filter's own index:
        (scores, rows, done) as `ClusterPruning.search` answers, rows not `done` unsearched;
        None while the filter has no index (this search counts towards building one)."""
        base = allowed.base or allowed
        own = self._built.get(base)
        if own is None:
            self._count(base)
            return None
        if own is _FAILED:
            return None
        pruning: ClusterPruning = own
        return pruning.search(vectors, k, None if allowed is base else allowed)

    def __len__(self) -> int:
        """Filter indexes built and alive."""
        with self._lock:
            return sum(own is not _FAILED for own in self._built.values())

    def ready(self, allowed: AllowedRows) -> bool:
        """Whether `allowed` (or the filter it was cut from) has its index."""
        own = self._built.get(allowed.base or allowed)
        return own is not None and own is not _FAILED

    def wait(self, timeout: float | None = None) -> None:
        """Until the build under way (if any) ends."""
        building = self._building
        if building is not None:
            building.join(timeout)

    def _count(self, base: AllowedRows) -> None:
        if self.after <= 0:
            return
        with self._lock:
            uses = self._uses.get(base, 0) + 1
            self._uses[base] = uses
            if uses < self.after or self._building is not None:
                return
            held = sum(rows.count for rows, own in self._built.items() if own is not _FAILED)
            if held + base.count > self.max_rows:
                return  # counted again later: an evicted filter frees its rows
            thread = threading.Thread(
                target=self._build, args=(base,), name="filter-index", daemon=True
            )
            self._building = thread
        thread.start()

    def _build(self, base: AllowedRows) -> None:
        start = time.perf_counter()
        faiss.omp_set_num_threads(1)  # this thread's own count: serving keeps its cores
        try:
            own: Any = build_filter_index(self.matrix, base.rows)
        except RuntimeError as exc:  # FAISS reports its errors as RuntimeError
            log.warning("no index for a filter of %d rows: %s", base.count, exc)
            own = _FAILED
        else:
            log.info(
                "filter index: %d rows in %d clusters, built in %.2f s",
                base.count,
                own.nlist,
                time.perf_counter() - start,
            )
        with self._lock:
            self._built[base] = own
            self._uses.pop(base, None)
            self._building = None


def build_filter_index(matrix: np.ndarray, rows: np.ndarray) -> ClusterPruning:
    """Exact cluster search over `matrix[rows]` (`rows` ascending), answering catalogue rows."""
    vectors = np.ascontiguousarray(matrix[rows], dtype=np.float32)
    n, dim = vectors.shape
    nlist = max(
        1, min(round(LISTS_PER_SQRT_ROWS * math.sqrt(n)), MAX_LISTS, n // MIN_ROWS_PER_LIST)
    )
    quantizer = faiss.IndexFlatIP(dim)
    ivf = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    ivf.train(vectors)
    ivf.add_with_ids(vectors, rows.astype(np.int64))
    return ClusterPruning(ivf, vectors, rows)
