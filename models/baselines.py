"""Classic recommenders the two-tower model is measured against.

All work in the catalogue's index space (`item_index`: item_id -> column 0..n_items-1) on the
binary user x item matrix of the training interactions, with dense numpy arrays: they are
meant for catalogues up to ~10k items. `score` returns raw scores for every catalogue item;
excluding items the user has already seen is the evaluator's job. Users absent from the
training frame get a zero row from `ItemCF` and `EASE` (no history, no evidence) and the
popularity row from `MostPopular`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd

from models.dataset import DataError

# Peak bytes per item pair while fitting, measured with tracemalloc at 2,000 items: 32.2 for
# EASE (float64 Gram matrix, inverse and B), 32.4 for ItemCF (its int64 top-k selection).
BYTES_PER_ITEM_PAIR = 33
CGROUP = Path("/sys/fs/cgroup")


def _available_memory() -> int | None:
    """Bytes that can be allocated now: Linux's MemAvailable (else the physical memory),
    capped by a container's memory limit (cgroup v2), which MemAvailable does not see."""
    found: list[int] = []
    with contextlib.suppress(OSError, ValueError, IndexError):  # not Linux
        lines = Path("/proc/meminfo").read_text().splitlines()
        found += [int(n.split()[1]) * 1024 for n in lines if n.startswith("MemAvailable:")]
    if not found:
        with contextlib.suppress(AttributeError, ValueError, OSError):
            found.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    with contextlib.suppress(OSError, ValueError):  # no cgroup v2, or "max": no limit
        limit = int((CGROUP / "memory.max").read_text())
        found.append(limit - int((CGROUP / "memory.current").read_text()))
    return min(found, default=None)


def check_dense_fits(n_items: int, purpose: str) -> None:
    """Refuse up front a catalogue whose dense item x item matrices exceed the memory
    available: found out by the baselines after a training run, it would cost the run (or
    bring the out-of-memory killer)."""
    need, have = BYTES_PER_ITEM_PAIR * n_items**2, _available_memory()
    if have is not None and need > have:
        raise DataError(
            f"{purpose} holds dense {n_items:,} x {n_items:,} item matrices, about "
            f"{need / 2**30:.1f} GiB; {have / 2**30:.1f} GiB of memory is available"
        )


class Recommender(Protocol):
    """Anything the evaluator can rank with: fit on a training frame, score users."""

    name: str

    def fit(self, train: pd.DataFrame, item_index: dict[str, int]) -> None: ...

    def score(self, user_ids: Sequence[str]) -> np.ndarray: ...


@dataclass(frozen=True)
class UserItems:
    """Each user's distinct items, as CSR arrays over the catalogue's index space.

    Attributes:
        user_pos: user_id -> row.
        indptr: int64 [n_users + 1]; row u's items are `indices[indptr[u]:indptr[u + 1]]`.
        indices: int64 [nnz], item indices, ascending within a row.
        n_items: catalogue size (number of columns).
    """

    user_pos: dict[str, int]
    indptr: np.ndarray
    indices: np.ndarray
    n_items: int

    @classmethod
    def build(cls, interactions: pd.DataFrame, item_index: Mapping[str, int]) -> UserItems:
        """Index an interaction frame (`user_id`, `item_id` columns).

        Raises:
            ValueError: an item is missing from `item_index`.
        """
        item_pos = interactions["item_id"].map(item_index)
        if item_pos.isna().any():
            unknown = interactions["item_id"][item_pos.isna()].unique()[:5].tolist()
            raise ValueError(f"items not in the catalogue index, e.g. {unknown}")
        codes, uniques = pd.factorize(interactions["user_id"])
        n_items = len(item_index)
        keys = np.unique(codes.astype(np.int64) * n_items + item_pos.to_numpy(dtype=np.int64))
        rows, cols = np.divmod(keys, n_items)
        indptr = np.zeros(len(uniques) + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=len(uniques)), out=indptr[1:])
        user_pos = {str(user): pos for pos, user in enumerate(uniques)}
        return cls(user_pos=user_pos, indptr=indptr, indices=cols, n_items=n_items)

    @property
    def n_users(self) -> int:
        return len(self.user_pos)

    def lengths(self) -> np.ndarray:
        """int64 [n_users]: number of distinct items per user."""
        return np.diff(self.indptr)

    def coords(self, user_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(row in `user_ids`, item index) pairs, int64 [nnz] each, of the users' known items."""
        positions = np.fromiter(
            (self.user_pos.get(u, -1) for u in user_ids), dtype=np.int64, count=len(user_ids)
        )
        known = np.flatnonzero(positions >= 0)
        starts = self.indptr[positions[known]]
        lengths = self.indptr[positions[known] + 1] - starts
        # Gather every row's slice of `indices` at once: start of its slice + offset within.
        offsets = np.arange(int(lengths.sum()), dtype=np.int64)
        offsets += np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
        return np.repeat(known, lengths), self.indices[offsets]

    def dense(self, user_ids: Sequence[str]) -> np.ndarray:
        """float32 [len(user_ids), n_items] binary rows; unknown users are zero rows."""
        out = np.zeros((len(user_ids), self.n_items), dtype=np.float32)
        rows, cols = self.coords(user_ids)
        out[rows, cols] = 1.0
        return out

    def gram(self, user_weights: np.ndarray | None = None, chunk: int = 2048) -> np.ndarray:
        """Item co-occurrence XᵀWX, float64 [n_items, n_items].

        Args:
            user_weights: float [n_users], W's diagonal (a user's weight on every pair of
                their items); None for plain counts.
            chunk: users densified at a time.
        """
        users = list(self.user_pos)
        out = np.zeros((self.n_items, self.n_items), dtype=np.float64)
        for start in range(0, len(users), chunk):
            block = self.dense(users[start : start + chunk])
            left = block
            if user_weights is not None:
                weights = user_weights[start : start + chunk, None]
                left = (block * weights).astype(np.float32)
            # float32 GEMM: counts stay exact below 2**24, weighted sums lose nothing material.
            out += left.T @ block
        return out


class MostPopular:
    """Score = the item's number of training interactions, the same for every user."""

    name = "most_popular"

    def __init__(self) -> None:
        self.counts = np.zeros(0, dtype=np.float32)

    def fit(self, train: pd.DataFrame, item_index: Mapping[str, int]) -> None:
        pos = train["item_id"].map(item_index)
        if pos.isna().any():
            raise ValueError("training items missing from the catalogue index")
        counts = np.bincount(pos.to_numpy(dtype=np.int64), minlength=len(item_index))
        self.counts = counts.astype(np.float32)

    def score(self, user_ids: Sequence[str]) -> np.ndarray:
        """float32 [len(user_ids), n_items], the popularity row repeated."""
        return np.repeat(self.counts[None, :], len(user_ids), axis=0)


class _HistoryScorer:
    """A model scoring users by `history @ weights` for an item x item weight matrix."""

    name = "history"

    def __init__(self) -> None:
        self.history: UserItems | None = None
        self.weights = np.zeros((0, 0), dtype=np.float32)

    def score(self, user_ids: Sequence[str]) -> np.ndarray:
        """float32 [len(user_ids), n_items]; users unknown to training get zeros."""
        if self.history is None:
            raise RuntimeError(f"{self.name}: score() before fit()")
        return self.history.dense(user_ids) @ self.weights


class ItemCF(_HistoryScorer):
    """Item-based collaborative filtering with truncated cosine similarity.

    sim(i, j) = C[i, j] / sqrt(N[i] * N[j]), where N[i] counts the users of item i and C[i, j]
    the users of both (with `iuf`, each such user counts 1 / ln(1 + |their history|) instead
    of 1; the denominator keeps plain counts, as in the ItemCF-IUF of the seed experiment).
    Each item keeps its `neighbours` most similar other items; a user's score for j is the
    sum over their history items i of sim(i, j).

    Args:
        neighbours: similar items kept per item (rows of the similarity matrix).
        iuf: weight co-occurrences by inverse user frequency.
    """

    def __init__(self, neighbours: int = 50, iuf: bool = False) -> None:
        super().__init__()
        if neighbours < 1:
            raise ValueError(f"neighbours must be >= 1, got {neighbours}")
        self.neighbours = neighbours
        self.iuf = iuf
        self.name = "itemcf_iuf" if iuf else "itemcf"

    def fit(self, train: pd.DataFrame, item_index: Mapping[str, int]) -> None:
        history = UserItems.build(train, item_index)
        weights = 1.0 / np.log1p(history.lengths()) if self.iuf else None
        co = history.gram(weights)
        norm = np.sqrt(np.bincount(history.indices, minlength=history.n_items).astype(np.float64))
        norm[norm == 0] = 1.0
        sim = co / norm[:, None] / norm[None, :]
        np.fill_diagonal(sim, 0.0)
        self.weights = _keep_top_per_row(sim, self.neighbours).astype(np.float32)
        self.history = history


class EASE(_HistoryScorer):
    """Embarrassingly Shallow Autoencoder (Steck 2019), closed form.

    B = I - P diag(1 / diag(P)) with P = (XᵀX + λI)⁻¹, so diag(B) = 0; a user's scores
    are x_u B. Solved in float64, O(n_items³).

    Args:
        l2: λ, the ridge penalty.
    """

    name = "ease"

    def __init__(self, l2: float = 500.0) -> None:
        super().__init__()
        if l2 <= 0:
            raise ValueError(f"l2 must be > 0, got {l2}")
        self.l2 = l2

    def fit(self, train: pd.DataFrame, item_index: Mapping[str, int]) -> None:
        history = UserItems.build(train, item_index)
        gram = history.gram()
        gram[np.diag_indices_from(gram)] += self.l2
        precision = np.linalg.inv(gram)
        b = -precision / np.diagonal(precision)[None, :]
        np.fill_diagonal(b, 0.0)
        self.weights = b.astype(np.float32)
        self.history = history


def _keep_top_per_row(matrix: np.ndarray, k: int) -> np.ndarray:
    """Zero all but the k largest entries of each row (ties at the edge: argpartition's)."""
    if k >= matrix.shape[1]:
        return matrix
    top = np.argpartition(-matrix, k - 1, axis=1)[:, :k]
    out = np.zeros_like(matrix)
    np.put_along_axis(out, top, np.take_along_axis(matrix, top, axis=1), axis=1)
    return out


BASELINES: dict[str, Callable[[], Recommender]] = {
    "most_popular": MostPopular,
    "itemcf": ItemCF,
    "itemcf_iuf": lambda: ItemCF(iuf=True),
    "ease": EASE,
}
