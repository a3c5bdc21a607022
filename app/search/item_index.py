"""`ItemIndex`: inner-product top-k over the catalogue's item vectors, whichever search runs it.

Two implementations: `FlatIndex` (exact; may prune by clusters) and `FaissIndex` (HNSW or
IVF). `app.search.build_item_index` alone decides which one serves a bundle; what differs
between them at query time (whether depths nest, whether a search is cheap enough for the
event loop) each states for itself here, so no caller asks which kind it holds.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
import torch

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
    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top `k` (at most `n_items`) of each row of `vectors` float32 `(B, dim)`: (scores
        float32 `(B, k)`, rows int64 `(B, k)`), best first; an ANN index may return row -1
        (no result)."""

    @abstractmethod
    def runs_inline(self, batch: int) -> bool:
        """Whether searching a batch of `batch` queries costs less on the event loop than a
        hop to the recall thread and back (RECALL_THREAD)."""

    def search_depths(self, vectors: np.ndarray, depths: Sequence[int]) -> list[Candidates]:
        """Each row's top `depths[i]`. Where depths nest, one search at the deepest serves
        all; otherwise each depth gets its own search, so that a query's answer never depends
        on the batch it came in."""
        if self.nested_depths:
            groups = {max(depths): list(range(len(depths)))}
        else:
            groups = {}
            for i, depth in enumerate(depths):
                groups.setdefault(depth, []).append(i)
        out: list[Candidates] = [([], [])] * len(depths)
        for depth, members in groups.items():
            scores, rows = self.search(vectors[members], depth)
            for j, i in enumerate(members):
                out[i] = (scores[j].tolist(), rows[j].tolist())
        return out

    def exact_top(
        self, vector: np.ndarray, k: int, exclude: frozenset[int] = frozenset()
    ) -> Candidates:
        """Brute-force top `k` of `vector` `(dim,)` over the whole catalogue, rows in
        `exclude` left out: what fills a query an approximate index answered too few for."""
        with torch.inference_mode():
            scores = self.matrix @ torch.from_numpy(vector)
            if exclude:
                scores[torch.tensor(sorted(exclude), dtype=torch.int64)] = -torch.inf
            top = torch.topk(scores, k, sorted=True)
        return top.values.tolist(), top.indices.tolist()


def shared_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor over `array`'s memory. Read-only (memory-mapped) arrays are fine: nothing
    writes to the matrix, which torch cannot know, hence its warning is silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        return torch.from_numpy(array)
