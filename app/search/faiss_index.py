"""`FaissIndex`: approximate top-k by a FAISS index (INDEX_TYPE=hnsw or ivf).

HNSW keeps its own copy of the vectors: the brute-force `exact_top` reads that copy, so the
matrix is held once (the bundle's memory map is let go). IVF keeps its vectors in inverted
lists, so `exact_top` reads the memory-mapped embeddings (pages shared by every worker).

A filtered search (`AllowedRows`) uses FAISS's own id selection when the filter allows a large
share of the catalogue, and scans the allowed rows exactly when it is selective. FAISS's HNSW
stops once efSearch visited candidates, allowed or not, beat the next one, so a filter that
allows a share s keeps about s * efSearch allowed candidates: efSearch is widened to
efSearch / s to keep the unfiltered search's depth (and recall); IVF's nprobe likewise. That
costs ~1 / s times an unfiltered search, so a filter of 2-20 % searched often gets an index of
its own rows (`app.search.filter_index`), exact and several times cheaper.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import faiss
import numpy as np

from app.config import IndexConfig
from app.search.allowed import AllowedRows
from app.search.filter_index import MIN_ROWS_PER_LIST, FilterIndexes
from app.search.item_index import ItemIndex, exact_allowed, shared_tensor
from app.settings import IndexType

# FAISS's stubs know neither SearchParametersHNSW nor the keyword constructors of its search
# parameters, which its Python wrapper adds.
_faiss: Any = faiss

# A filter allowing less than this share of the catalogue (or few enough rows for their vectors
# to be kept, `AllowedRows.kept`) is served by an exact scan of its rows instead of the index
# with a selector (efSearch widened to efSearch / share). 1M-item HNSW (M 32, efSearch 128),
# one query, p50 ms selector / exact scan gathering its rows each time: 50 % 0.09 / 19.5,
# 10 % 0.75 / 16.6, 3 % 5.6 / 9.7, 1 % 17.7 / 3.8, 0.1 % 17.8 / 0.14
# (benchmarks/filtered_search.py, `hnsw_paths`).
ANN_MIN_SHARE = 0.02
# The widened efSearch never goes past this (a cap reached only near ANN_MIN_SHARE).
MAX_FILTERED_EF = 8192
# A filter allowing at most this share of the catalogue (and not selective enough for the
# exact scan) gets an index of its own rows once searched often (`app.search.filter_index`).
# 1M-item HNSW, one query, p50 ms selector / own index (benchmarks/filtered_search.py,
# `hnsw_paths`): 10 % 0.71-0.79 / 0.16-0.33, 15 % 0.35 / 0.17, 20 % 0.25 / 0.17, 30 % 0.17 /
# 0.19, 50 % 0.12 / 0.25-0.42. Its build grows with its rows (one thread: 100k 1.5 s, 300k 6 s).
OWN_INDEX_MAX_SHARE = 0.2
# A query the filtered search answers short is searched again this many times deeper, then
# (if still short) deeper again, before the caller's exact fill. Short answers are nearly full
# (35-49 of 50): a filter whose items sit together in the graph (1M HNSW, the benchmark's 10 %
# category) left 33 of 1,000 queries short; 1.5x deeper filled all but 4 in 1.7 ms, where 4x
# deeper took 20 ms (busy 2-core box), and 4x the rest.
RETRY_DEPTHS = (1.5, 4.0)


def build_faiss_index(embeddings: np.ndarray, config: IndexConfig) -> faiss.Index:
    """A FAISS inner-product index of `config.kind` over `embeddings` float32
    `(n_items, dim)`; row i = id i. Search-time parameters are set (`set_search_params`)."""
    n, dim = embeddings.shape
    index: faiss.Index
    if config.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = config.hnsw_ef_construction
    elif config.kind == "ivf":
        nlist = max(1, min(config.ivf_nlist, n // MIN_ROWS_PER_LIST))
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(embeddings)
    else:  # flat search is `app.search.flat`'s
        raise ValueError(f"no FAISS index for {config.kind!r}")
    index.add(embeddings)
    set_search_params(index, config)
    return index


def set_search_params(index: faiss.Index, config: IndexConfig) -> None:
    """efSearch (HNSW) or nprobe (IVF): search-time settings, applied to a cached index too."""
    if isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = config.hnsw_ef_search
    elif isinstance(index, faiss.IndexIVF):
        index.nprobe = min(config.ivf_nprobe, index.nlist)


class FaissIndex(ItemIndex):
    """Args:
    index: the built (or cached) FAISS index over the items.
    embeddings: the same items, float32 `(n_items, dim)`, for `exact_top` unless `index`
        holds its own flat copy of them (HNSW).
    kind: hnsw | ivf.
    filter_index_after, filter_index_rows: when a filter gets an index of its own rows (0, the
        default here: never), and how many rows (a share of the catalogue's) they may hold
        together (`app.search.filter_index`).
    """

    def __init__(
        self,
        index: faiss.Index,
        embeddings: np.ndarray,
        kind: IndexType,
        *,
        filter_index_after: int = 0,
        filter_index_rows: float = IndexConfig.filter_index_rows,
    ) -> None:
        self.faiss = index
        self.kind = kind
        # Some FAISS versions widen an HNSW search to max(efSearch, depth): the top d of a
        # deeper search may differ from a search for d.
        self.nested_depths = kind != "hnsw"
        if isinstance(index, faiss.IndexHNSWFlat):
            storage: Any = faiss.downcast_index(index.storage)
            embeddings = faiss.rev_swig_ptr(storage.get_xb(), embeddings.size).reshape(
                embeddings.shape
            )
            embeddings.setflags(write=False)
        self.matrix = shared_tensor(embeddings)
        self.filter_indexes = FilterIndexes(
            embeddings, after=filter_index_after, max_rows=int(filter_index_rows * len(embeddings))
        )

    def filter_index_count(self) -> int:
        return len(self.filter_indexes)

    def watch_filter_indexes(self, callback: Callable[[int], None]) -> None:
        self.filter_indexes.on_change = callback

    def has_filter_index(self, allowed: AllowedRows) -> bool:
        return self.filter_indexes.ready(allowed)

    def build_filter_index(self, allowed: AllowedRows) -> None:
        if self._owns(allowed):
            self.filter_indexes.build(allowed)

    def runs_inline(self, batch: int) -> bool:
        # ~0.2 ms a query: on the event loop, the hop to the recall thread costs more (1M
        # HNSW, 2 workers: 1574 -> 1862 requests/s, 1.16 -> 0.99 CPU ms a request).
        return True

    def search(
        self, vectors: np.ndarray, k: int, allowed: AllowedRows | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        if allowed is None:
            scores, rows = self.faiss.search(vectors, k)
        elif allowed.kept or allowed.share < ANN_MIN_SHARE:
            scores, rows = exact_allowed(self.matrix, vectors, k, allowed)
        else:
            found = None
            if self._owns(allowed):
                found = self.filter_indexes.search(vectors, k, allowed)
            if found is None:
                return self._selector_search(vectors, k, allowed)
            scores, rows, done = found
            todo = np.flatnonzero(~done)
            if len(todo):
                scores[todo], rows[todo] = self._selector_search(vectors[todo], k, allowed)
        return scores, rows

    @staticmethod
    def _owns(allowed: AllowedRows) -> bool:
        """Whether a filter of these rows gets an index of its own rows when searched often:
        neither kept for the exact scan nor wide enough for the selector to be cheap."""
        base = allowed.base or allowed
        return not base.kept and ANN_MIN_SHARE <= base.share <= OWN_INDEX_MAX_SHARE

    def _selector_search(
        self, vectors: np.ndarray, k: int, allowed: AllowedRows
    ) -> tuple[np.ndarray, np.ndarray]:
        scores, rows = self.faiss.search(vectors, k, params=self._filtered(k, allowed))
        # Allowed items far from where the search went: deeper, before the caller's exact
        # scan of every allowed row (~8-13 ms at 1M items for a 10 % filter).
        for depth in RETRY_DEPTHS if allowed.count >= k else ():
            short = np.flatnonzero(rows[:, -1] < 0)
            if not len(short):
                break
            deeper = self._filtered(k, allowed, depth)
            scores[short], rows[short] = self.faiss.search(vectors[short], k, params=deeper)
        return scores, rows

    def _filtered(self, k: int, allowed: AllowedRows, depth: float = 1.0) -> Any:
        """Search parameters restricting the search to `allowed`, as deep in allowed items
        as the unfiltered search is in all of them (times `depth`)."""
        widen = depth / max(allowed.share, 1e-9)
        index: Any = self.faiss
        if isinstance(index, faiss.IndexHNSW):
            ef = min(MAX_FILTERED_EF, math.ceil(max(index.hnsw.efSearch, k) * widen))
            return _faiss.SearchParametersHNSW(sel=allowed.selector(), efSearch=ef)
        ivf: Any = faiss.extract_index_ivf(index)
        nprobe = min(ivf.nlist, math.ceil(ivf.nprobe * widen))
        return _faiss.SearchParametersIVF(sel=allowed.selector(), nprobe=nprobe)
