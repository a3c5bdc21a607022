"""`ItemIndex`: inner-product top-k over the catalogue's item vectors, whichever search runs it.

Two implementations: `FlatIndex` (exact; may prune by clusters) and `FaissIndex` (HNSW or
IVF). `app.search.build_item_index` alone decides which one serves a bundle; what differs
between them at query time (whether depths nest, whether a search is cheap enough for the
event loop) each states for itself here, so no caller asks which kind it holds. Every search
may be restricted to the rows a recall filter allows (`AllowedRows`): how each index honours
that at each selectivity it decides itself, and `exact_allowed` is the exact scan of an
allowed subset they fall back on.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import faiss
import numpy as np
import torch

from app.search.allowed import AllowedRows
from app.search.topk import top_candidates
from app.settings import IndexType

# (scores, rows) of one query, best first; an ANN row may be -1: no result.
Candidates = tuple[list[float], list[int]]


class ItemIndex(ABC):
    """Top-k by inner product over the items' vectors; row i is item i.

    Attributes:
        kind: flat | hnsw | ivf (INDEX_TYPE).
        matrix: the item vectors, float32 `(n_items, dim)`, never written: what `exact_top`
            reads.
        nested_depths: whether a search's top d is the first d of its top d' > d (exact
            search and IVF), so that one search at the deepest serves queries that want
            different depths.
    """

    kind: IndexType
    matrix: torch.Tensor
    nested_depths: bool = True

    @property
    def n_items(self) -> int:
        return int(self.matrix.shape[0])

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[1])

    @abstractmethod
    def search(
        self, vectors: np.ndarray, k: int, allowed: AllowedRows | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top `k` (at most `n_items`) of each row of `vectors` float32 `(B, dim)`: (scores
        float32 `(B, k)`, rows int64 `(B, k)`), best first; only rows of `allowed` when
        given. Row -1 (score -inf or FAISS's lowest) is no result: past the allowed count, or
        where an ANN index found too few."""

    def filter_index_count(self) -> int:
        """Filters with an index of their own rows (`app.search.filter_index`): none here."""
        return 0

    def watch_filter_indexes(self, callback: Callable[[int], None]) -> None:
        """Have `callback` told `filter_index_count()` whenever it changes: never here."""
        return None

    def has_filter_index(self, allowed: AllowedRows) -> bool:
        """Whether the filter of these rows has an index of its own rows: never here."""
        return False

    def build_filter_index(self, allowed: AllowedRows) -> None:
        """Give the filter of these rows an index of its own rows now, where this index would
        once the filter is searched often (a model warmed before it serves): none here."""
        return None

    @abstractmethod
    def runs_inline(self, batch: int) -> bool:
        """Whether searching a batch of `batch` queries costs less on the event loop than a
        hop to the recall thread and back (RECALL_THREAD)."""

    def search_depths(
        self, vectors: np.ndarray, depths: Sequence[int], allowed: AllowedRows | None = None
    ) -> list[Candidates]:
        """Each row's top `depths[i]` (among `allowed` rows when given). Where depths nest,
        one search at the deepest serves all; otherwise each depth gets its own search, so
        that a query's answer never depends on the batch it came in."""
        if self.nested_depths:
            groups = {max(depths): list(range(len(depths)))}
        else:
            groups = {}
            for i, depth in enumerate(depths):
                groups.setdefault(depth, []).append(i)
        out: list[Candidates] = [([], [])] * len(depths)
        for depth, members in groups.items():
            scores, rows = self.search(vectors[members], depth, allowed)
            for j, i in enumerate(members):
                out[i] = (scores[j].tolist(), rows[j].tolist())
        return out

    def exact_top(
        self,
        vector: np.ndarray,
        k: int,
        exclude: frozenset[int] = frozenset(),
        allowed: AllowedRows | None = None,
    ) -> Candidates:
        """Brute-force top `k` of `vector` `(dim,)` over the whole catalogue (or the rows of
        `allowed`), rows in `exclude` left out: what fills a query an approximate index
        answered too few for. Fewer than `k` only when fewer rows qualify."""
        if allowed is not None:
            # Deeper by the excluded rows it allows, then drop them: the filter's own bitmap
            # and kept rows serve the scan (a mask without them would be built per query).
            deeper = k + allowed.allowed_among(exclude)
            best, rows = exact_allowed(self.matrix, vector[None], deeper, allowed)
            kept = [
                (score, row)
                for score, row in zip(best[0].tolist(), rows[0].tolist(), strict=True)
                if row >= 0 and row not in exclude
            ][:k]
            return [s for s, _ in kept], [r for _, r in kept]
        with torch.inference_mode():
            scores = self.matrix @ torch.from_numpy(vector)
            if exclude:
                scores[torch.tensor(sorted(exclude), dtype=torch.int64)] = -torch.inf
            top = torch.topk(scores, k, sorted=True)
        return top.values.tolist(), top.indices.tolist()


# An exact scan of an allowed subset gathers the allowed rows' vectors (a copy) when they are
# at most this share of the catalogue. Above it, a lone query (the fill of a short ANN answer
# is one) goes through FAISS's flat scan with the filter's `IDSelectorBitmap`, which scores
# only the allowed rows, in place; a batch scores every item in one product and masks the
# rest out. 1M x 64 random unit rows, one thread, ms per query (2-core box, busy): gather
# 0.1 % 0.27, 1 % 2.3, 10 % 18.7, 20 % 51; selector / masked product, batch 1: 10 % 12 / 27
# (rows together: 6.7), 50 % 22 / 32; batch 4: 10 % 14 / 13; batch 16: 10 % 14 / 7.4.
GATHER_MAX_SHARE = 0.05


def exact_allowed(
    matrix: torch.Tensor, vectors: np.ndarray, k: int, allowed: AllowedRows
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top `k` of each row of `vectors` `(B, dim)` over the rows of `matrix` `(n, dim)`
    that `allowed` allows: (scores float32 `(B, k)`, rows int64 `(B, k)`), best first, padded
    with (-inf, -1) past the allowed count."""
    queries = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
    take = min(k, allowed.count)
    if take == 0:
        return padded(np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0)), k)
    gather = allowed.kept or allowed.share <= GATHER_MAX_SHARE
    if not gather and len(queries) == 1:
        return selector_scan(matrix, queries.numpy(), k, allowed)
    with torch.inference_mode():
        if gather:
            rows = torch.from_numpy(allowed.rows)
            values, columns = top_candidates(queries @ allowed.gathered(matrix).T, take)
            found = rows[columns]
        else:
            scores = queries @ matrix.T
            scores.masked_fill_(torch.from_numpy(~allowed.mask), -torch.inf)
            values, found = top_candidates(scores, take)
        values, order = values.sort(dim=1, descending=True)
        return padded(values.numpy(), found.gather(1, order).numpy(), k)


def selector_scan(
    matrix: torch.Tensor, queries: np.ndarray, k: int, allowed: AllowedRows
) -> tuple[np.ndarray, np.ndarray]:
    """`exact_allowed` by FAISS's brute-force inner product over `matrix`'s memory (no copy),
    skipping the rows `allowed`'s bitmap leaves out before scoring them."""
    items = matrix.numpy()
    n, dim = items.shape
    scores = np.empty((len(queries), k), dtype=np.float32)
    rows = np.empty((len(queries), k), dtype=np.int64)
    ptr = faiss.swig_ptr
    faiss.knn_inner_product(
        ptr(queries), ptr(items), dim, len(queries), n, k, ptr(scores), ptr(rows),
        allowed.selector(),
    )  # fmt: skip
    scores[rows < 0] = -np.inf  # FAISS's empty slots score its lowest float
    return scores, rows


def padded(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """`(B, c)` results widened to `(B, k)` with (-inf, -1): no result."""
    out_scores = np.full((len(scores), k), -np.inf, dtype=np.float32)
    out_rows = np.full((len(rows), k), -1, dtype=np.int64)
    out_scores[:, : scores.shape[1]] = scores
    out_rows[:, : rows.shape[1]] = rows
    return out_scores, out_rows


def shared_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor over `array`'s memory. Read-only (memory-mapped) arrays are fine: nothing
    writes to the matrix, which torch cannot know, hence its warning is silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        return torch.from_numpy(array)
