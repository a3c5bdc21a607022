"""`FlatIndex`: exact inner-product top-k over the item matrix (INDEX_TYPE=flat).

The float32 scan is one matrix product over a column-major copy of the matrix (dim x items,
contiguous): the product then streams whole rows of items, where the row-major matrix makes
it take one short dot product per item. Which BLAS computes that product fastest depends on
the CPU and the number of queries (on an AVX2 EPYC, numpy's OpenBLAS beat torch's MKL ~1.4x
for 4-16 queries and lost ~1.6x at 2), so both are timed at load, per batch size.

A batch can instead read a bfloat16 copy of the matrix — half the bytes, native dot products
on CPUs that have them — to *screen* candidates, then score those exactly in float32. The
answer stays exact: the bfloat16 score of any item is within a known bound of its true score,
so once the k-th best exact score beats the best that any item left out could truly reach, no
item left out can belong to the top k; a query where that does not hold is rescanned in
float32.

From 20,000 items a query reads only the k-means clusters that can hold its top k
(`app.search.cluster_pruning`), and is scanned in full only when they are too many.

A filtered query (`AllowedRows`) stays exact at every selectivity: a selective filter scans
its rows only (`exact_allowed`), a broad one reads the clusters with the filter in FAISS.
"""

from __future__ import annotations

import logging
from functools import partial

import numpy as np
import torch

from app.search.allowed import AllowedRows
from app.search.cluster_pruning import ClusterPruning
from app.search.item_index import GATHER_MAX_SHARE, ItemIndex, exact_allowed, padded
from app.search.topk import best_ms, top_candidates
from app.settings import BlasMode, IndexType, ScreenMode

log = logging.getLogger(__name__)

# Fewer queries than this are scanned in float32 even where the screen pays for batches. The
# cut-off dates from when FAISS scanned 1-3 queries (a bfloat16 screen measured no cheaper than
# it); the screen has not been measured against the column-major scan for so few queries.
SCREEN_MIN_BATCH = 4

# |bf16 score - true score| <= SCREEN_ERROR * |q| * |m| + d * SCREEN_FLOOR. Relative part
# (unit roundoff u = 2^-8; the bfloat16 product accumulates in float32 and is rounded once):
# rounding q and m costs at most (2u + u^2)|q||m| by Cauchy-Schwarz, rounding the result
# u|score| more, float32 accumulation d * 2^-24 relative (< 0.25 u below d = 4000): 3.25 u
# covers the sum (rounding errors lined up on purpose reach 2.8-2.95 u; tested). Absolute
# part: products under float32's normal range (2^-126) are flushed to zero.
SCREEN_ERROR = 3.25 * 2.0**-8
SCREEN_FLOOR = 2.0**-120

# A catalogue smaller than this is scanned (a copy would save nothing), as is a top k that
# would screen nearly every item.
MIN_SCREENED_ITEMS = 128

# A screen that must rescan this share of queries (after enough of them) costs more than it
# saves, e.g. with a heavy popularity prior folded in, which packs the scores closer together.
# The same for pruning by clusters whose bounds send queries to a full scan.
MAX_RESCAN_SHARE = 0.2
RESCAN_SAMPLE = 512

# Pruning reads at least ~4k items per query: a top k of more than a tenth of the catalogue
# is scanned.
PRUNE_MAX_K_SHARE = 10

# A filter allowing at most this share (or rows few enough to keep, `AllowedRows.kept`) is
# served by a scan of its rows; above it the clusters are read with the filter applied (a
# query they fail scans the rows: gathered up to GATHER_MAX_SHARE, else all, masked). 1M
# items, one query, p50 ms clusters / the rows scanned each time (FAISS's selector scan at 50
# and 10 %, gathered below): 50 % 0.29 / 15.5, 10 % 0.35 / 12.8, 3 % 1.3 / 11.0, 1 % (a price
# window far from most users: the clusters fail) 2.6 / 1.4, 0.1 % 0.82 / 0.14
# (benchmarks/filtered_search.py, the flat index's `pruned` and `scanned` paths).
PRUNE_MIN_SHARE = 0.015

# A lone query scanning up to this many items is searched on the event loop (`runs_inline`).
INLINE_ITEMS = 50_000
# Scores held at once by a scan: float32 `(B, n_items)` plus the screen's bfloat16 copy, 6
# bytes a score. A batch whose queries need more is scanned in slices of queries: 256 queries
# over 1M items held ~1.5 GB more per worker at once (a slice of 44 reads the matrix once
# more each, which costs less than the memory).
SCAN_BYTES = 256 << 20


class Fallbacks:
    """Queries a shortcut served (the bfloat16 screen, pruning by clusters) and how many of
    them it had to hand to the full float32 scan, since load."""

    def __init__(self) -> None:
        self.queries = self.scanned = 0

    def add(self, queries: int, scanned: int) -> bool:
        """Count a batch; True once the shortcut no longer pays: past RESCAN_SAMPLE queries,
        more than MAX_RESCAN_SHARE of them needed the full scan anyway."""
        self.queries += queries
        self.scanned += scanned
        return self.queries >= RESCAN_SAMPLE and self.scanned > MAX_RESCAN_SHARE * self.queries


def screen_depth(k: int) -> int:
    """Candidates screened for a top k: enough margin for the bound to be met (benchmark
    bundle, 100k items, 512 users, k = 180: none rescanned; with k + 64, 6 were)."""
    return k + k // 2 + 64


# Batch sizes at which both BLAS libraries are timed at load; a batch takes the faster at the
# largest of these not above its size. The timing scans at most TIMED_ITEMS items (enough to
# be past the caches): over all of 1M items it would add ~2.4 s to every start-up.
TIMED_BATCHES = (1, 2, 3, 4, 8, 16)
TIMED_ITEMS = 100_000


class FlatIndex(ItemIndex):
    """Exact top-k over `matrix` float32 `(n_items, dim)` (not copied; never written).

    Args:
        matrix: the item vectors.
        screen: `on` keeps a bfloat16 copy (half the matrix's size) to screen batches with,
            `off` scans float32 only, `auto` screens when that measures faster here.
        blas: the library computing the float32 product, `torch` or `numpy`, or `auto`: the
            faster at each batch size, timed here.
        pruning: clusters of the same items; when given, each query reads only those that
            can hold its top k, and is scanned only when they are too many.
    """

    kind: IndexType = "flat"

    def __init__(
        self,
        matrix: torch.Tensor,
        screen: ScreenMode = "auto",
        blas: BlasMode = "auto",
        pruning: ClusterPruning | None = None,
    ) -> None:
        self.matrix = matrix
        self.pruning = pruning
        self.prune_fallbacks = Fallbacks()
        # A column-major copy (the matrix's size again, private to the process): the scan's
        # product runs faster over it than over `matrix`.
        self.columns = matrix.T.contiguous()  # (dim, n_items)
        self.numpy_columns = self.columns.numpy()  # the same memory
        # The library for a batch of each size in TIMED_BATCHES.
        self.blas: dict[int, str] = (
            self._time_blas() if blas == "auto" else dict.fromkeys(TIMED_BATCHES, blas)
        )
        self.screen: torch.Tensor | None = None
        self.slack = 0.0  # SCREEN_ERROR * the largest item norm; times |q| per query
        self.floor = matrix.shape[1] * SCREEN_FLOOR
        self.screen_fallbacks = Fallbacks()
        if screen != "off" and len(matrix) >= MIN_SCREENED_ITEMS:
            self.screen = matrix.to(torch.bfloat16)
            self.slack = SCREEN_ERROR * float(matrix.norm(dim=1).max())
            if screen == "auto" and not self._screening_pays():
                self.screen = None

    def runs_inline(self, batch: int) -> bool:
        """One query over a small catalogue: cheaper on the event loop than the hop to the
        recall thread and back. Bigger scans go to the thread (RECALL_THREAD), so that the
        loop keeps reading requests meanwhile."""
        return batch == 1 and self.n_items <= INLINE_ITEMS

    def search(
        self, vectors: np.ndarray, k: int, allowed: AllowedRows | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top `k` (at most the number of items) inner products of each row of `vectors`
        `(B, dim)` (over `allowed` rows when given): (scores float32 `(B, k)`, rows int64
        `(B, k)`), best first; (-inf, -1) past the allowed count."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if allowed is not None and (allowed.kept or allowed.share <= PRUNE_MIN_SHARE):
            return exact_allowed(self.matrix, vectors, k, allowed)
        pruning = self.pruning  # read once: another thread's search may drop it meanwhile
        if pruning is not None and k * PRUNE_MAX_K_SHARE <= len(self.matrix):
            scores, rows, done = pruning.search(vectors, k, allowed)
            # Filtered queries do not count: a filter's own looser bounds say nothing about
            # whether pruning pays for the others.
            counted = (0, 0) if allowed is not None else (len(done), int((~done).sum()))
            if self.prune_fallbacks.add(*counted):
                log.warning(
                    "exact search scanned %d of %d queries in full: their clusters' bounds "
                    "were too loose to prune; scanning every query from now on",
                    self.prune_fallbacks.scanned,
                    self.prune_fallbacks.queries,
                )
                self.pruning = None
            if not done.all():
                scores[~done], rows[~done] = self._search(vectors[~done], k, allowed)
            scores[rows < 0] = -np.inf  # FAISS's empty slots score its lowest float
            return scores, rows
        return self._search(vectors, k, allowed)

    def _search(
        self, vectors: np.ndarray, k: int, allowed: AllowedRows | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        step = max(1, SCAN_BYTES // (6 * len(self.matrix)))
        if len(vectors) > step:
            parts = [
                self._search(vectors[i : i + step], k, allowed)
                for i in range(0, len(vectors), step)
            ]
            return np.concatenate([s for s, _ in parts]), np.concatenate([r for _, r in parts])
        queries = torch.from_numpy(vectors)
        if allowed is not None and allowed.share <= GATHER_MAX_SHARE:
            return exact_allowed(self.matrix, vectors, k, allowed)
        if allowed is not None:
            return self._masked_scan(queries, k, allowed)
        screen = self.screen  # read once, as `pruning` in `search`
        with torch.inference_mode():
            if (
                screen is None
                or len(queries) < SCREEN_MIN_BATCH
                or screen_depth(k) >= len(self.matrix)
            ):
                scores, rows = self._scan(queries, k)
            else:
                scores, rows = self._screened(queries, k, screen)
        return scores.numpy(), rows.numpy()

    def _product(self, queries: torch.Tensor) -> torch.Tensor:
        """Float32 scores `(B, n_items)` of `queries` `(B, dim)` against every item."""
        size = max(b for b in TIMED_BATCHES if b <= len(queries))
        if self.blas[size] == "numpy":
            return torch.from_numpy(queries.numpy() @ self.numpy_columns)
        return queries @ self.columns

    def _masked_scan(
        self, queries: torch.Tensor, k: int, allowed: AllowedRows
    ) -> tuple[np.ndarray, np.ndarray]:
        """The full float32 scan with the rows `allowed` leaves out scored -inf (a broad
        filter: never none allowed)."""
        with torch.inference_mode():
            scores = self._product(queries)
            scores.masked_fill_(torch.from_numpy(~allowed.mask), -torch.inf)
            values, columns = self._top(scores, min(k, allowed.count))
        return padded(values.numpy(), columns.numpy(), k)

    def _top(self, scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        values, columns = top_candidates(scores, k)
        ordered, order = values.sort(dim=1, descending=True)
        return ordered, columns.gather(1, order)

    def _scan(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._top(self._product(queries), k)

    def _screened(
        self, queries: torch.Tensor, k: int, screen: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Reductions over bfloat16 are slow in torch: select on float32 copies of the scores.
        screened = (queries.to(torch.bfloat16) @ screen.T).float()
        approx, candidates = top_candidates(screened, screen_depth(k))
        exact = torch.bmm(self.matrix[candidates], queries.unsqueeze(2)).squeeze(2)
        top = torch.topk(exact, k, dim=1, sorted=True)
        scores, rows = top.values, candidates.gather(1, top.indices)
        # An item left out screened at most the last candidate's score, so its true score is
        # at most that plus the bound: the k-th best must reach it for the answer to be exact.
        reach = approx.amin(dim=1) + self.slack * queries.norm(dim=1) + self.floor
        unsure = (scores[:, -1] < reach).nonzero().flatten()
        if len(unsure):
            scores[unsure], rows[unsure] = self._scan(queries[unsure], k)
        if self.screen_fallbacks.add(len(queries), len(unsure)):
            log.warning(
                "exact search rescanned %d of %d screened queries: scanning in float32 from now "
                "on (the bound is too wide for these vectors)",
                self.screen_fallbacks.scanned,
                self.screen_fallbacks.queries,
            )
            self.screen = None
        return scores, rows

    def _time_blas(self, repeats: int = 3) -> dict[int, str]:
        """Time one product per library at each of TIMED_BATCHES over the first TIMED_ITEMS
        items (best of `repeats`): the faster library per batch size."""
        generator = torch.Generator().manual_seed(0)
        columns = self.columns[:, :TIMED_ITEMS]
        numpy_columns = self.numpy_columns[:, :TIMED_ITEMS]
        choice, timings = {}, {}
        with torch.inference_mode():
            for batch in TIMED_BATCHES:
                q = torch.randn(batch, self.matrix.shape[1], generator=generator)
                ms = {
                    "torch": best_ms(partial(torch.matmul, q, columns), repeats),
                    "numpy": best_ms(partial(np.matmul, q.numpy(), numpy_columns), repeats),
                }
                choice[batch] = min(ms, key=ms.__getitem__)
                timings[batch] = f"{ms['torch']:.2f}/{ms['numpy']:.2f}"
        log.info(
            "exact search products by batch size, torch/numpy ms: %s; numpy's BLAS for %s",
            timings,
            [b for b in TIMED_BATCHES if choice[b] == "numpy"] or "none",
        )
        return choice

    def _screening_pays(self, batch: int = 8, repeats: int = 5) -> bool:
        """Time one pass over the matrix both ways: CPUs without native bfloat16 arithmetic
        can be slower reading the half-size copy than the float32 matrix."""
        screen = self.screen
        assert screen is not None
        queries = torch.randn(
            batch, self.matrix.shape[1], generator=torch.Generator().manual_seed(0)
        )
        half = queries.bfloat16()
        with torch.inference_mode():
            timings = {
                "float32": best_ms(lambda: self._product(queries), repeats),
                "bfloat16": best_ms(lambda: half @ screen.T, repeats),
            }
        pays = timings["bfloat16"] < timings["float32"]
        log.info(
            "exact search %s: one pass for %d queries takes %.2f ms in float32, %.2f in bfloat16",
            "screens in bfloat16" if pays else "scans in float32",
            batch,
            timings["float32"],
            timings["bfloat16"],
        )
        return pays
