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

Indexes are kept by the digest of their rows, so a filter evicted from the worker's filter
cache and compiled again finds its index; a filter narrowed by deleted items
(`AllowedRows.base`) is searched in its base's index with the narrower selector. Their rows
together are capped (`max_rows`; the least recently searched go first), and after each build
the builder pauses `pause` times the build's time, so that filters that keep displacing each
other cost at most a share of one core. A model about to replace the serving one gets the
serving one's hot filters built at once (`build`, from `app.filters.FilterWarmup`).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
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
MIN_ROWS_PER_LIST = 39  # k-means wants ~39 training points per list (also the IVF index's)
# A build that failed is not tried again for these rows: this marks it.
_FAILED: Any = object()
# Filters counted towards a build, at most (the least recently searched forgotten first).
MAX_COUNTED = 1024
# After a build of t seconds the next waits PAUSE * t: builds take at most ~1 / (1 + PAUSE)
# of one core however often filters displace each other.
PAUSE = 4.0


class FilterIndexes:
    """Own indexes of the filters searched often, over the rows of `matrix`.

    Args:
        matrix: the catalogue's item vectors, float32 `(n_items, dim)`, never written.
        after: searches of one filter before its index is built (0: never built).
        max_rows: the most rows all filter indexes may hold together.
    """

    def __init__(self, matrix: np.ndarray, *, after: int, max_rows: int) -> None:
        self.matrix = matrix
        self.after = after
        self.max_rows = max_rows
        self.pause = PAUSE
        self._indexes: OrderedDict[bytes, Any] = OrderedDict()  # digest -> index, LRU first
        self._rows: dict[bytes, int] = {}  # digest -> rows its index holds
        self._uses: OrderedDict[bytes, int] = OrderedDict()
        self._building: threading.Thread | None = None
        self._idle_until = 0.0  # time.monotonic() before which no build starts
        self._lock = threading.Lock()
        # Told the number of indexes after each build (the serving model's: a metric).
        self.on_change: Callable[[int], None] = lambda count: None

    def search(
        self, vectors: np.ndarray, k: int, allowed: AllowedRows
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """Exact top `k` of each row of `vectors` among `allowed` by the filter's own index:
        (scores, rows, done) as `ClusterPruning.search` answers, rows not `done` unsearched;
        None while the filter has no index (this search counts towards building one)."""
        base = allowed.base or allowed
        key = base.digest
        with self._lock:
            own = self._indexes.get(key)
            if own is None:
                self._count(key, base)
                return None
            self._indexes.move_to_end(key)
        if own is _FAILED:
            return None
        pruning: ClusterPruning = own
        return pruning.search(vectors, k, None if allowed is base else allowed)

    def __len__(self) -> int:
        """Filter indexes built."""
        with self._lock:
            return sum(own is not _FAILED for own in self._indexes.values())

    def ready(self, allowed: AllowedRows) -> bool:
        """Whether `allowed` (or the filter it was cut from) has its index."""
        with self._lock:
            own = self._indexes.get((allowed.base or allowed).digest)
        return own is not None and own is not _FAILED

    def wait(self, timeout: float | None = None) -> None:
        """Until the build under way (if any) ends."""
        building = self._building
        if building is not None:
            building.join(timeout)

    def _count(self, key: bytes, base: AllowedRows) -> None:
        """One more search of `base`'s rows; a build starts at the `after`-th (under the lock)."""
        if self.after <= 0 or base.count > self.max_rows:
            return
        uses = self._uses.pop(key, 0) + 1
        self._uses[key] = uses
        if len(self._uses) > MAX_COUNTED:
            self._uses.popitem(last=False)
        if uses < self.after or self._building is not None:
            return
        if time.monotonic() < self._idle_until:
            return  # counted again after the pause
        thread = threading.Thread(
            target=self._build, args=(key, base), name="filter-index", daemon=True
        )
        self._building = thread
        thread.start()

    def build(self, allowed: AllowedRows) -> None:
        """Build the index of `allowed`'s rows now, in the calling thread (for a model before
        it serves), unless it has one or its rows would pass the cap alone."""
        base = allowed.base or allowed
        with self._lock:
            if base.digest in self._indexes or base.count > self.max_rows:
                return
        self._make(base.digest, base)

    def _build(self, key: bytes, base: AllowedRows) -> None:
        try:
            self._make(key, base)
        finally:
            with self._lock:
                self._building = None

    def _make(self, key: bytes, base: AllowedRows) -> None:
        start = time.perf_counter()
        threads = faiss.omp_get_max_threads()
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
        finally:
            faiss.omp_set_num_threads(threads)
        took = time.perf_counter() - start
        with self._lock:
            rows = 0 if own is _FAILED else base.count
            while self._indexes and sum(self._rows.values()) + rows > self.max_rows:
                evicted, _ = self._indexes.popitem(last=False)
                del self._rows[evicted]
            self._indexes[key] = own
            self._rows[key] = rows
            self._uses.pop(key, None)
            self._idle_until = time.monotonic() + self.pause * took
        self.on_change(len(self))


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
