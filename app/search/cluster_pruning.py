"""Exact top-k that reads only the clusters of items that could hold it.

The items are partitioned by k-means (a FAISS IVF index: the same one `INDEX_TYPE=ivf` builds
and caches). For a query q and a cluster with centre c whose items all lie within R of c,
every item m of it scores q.m = q.c + q.(m - c) <= q.c + |q| R (Cauchy-Schwarz): a bound per
cluster. A first pass reads the few clusters with the highest bounds; the k-th best score t
it finds is at most the true k-th best, so every item of the true top k lies in a cluster
whose bound reaches t. The second pass reads exactly those clusters, and its top k is the
exact top k: no item outside them can score t or more. Nothing is approximate; what pruning
saves depends on how tightly the trained vectors cluster (the serving benchmark's 100k-item
bundle: ~7 % of the clusters for k = 180), and a query whose bound admits most clusters is
handed back for a full scan.

Under a filter the same holds for the allowed items (FAISS skips the others by an
`IDSelector`): the bounds still cover them, and the first pass reads more clusters, in
proportion to the share the filter allows, to find k of them.
"""

from __future__ import annotations

import threading
from typing import Any

import faiss
import numpy as np

from app.search.allowed import AllowedRows

# FAISS's stubs do not know the keyword constructors of its search parameters, which its
# Python wrapper adds.
_faiss: Any = faiss

# Bounds are inflated by this share of |q| (|c| + R) to cover float32 rounding in the bounds
# and in the scores compared with them (each within ~d * 2^-24 relative).
ROUNDING_MARGIN = 1e-5
# The first pass reads clusters until they hold this many times k items.
FIRST_PASS_ITEMS_PER_K = 4
# A query whose bounds admit more than this share of the clusters is scanned in full instead.
MAX_PROBED_SHARE = 0.5
# ... except under a filter: FAISS skips the rows it leaves out before computing their scores,
# so reading even every cluster costs little more than a bitmap test per row, less than the
# full float32 scan (1M items, a 10 % filter over HTTP: 250 requests/s when such queries were
# handed to the full scan, against 1615 unfiltered).
MAX_PROBED_SHARE_FILTERED = 1.0


class ClusterPruning:
    """Exact top-k over the items of `ivf` (an inner-product `IndexIVFFlat`), reading only the
    clusters that can hold it.

    Args:
        ivf: the trained, filled index.
        matrix: the same items, float32 `(n, dim)`, to measure each cluster's radius.
        rows: the ids the items were added under, ascending (None: item i = id i). A
            filter's own index holds only its rows, under their catalogue rows.
    """

    def __init__(
        self, ivf: faiss.Index, matrix: np.ndarray, rows: np.ndarray | None = None
    ) -> None:
        self.index = ivf  # owns the C++ index that the views below point into
        # Any: FAISS's stubs type the SWIG signatures, not the numpy wrappers used here.
        self.ivf: Any = faiss.extract_index_ivf(ivf)
        n, dim = matrix.shape
        self.size = n
        lists: Any = self.ivf.invlists
        self.nlist = int(self.ivf.nlist)
        quantizer: Any = faiss.downcast_index(self.ivf.quantizer)
        self.centroids = faiss.rev_swig_ptr(quantizer.get_xb(), self.nlist * dim).reshape(
            self.nlist, dim
        )
        self.sizes = np.array([lists.list_size(i) for i in range(self.nlist)])
        assign = np.empty(n, dtype=np.int64)
        for i in range(self.nlist):
            ids = faiss.rev_swig_ptr(lists.get_ids(i), int(self.sizes[i]))
            assign[ids if rows is None else np.searchsorted(rows, ids)] = i
        self.radii = np.zeros(self.nlist, dtype=np.float64)
        for start in range(0, n, 65_536):  # bounded temporary memory at 1M items
            part = slice(start, start + 65_536)
            distance = np.linalg.norm(matrix[part] - self.centroids[assign[part]], axis=1)
            np.maximum.at(self.radii, assign[part], distance)
        self.radii = self.radii.astype(np.float32)
        self.slack = ROUNDING_MARGIN * (np.linalg.norm(self.centroids, axis=1) + self.radii)
        self.probed = self.queries = 0  # clusters read and queries served, since load
        # Each pass sets the index's nprobe: one search at a time (with RECALL_THREAD, the
        # event loop and the recall thread could otherwise both search).
        self.lock = threading.Lock()

    def search(
        self, queries: np.ndarray, k: int, allowed: AllowedRows | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Top `k` of each row of `queries` float32 `(B, dim)` (among `allowed` rows when
        given): (scores `(B, k)`, rows `(B, k)`, best first, and `done` bool `(B,)`); rows
        where `done` is False were not searched (their bounds admitted too many clusters) and
        need a full scan."""
        with self.lock:
            return self._search(queries, k, allowed)

    def _search(
        self, queries: np.ndarray, k: int, allowed: AllowedRows | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        norms = np.linalg.norm(queries, axis=1, keepdims=True)
        bounds = queries @ self.centroids.T + norms * (self.radii + self.slack)
        order = np.argsort(-bounds, axis=1)
        # First pass: the best-bounded clusters until they hold FIRST_PASS_ITEMS_PER_K * k
        # items (clusters differ in size; this cluster count is per query).
        held = np.cumsum(self.sizes[order], axis=1)
        # The share of this index's items allowed (`allowed` never reaches outside them).
        share = 1.0 if allowed is None else min(1.0, max(allowed.count / self.size, 1e-9))
        first_items = FIRST_PASS_ITEMS_PER_K * k / share
        first = np.minimum((held < first_items).sum(axis=1) + 1, self.nlist)
        scores, rows = self._read(queries, k, _columns(order, 0, first), allowed)
        # The clusters to read are a prefix of `order`: those whose bound reaches the k-th
        # best score found so far (an empty slot, fewer than k items read, scores -inf:
        # every cluster then).
        needed = (bounds >= scores[:, -1:]).sum(axis=1)
        limit = MAX_PROBED_SHARE if allowed is None else MAX_PROBED_SHARE_FILTERED
        done = needed <= limit * self.nlist
        more = np.flatnonzero(done & (needed > first))
        if len(more):
            probes = _columns(order[more], first[more], needed[more])
            extra_scores, extra_rows = self._read(queries[more], k, probes, allowed)
            scores[more], rows[more] = _merge(
                (scores[more], extra_scores), (rows[more], extra_rows), k
            )
        self.probed += int(np.maximum(needed, first)[done].sum())
        self.queries += int(done.sum())
        return scores, rows, done

    def _read(
        self, queries: np.ndarray, k: int, probes: np.ndarray, allowed: AllowedRows | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top k over the clusters listed per query (-1: none), best first."""
        self.ivf.nprobe = probes.shape[1]
        if allowed is None:
            return self.ivf.search_preassigned(queries, k, probes, None)  # no coarse distances
        # FAISS's Python wrapper refuses search parameters here: the C++ call takes them (and
        # they replace the index's nprobe, not only add the selector).
        params = _faiss.SearchParametersIVF(sel=allowed.selector(), nprobe=probes.shape[1])
        n = len(queries)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        probes = np.ascontiguousarray(probes, dtype=np.int64)
        coarse = np.zeros(probes.shape, dtype=np.float32)
        scores = np.empty((n, k), dtype=np.float32)
        rows = np.empty((n, k), dtype=np.int64)
        ptr = faiss.swig_ptr
        self.ivf.search_preassigned_c(
            n, ptr(queries), k, ptr(probes), ptr(coarse), ptr(scores), ptr(rows), False, params
        )
        return scores, rows


def _columns(order: np.ndarray, start: np.ndarray | int, stop: np.ndarray) -> np.ndarray:
    """Columns [start, stop) of each row of `order`, left-aligned and padded with -1 (a
    cluster FAISS skips) to the widest row."""
    start = np.broadcast_to(start, stop.shape)
    width = int((stop - start).max())
    columns = start[:, None] + np.arange(width)
    picked = np.take_along_axis(order, np.minimum(columns, order.shape[1] - 1), axis=1)
    picked[columns >= stop[:, None]] = -1
    return picked


def _merge(
    scores: tuple[np.ndarray, np.ndarray], rows: tuple[np.ndarray, np.ndarray], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The best k of two disjoint top-k lists per row, best first."""
    all_scores, all_rows = np.concatenate(scores, axis=1), np.concatenate(rows, axis=1)
    best = np.argsort(-all_scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(all_scores, best, 1), np.take_along_axis(all_rows, best, 1)
